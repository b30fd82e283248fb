"""Toy 2-D consistency training (CT, Song et al. 2023; iCT's options) without a teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/ct.py:gmm --workdir runs/toy_ct_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The teacher only initialises the student (read in EDM coordinates, sigma in [0.002, 80],
sigma_d = 1) and gives the reference eval rows; the target point is x0 + t2 z with the same z
(no teacher calls). CT's progressive curriculum: N grows from s0 = 2 to s1 + 1 = 41 grid
points over the run, with the adaptive EMA target decay mu(k) = exp(s0 ln 0.9 / (N(k) - 1)).
(CT's own s1 = 150 is for 800k steps: over 3000 steps the grid refines faster than the
boundary information propagates, and the 1-step student stays near the teacher's 1 step;
s1 = 40 closes ~90% on gmm.)
iCT's recipe: `--config.objective.curriculum=exponential --config.objective.start_scales=10
--config.objective.end_scales=1280 --config.objective.target=online
--config.objective.index_sampling=lognormal --config.objective.loss=pseudo_huber
--config.objective.weighting=inverse_step`. From scratch: `--config.objective.init=random`
with `model.prediction` / `process.*` of the new network.

About 2 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds in
docs/results_toy.md, "CD, CT, ECT"): the 1-step student closes at least 60% of the teacher's
gap between 1 and 64 Euler steps.
"""
from configs.toy.common import toy_distill_config

STEPS = 3000


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "ct", steps=STEPS, lr=1e-4, warmup_steps=100, grad_clip=1.0)
  c.objective.sigma_data = 1.0
  c.objective.curriculum = "progressive"
  c.objective.curriculum_steps = STEPS
  c.objective.start_scales = 2
  c.objective.end_scales = 40
  c.objective.start_ema = 0.9
  c.objective.target = "ema"
  c.objective.loss = "l2"
  c.objective.weighting = "uniform"
  c.objective.label_dropout = 0.1
  return c
