"""Toy 2-D progressive distillation (Salimans & Ho) from a toy flow teacher: 16 -> 8 -> 4
DDIM steps in three engine stages.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/progressive.py:gmm --workdir runs/toy_pd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. Stage i trains an 16 / 2^i-step student on its 2x-step teacher (the checkpoint,
then the previous stage's student) for `objective.stage_steps` steps; the optimizer restarts and
the learning rate decays linearly to 0 within each stage (the paper's schedule); no EMA; the
max(1, SNR) ("snr_trunc") weighting. The student is sampled with deterministic `ddim` steps.

About 1-1.5 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds
in docs/results_toy.md): the 4-step student closes 99.9% of the teacher's 1 vs 64-step gap
(gmm 0.123, checkerboard 0.055, spiral 0.086).
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "progressive", steps=900, lr=3e-4)
  c.optim.schedule = "linear"
  c.objective.student_steps = 16
  c.objective.num_stages = 3
  c.objective.stage_steps = 300
  c.objective.weighting = "snr_trunc"
  c.objective.label_dropout = 0.1
  return c
