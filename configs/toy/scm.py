"""Toy 2-D sCM (continuous-time consistency distillation, TrigFlow) from a toy flow teacher.

    python -m launch.train --config configs/toy/teacher.py:gmm \
        --workdir runs/toy_teacher_gmm_dense --config.model.time_scale=0.001
    python -m launch.train --config configs/toy/scm.py:gmm --workdir runs/toy_scm_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm_dense

The argument picks the dataset (gmm, checkerboard, moons, spiral; default gmm) and must match
the teacher's. sCT (single-sample velocity; the teacher only initialises the student and gives
the reference eval rows): `--config.objective.mode=sct`.

The teacher needs a smooth ("dense") time embedding: sCM differentiates the network in time,
and the toy MLP's default input 1000 s (process.timestep_scale = 1000, model.time_scale = 1)
makes the teacher's output wiggle in s at a period of ~0.006, which dominates the tangent and
makes sCD diverge. `model.time_scale=0.001` embeds s in [0, 1] instead (as SANA-Sprint's
fine-tuned teacher); its many-step quality is the same.

About 1.5-2 minutes on 2 CPU cores (2000 steps, batch 256). Expected result (eval.json, SWD over
4096 samples, unconditional sampling): the 1-step student closes >= 95% of the teacher's gap
between 1 Euler step and 64 Euler steps and 2 steps are better still (~ the 64-step teacher);
docs/results_toy.md ("sCM") has the table over 3 seeds on gmm, checkerboard and spiral.
"""
from configs.toy.common import toy_distill_config


def get_config(arg: str = "gmm"):
  c = toy_distill_config(arg, "scm", steps=2000, warmup_steps=100, grad_clip=1.0)
  c.objective.mode = "scd"
  c.objective.init = "teacher"
  c.objective.sigma_data = 1.0
  c.objective.p_mean = -1.0
  c.objective.p_std = 1.4
  c.objective.tangent_warmup = 500
  c.objective.tangent_norm = 0.1
  c.objective.adaptive_weight = True
  c.objective.guidance_scales = (1.0,)
  c.objective.ema_decay = 0.0
  return c
