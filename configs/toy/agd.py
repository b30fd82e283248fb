"""Toy 2-D adapter guidance distillation (AGD): the frozen toy teacher plus a trained guidance
adapter (a w embedding and per-block additive offsets, width 64), so that one pass reproduces
CFG's two.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/agd.py:gmm --workdir runs/toy_agd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (a class-conditional one: gmm (default) or spiral) and must
match the teacher's. w ~ U[1, 3]; the training states are on the CFG teacher's own 16-step
DDIM trajectories. Evaluation is class-conditional at w = 2 with 32 Euler steps for both: the
teacher with CFG (64 network calls), the student with w as its input (32 calls).

About 2 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 class-conditional
samples; 3 seeds in docs/results_toy.md): the student's 32-step SWD within 10% of the CFG
teacher's (gmm 0.167 against 0.158, spiral 0.102 against 0.106; one spiral seed of three lands
10.3% below it, i.e. less guided).
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "agd", steps=1000, lr=1e-3, warmup_steps=50)
  c.objective.guidance_range = (1.0, 3.0)
  c.objective.states = "teacher"
  c.objective.trajectory_steps = 16
  c.objective.adapter_hidden = 64
  c.objective.adapter_params = "guidance_embed|guidance_adapter"
  c.objective.label_dropout = 0.1
  c.eval.class_conditional = True
  c.eval.guidance = 2.0
  c.eval.teacher_steps = 32
  c.eval.steps = (32,)
  return c
