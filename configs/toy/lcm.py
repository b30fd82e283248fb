"""Toy 2-D LCM (latent consistency distillation over the teacher's DDIM grid) from a toy flow
teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm --workdir runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/lcm.py:gmm --workdir runs/toy_lcm_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. LCM's recipe: a 50-step DDIM grid (skipping step k = 1 / 50 of the time range),
an EMA target with decay 0.95 (also the evaluated weights), squared error, the student sampled
with the `lcm` solver (diffusers' LCMScheduler: LCM's c_skip / c_out boundary, fresh noise
between steps). No guidance (`objective.guidance_range=(1.0, 1.0)`; a range > 1 distils the
CFG teacher, and `objective.guidance_embed=True` lets the student see w). LCM-LoRA (a LoRA over
the frozen teacher, online target): `--config.objective.lora_rank=16
--config.objective.target=online --config.optim.lr=1e-3`.

About 1-1.5 minutes on 2 CPU cores. Expected result (eval.json, SWD over 4096 samples; 3 seeds
in docs/results_toy.md): the 4-step student closes 98-101% of the teacher's gap between 1 and
64 Euler steps (gmm 0.141, checkerboard 0.047, spiral 0.097; teacher 64 steps 0.121, 0.055,
0.085), and 1 step already 96.6-99.7%.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "lcm", steps=800, lr=1e-4, warmup_steps=100, grad_clip=1.0)
  c.objective.num_ddim_steps = 50
  c.objective.target = "ema"
  c.objective.target_decay = 0.95
  c.objective.loss = "l2"
  c.objective.label_dropout = 0.1
  return c
