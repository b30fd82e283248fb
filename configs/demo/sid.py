"""Demo SiD: the shipped digits DiT teacher distilled into a one-step generator by score
identity distillation (alpha = 1.2, SiD-LSG guidance 1).

    python -m launch.train --config configs/demo/sid.py --workdir runs/demo/sid
    python -m launch.demo --objective sid           # the same run, plus the report

The student is sampled with the `consistency` sampler.

About twice sCM's CPU time per step. Expected result (600 steps; teacher 32 steps fd 20.7):
student 1 step ~31.7 (1.53x), 2 steps ~33.8, 4 steps ~45.0.
"""
from configs.demo.common import demo_distill_config


def get_config(arg: str = ""):
  del arg
  c = demo_distill_config("sid", steps=600, lr=1e-4, b1=0.0)
  c.objective.alpha = 1.2
  c.objective.fake_updates = 1
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.1
  c.objective.guidance_mode = "lsg"
  c.objective.guidance = 1.0
  c.objective.time_dist = "window"
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  return c
