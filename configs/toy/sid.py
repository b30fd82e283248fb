"""Toy 2-D SiD (score identity distillation) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/sid.py:gmm --workdir runs/toy_sid_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. The student is sampled with the `consistency` sampler (1 step =
x0_hat(noise, t_max)).

About 1.5 minutes of CPU time (2-4 minutes wall on a shared 2-core CPU). Expected result
(eval.json, SWD over 4096 unconditional samples): the 1-step student closes 97% of the
teacher's 1 vs 64 Euler-step gap on average (>= 92% in every run) on gmm, checkerboard
and spiral; see docs/results_toy.md ("DMD2, SiD, VSD") for the table over 3 seeds.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "sid", steps=1000, b1=0.0)
  c.objective.alpha = 1.2
  c.objective.fake_updates = 1
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.5   # eval samples unconditionally (the null class)
  c.objective.guidance_mode = "lsg"
  c.objective.guidance = 1.0
  c.objective.time_dist = "window"
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  return c
