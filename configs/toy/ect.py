"""Toy 2-D easy consistency tuning (ECT, Geng et al. 2024) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/ect.py:gmm --workdir runs/toy_ect_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The pretrained teacher initialises the student (read in EDM coordinates, sigma_d = 1); no
teacher calls during training. Each step draws t = exp(N(-1.1, 2.0)), r = t (1 - q^-(s + 1)
(1 + 8 sigmoid(-t))) with the stage s = floor(step / double_every) (the gap t - r halves every
stage with q = 2) and regresses f(x0 + t z, t) onto sg f(x0 + r z, r) with ECT's loss
||a - b|| / (t - r) against the online student (no EMA target).

About 2 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds in
docs/results_toy.md, "CD, CT, ECT"): the 1-step student closes at least 60% of the teacher's
gap between 1 and 64 Euler steps.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "ect", steps=3000, lr=1e-4, warmup_steps=100, grad_clip=1.0)
  c.objective.sigma_data = 1.0
  c.objective.p_mean = -1.1
  c.objective.p_std = 2.0
  c.objective.q = 2.0
  c.objective.double_every = 500
  c.objective.loss = "pseudo_huber"
  c.objective.huber_c = 0.0
  c.objective.weighting = "inverse_step"
  c.objective.label_dropout = 0.1
  return c
