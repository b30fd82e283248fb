"""Demo DMD2: the shipped digits DiT teacher distilled into a one-step generator (distribution
matching + a GAN head on the fake network's last block).

    python -m launch.train --config configs/demo/dmd2.py --workdir runs/demo/dmd2
    python -m launch.demo --objective dmd2          # the same run, plus the report

The student is sampled with the `consistency` sampler (1 step = x0_hat(noise, t_max); more
steps re-noise and denoise again).

About twice sCM's CPU time per step (the critic trains every step). Expected result (800
steps; teacher 32 steps fd 20.7): student 1 step ~30.8 (1.49x), 2 steps ~26.0, 4 steps ~36.4.
"""
from configs.demo.common import demo_distill_config


def get_config(arg: str = ""):
  del arg
  c = demo_distill_config("dmd2", steps=800, lr=1e-4, b1=0.0)
  c.objective.fake_updates = 5
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.1
  c.objective.real_guidance = 1.0
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  # DM's surrogate gradient scales as 1 / D (D = 64 pixels), the GAN term's does not.
  c.objective.gan_weight = 3e-2
  c.objective.gan_d_weight = 1e-2
  c.objective.gan_feature_block = -1
  c.objective.gan_feature_dim = 128      # the teacher's width (4 heads x 32)
  c.objective.gan_hidden = 128
  return c
