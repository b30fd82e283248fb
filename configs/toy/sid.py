"""Toy 2-D SiD (score identity distillation) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/sid.py:gmm --workdir runs/toy_sid_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's; `<dataset>,sida` adds SiDA's adversarial term (the fake network's block-1
features as the discriminator, real samples from the dataset; settings in `sida`). The student is sampled with the `consistency` sampler (1 step =
x0_hat(noise, t_max)).

About 1.5 minutes of CPU time (2-4 minutes wall on a shared 2-core CPU). Expected result
(eval.json, SWD over 4096 unconditional samples): the 1-step student closes 97% of the
teacher's 1 vs 64 Euler-step gap on average (>= 92% in every run) on gmm, checkerboard
and spiral; see docs/results_toy.md ("DMD2, SiD, VSD") for the table over 3 seeds.
"""
import ml_collections

from configs.toy.common import toy_distill_config


def sida(c):
  """SiDA (Zhou et al. ICLR'25) on the toy teacher: the official weights (the GAN losses are
  scaled by the data size, so 0.01 carries over from images to 2-D points), alpha 1, the fake
  network's gradients clipped by value at 1; the critic trains alone for the first 20 steps
  and the generator's GAN term starts at step 100 (SiDA: 100k and 200k images)."""
  c.objective.alpha = 1.0
  c.objective.discriminator = "encoder"
  c.objective.gan_weight = 0.01
  c.objective.gan_d_weight = 1.0
  c.objective.gan_feature_block = 1      # the middle of the toy teacher's 3 blocks
  c.objective.generator_start_step = 20
  c.objective.gan_start_step = 100
  c.optim.networks.fake_score = ml_collections.ConfigDict({"grad_clip_value": 1.0})
  return c


def get_config(arg: str = "gmm"):
  data, _, variant = (arg or "gmm").partition(",")
  if variant not in ("", "sida"):
    raise ValueError(f"configs/toy/sid.py: expected '<dataset>[,sida]', got {arg!r}")
  c = toy_distill_config(data, "sid", steps=1000, b1=0.0)
  c.objective.alpha = 1.2
  c.objective.fake_updates = 1
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.5   # eval samples unconditionally (the null class)
  c.objective.guidance_mode = "lsg"
  c.objective.guidance = 1.0
  c.objective.time_dist = "window"
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  return sida(c) if variant else c
