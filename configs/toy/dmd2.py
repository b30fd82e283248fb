"""Toy 2-D DMD2 (distribution matching + optional GAN head) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/dmd2.py:gmm --workdir runs/toy_dmd2_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. Without the GAN term: `--config.objective.gan_weight=0`;
DMD2's image-scale weight: `--config.objective.gan_weight=1e-2`. The student is sampled with the
`consistency` sampler (1 step = x0_hat(noise, t_max)).

About 1.5 minutes of CPU time (2-4 minutes wall on a shared 2-core CPU). Expected result
(eval.json, SWD over 4096 unconditional samples): the 1-step student closes 98.6% of the
teacher's 1 vs 64 Euler-step gap on average (>= 97.7% in every run) on gmm, checkerboard
and spiral; see docs/results_toy.md ("DMD2, SiD, VSD") for the table over 3 seeds.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "dmd2", steps=1000, b1=0.0)
  c.objective.fake_updates = 5
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.5   # eval samples unconditionally (the null class)
  c.objective.real_guidance = 1.0
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  # DM's surrogate gradient is g / (B D) per sample, the GAN term's ~1 / B: on D = 2 toy data
  # a weight ~1 plays the role of DMD2's 1e-3..5e-3 on D ~ 16k image latents.
  c.objective.gan_weight = 1.0
  c.objective.gan_d_weight = 1e-2
  c.objective.gan_feature_dim = 128     # the toy teacher's model.hidden
  c.objective.gan_hidden = 128
  return c
