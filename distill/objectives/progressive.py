"""`progressive`: progressive distillation (Salimans & Ho 2022): a student learns to take one
DDIM step where its teacher takes two, and the engine halves the step count stage by stage.

    python -m launch.train --config configs/toy/progressive.py:gmm --workdir runs/toy_pd \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

Stage i (i = 0 .. num_stages - 1) distils a 2N_i-step teacher into an N_i-step student,
N_i = student_steps / 2^i. The grid is the process's own 2N-step grid
`process.timesteps(2N)` (descending t_0 = t_max > ... > t_2N = t_end); its even points are the
student's N-step grid (the same as `process.timesteps(N)` for uniform spacings, which is what
the `ddim` sampler of the evaluation uses). Per sample:

    n ~ U{0..N-1};  t = t_2n, t' = t_2n+1, t'' = t_2n+2
    z_t = alpha_t x + sigma_t eps
    z_t'' = two deterministic DDIM steps of the teacher t -> t' -> t''
    x_target = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
                                          (the x0 one student DDIM step needs to land on z_t'';
                                           the teacher's x0 at t'' = t_end where sigma_t'' = 0)
    loss = mean_b max(1, SNR(t)) ||x0_student(z_t, t) - x_target||^2     ("snr_trunc")

("snr_trunc" = max(||x - x~||^2, ||eps - eps~||^2); "snr_plus_one" (the v-loss) and "constant"
are the alternatives.) The stages are engine stages: at each boundary the finished student
becomes the teacher (promotion), the optimizer restarts and the learning-rate schedule anneals
again (the paper: linear decay to 0 within each stage, `optim.schedule = "linear"`), no EMA.
The teacher's CFG (`guidance`) is applied to both of its steps when > 1 (the same guided
teacher throughout; Meng et al.'s w-conditioned stage 2 is the `guided` objective).

Networks: "teacher" (frozen; the checkpoint, then each finished student), "student" (init from
the teacher).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill.context import to_kind
from distill.objective import Network, Objective, Phase, Stage, register_objective
from distill.objectives.lcm import choice, draw_inputs, teacher_ddim_step
from distill.objectives.matching import bcast, per_example_mean, step_cond

DEFAULTS = {
    "student_steps": 8,       # N_0: the first stage's student steps (its teacher takes 2 N_0)
    "num_stages": 3,          # stages N_0 -> N_0 / 2 -> ... (8 -> 4 -> 2 with 3 stages)
    "stage_steps": 1000,      # training steps per stage
    "weighting": "snr_trunc",  # snr_trunc | snr_plus_one | constant
    "guidance": 1.0,          # teacher CFG u + w (c - u) (1: none)
    "label_dropout": 0.1,     # null-class probability per sample (keeps the unconditional path)
}

WEIGHTINGS = {
    "snr_trunc": lambda snr: jnp.maximum(1.0, snr),
    "snr_plus_one": lambda snr: snr + 1.0,
    "constant": jnp.ones_like,
}


def pd_target(z_t, z_end, alpha, sigma, alpha_end, sigma_end):
  """The x0 that one DDIM step from (z_t, t) needs to reach z_end at t'' (per sample)."""
  r = bcast(sigma_end / sigma, z_t)
  return (z_end - r * z_t) / (bcast(alpha_end, z_t) - r * bcast(alpha, z_t))


def progressive_loss_given(trainable, ctx, batch, draws: dict, *, student: str, teacher: str,
                           num_steps: int, weighting: str, guidance: float,
                           embed_w: bool = False):
  """The loss for given draws; see the module docstring. `embed_w` (guided distillation's
  stage 2): teacher and student both take the draws' w as their `guidance` input, and the
  teacher makes plain passes (its guidance is distilled in)."""
  info = ctx.nets[teacher]
  process = info.process
  grid = jnp.asarray(process.timesteps(2 * num_steps), jnp.float32)
  x0 = jnp.asarray(batch["x"], jnp.float32)
  n, eps = draws["n"], draws["eps"]
  t, t_mid, t_end = grid[2 * n], grid[2 * n + 1], grid[2 * n + 2]
  cond = step_cond(ctx, batch, draws, teacher)
  alpha, sigma = process.alpha_sigma(t)
  z_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
  use_cfg = guidance != 1.0
  w = jnp.full((x0.shape[0],), guidance, jnp.float32)
  extras = ctx.guidance_inputs(student, draws["w"]) if embed_w else {}
  z_mid = teacher_ddim_step(ctx, teacher, z_t, t, t_mid, cond, w, use_cfg, extras)
  z_end = teacher_ddim_step(ctx, teacher, z_mid, t_mid, t_end, cond, w, use_cfg, extras)
  alpha_end, sigma_end = process.alpha_sigma(t_end)
  target = jax.lax.stop_gradient(pd_target(z_t, z_end, alpha, sigma, alpha_end, sigma_end))

  sinfo = ctx.nets[student]
  x_hat = to_kind(sinfo, ctx.apply(student, z_t, t, cond, params=trainable[student], **extras),
                  "x0", z_t, t)
  weight = WEIGHTINGS[weighting](jnp.square(alpha) / jnp.square(sigma))
  per = weight * per_example_mean(jnp.square(jnp.asarray(x_hat, jnp.float32) - target))
  return jnp.mean(per), {"x_mse": jnp.mean(per_example_mean(jnp.square(x_hat - target)))}


def progressive_loss(trainable, ctx, batch, rng, t, *, num_steps: int,
                     label_dropout: float = 0.0, guidance_range=(1.0, 1.0), **kw):
  draws = draw_inputs(rng, batch["x"], num_steps=num_steps, label_dropout=label_dropout,
                      guidance_range=guidance_range)
  return progressive_loss_given(trainable, ctx, batch, draws, num_steps=num_steps, **kw)


def check_halvable(n0: int, num_stages: int) -> None:
  if num_stages < 1 or n0 < 2 ** (num_stages - 1) or n0 % 2 ** (num_stages - 1):
    raise ValueError(f"config keys 'objective.student_steps' / 'objective.num_stages': "
                     f"{n0} student steps cannot be halved {num_stages - 1} times")


@register_objective("progressive", defaults=DEFAULTS)
def build(cfg) -> Objective:
  n0, stages_n = int(cfg.student_steps), int(cfg.num_stages)
  check_halvable(n0, stages_n)
  choice(cfg, "weighting", tuple(WEIGHTINGS))
  if int(cfg.stage_steps) <= 0:
    raise ValueError("config key 'objective.stage_steps': expected > 0")
  stages = tuple(Stage(steps=int(cfg.stage_steps),
                       overrides={"student_steps": n0 // 2 ** i, "num_stages": 1},
                       promote={"teacher": "student"} if i else {}, reset_opt=bool(i))
                 for i in range(stages_n))
  loss = functools.partial(progressive_loss, student="student", teacher="teacher",
                           num_steps=n0, weighting=str(cfg.weighting),
                           guidance=float(cfg.guidance),
                           label_dropout=float(cfg.label_dropout))
  return Objective(networks=(Network("teacher", init="checkpoint", trainable=None),
                             Network("student", init="teacher")),
                   phases=(Phase("progressive", loss=loss, trains=("student",)),),
                   stages=stages, student="student", sampler="ddim", evaluates_as="student",
                   student_steps=n0, distils_guidance=float(cfg.guidance) != 1.0)
