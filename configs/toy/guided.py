"""Toy 2-D guided distillation (Meng et al.): a w-conditioned student of the CFG toy teacher,
then progressive 8 -> 4 steps with w kept.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/guided.py:gmm --workdir runs/toy_guided_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (a class-conditional one: gmm (default) or spiral) and
must match the teacher's. w ~ U[1, 3] (CFG u + w (c - u)); stage 1 runs 600 steps, then two
progressive stages of 500 steps (8 -> 4 DDIM steps). Evaluation is class-conditional at
w = 2: the teacher's rows use CFG at 2 (its 64-step row is the reference), the student gets
w = 2 as its input.

About 2-3 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 class-conditional
samples; 3 seeds in docs/results_toy.md): the 4-step student closes 99.4% (gmm) and 99.7%
(spiral) of the guided teacher's 1 vs 64-step gap (0.166 against the teacher's 0.158 on gmm).
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "guided", steps=1600, lr=3e-4)
  c.optim.schedule = "linear"
  c.objective.part = "both"
  c.objective.guidance_range = (1.0, 3.0)
  c.objective.guidance_steps = 600
  c.objective.student_steps = 8
  c.objective.num_stages = 2
  c.objective.stage_steps = 500
  c.objective.label_dropout = 0.1
  c.eval.class_conditional = True
  c.eval.guidance = 2.0
  return c
