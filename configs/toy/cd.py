"""Toy 2-D consistency distillation (CD, Song et al. 2023) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/cd.py:gmm --workdir runs/toy_cd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. The student is the teacher read in EDM coordinates (sigma in [0.002, 80],
sigma_d = 1, the toy data's scale) with the consistency boundary scalings; each step takes one
Heun step of the teacher's ODE between neighbours of an 18-point Karras grid and regresses the
student onto its EMA target (decay 0.95) there, with squared error. Sampled with the `cm`
solver (1, 2, 4 steps on the CM multistep grid).

About 2 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds in
docs/results_toy.md, "CD, CT, ECT"): the 1-step student closes at least 60% of the teacher's
gap between 1 and 64 Euler steps.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "cd", steps=1500, lr=1e-4, warmup_steps=100, grad_clip=1.0)
  c.objective.sigma_data = 1.0
  c.objective.num_scales = 18
  c.objective.target = "ema"
  c.objective.target_decay = 0.95
  c.objective.teacher_solver = "heun"
  c.objective.loss = "l2"
  c.objective.weighting = "uniform"
  c.objective.label_dropout = 0.1
  return c
