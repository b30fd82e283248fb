"""Toy 2-D VSD (SwiftBrush: LoRA fake teacher) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/vsd.py:gmm --workdir runs/toy_vsd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. The student is sampled with the `consistency` sampler (1 step =
x0_hat(noise, t_max)).

About 1.5 minutes of CPU time (2-4 minutes wall on a shared 2-core CPU). Expected result
(eval.json, SWD over 4096 unconditional samples): the 1-step student closes 95% of the
teacher's 1 vs 64 Euler-step gap on average (>= 88% in every run) on gmm, checkerboard
and spiral; see docs/results_toy.md ("DMD2, SiD, VSD") for the table over 3 seeds.
"""
import ml_collections

from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "vsd", steps=1000, b1=0.0)
  c.objective.fake_updates = 1
  c.objective.num_steps = 1
  c.objective.null_label_prob = 0.5   # eval samples unconditionally (the null class)
  c.objective.guidance = 1.0
  c.objective.weighting = "sigma2"
  c.objective.t_min_frac = 0.02
  c.objective.t_max_frac = 0.98
  c.objective.lora_rank = 32

  # The LoRA teacher's own learning rate (SwiftBrush: 1e-3 for the LoRA vs 1e-6 for the student).
  c.optim.networks.fake_score = ml_collections.ConfigDict({"lr": 1e-3})
  return c
