"""`guided`: distillation of a classifier-free-guided teacher (Meng et al. 2023, "On
Distillation of Guided Diffusion Models"): a w-conditioned student first matches the CFG teacher
over a range of w (stage 1), then progressive distillation halves its steps with w kept
(stage 2).

    python -m launch.train --config configs/toy/guided.py:gmm --workdir runs/toy_guided \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

Stage 1 (`guidance_steps` steps), per sample: w ~ U[w_min, w_max] (CFG u + w (c - u), so
Meng's w_Meng = w - 1), t from the process's training distribution, z_t = alpha_t x + sigma_t
eps, and

    loss = mean_b omega(t) ||x0_student(z_t, t, w) - [u + w (c - u)](x0_teacher(z_t, t))||^2

with omega = SNR + 1 (the v-loss, Meng's choice; `guidance_weighting`). The student is the
teacher with a zero-initialised guidance embedding (`guidance_embed`), so it starts as the
conditional teacher at every w.

Stage 2 (`num_stages` stages of `stage_steps` steps, N_0 = `student_steps`, halved per stage):
`progressive` (distill/objectives/progressive.py) with a w-conditioned teacher and student that
share the drawn w: the stage-1 student, then each finished stage's student, is the teacher
("w_teacher", promoted at every boundary); the optimizer restarts per stage.

`part`: "both" (stage 1 then stage 2, as engine stages), "guidance" (stage 1 only) or
"progressive" (stage 2 only, from a w-conditioned teacher checkpoint, e.g. a stage-1 run).
Evaluate with `eval.guidance = w` and `eval.class_conditional = True`: the teacher's rows use
CFG at w, the student gets w as its input.

Networks: "teacher" (the checkpoint, frozen), "student" (init from the teacher, with the
guidance embedding), "w_teacher" (part "both": the frozen w-conditioned teacher of stage 2).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill.context import to_kind
from distill.objective import Network, Objective, Phase, Stage, register_objective
from distill.objectives import progressive
from distill.objectives.lcm import choice, guidance_range
from distill.objectives.matching import bcast, guided, per_example_mean, step_cond

DEFAULTS = {
    "guidance_range": (1.0, 4.0),   # w ~ U[lo, hi] (CFG u + w (c - u))
    "part": "both",                 # both | guidance | progressive
    "guidance_steps": 1000,         # stage-1 steps (part "both")
    "guidance_weighting": "snr_plus_one",  # stage-1 omega (progressive.WEIGHTINGS)
    "student_steps": 8,             # stage 2: N_0 (the first progressive stage's student steps)
    "num_stages": 2,                # stage 2: progressive stages (8 -> 4 with 2)
    "stage_steps": 1000,            # stage 2: steps per progressive stage
    "weighting": "snr_trunc",       # stage 2: omega
    "label_dropout": 0.1,           # null-class probability per sample
    # Set by the engine's stages (which part a stage runs); leave empty.
    "stage_part": "",
}
PARTS = ("both", "guidance", "progressive")


def draw_inputs(process, rng, x0, *, guidance_range, label_dropout: float) -> dict:
  b = x0.shape[0]
  k_t, k_e, k_w, k_d = jax.random.split(rng, 4)
  lo, hi = (float(v) for v in guidance_range)
  return {"t": process.sample_t(k_t, (b,)),
          "eps": jax.random.normal(k_e, x0.shape, jnp.float32),
          "w": jax.random.uniform(k_w, (b,), jnp.float32, lo, hi),
          "null": jax.random.bernoulli(k_d, label_dropout, (b,))}


def guidance_loss_given(trainable, ctx, batch, draws: dict, *, student: str, teacher: str,
                        weighting: str):
  """Stage 1 for given draws: the w-conditioned student's x0 against the CFG teacher's."""
  process = ctx.nets[teacher].process
  x0 = jnp.asarray(batch["x"], jnp.float32)
  t, w = draws["t"], draws["w"]
  alpha, sigma = process.alpha_sigma(t)
  z_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * draws["eps"]
  cond = step_cond(ctx, batch, draws, teacher)
  target = jax.lax.stop_gradient(guided(ctx, teacher, z_t, t, cond, w, kind="x0"))
  out = ctx.apply(student, z_t, t, cond, params=trainable[student],
                  **ctx.guidance_inputs(student, w))
  x_hat = to_kind(ctx.nets[student], out, "x0", z_t, t)
  weight = progressive.WEIGHTINGS[weighting](jnp.square(alpha) / jnp.square(sigma))
  mse = per_example_mean(jnp.square(jnp.asarray(x_hat, jnp.float32) - target))
  return jnp.mean(weight * mse), {"x_mse": jnp.mean(mse)}


def guidance_loss(trainable, ctx, batch, rng, t, *, teacher: str, guidance_range,
                  label_dropout: float, **kw):
  draws = draw_inputs(ctx.nets[teacher].process, rng, batch["x"],
                      guidance_range=guidance_range, label_dropout=label_dropout)
  return guidance_loss_given(trainable, ctx, batch, draws, teacher=teacher, **kw)


def _check(cfg):
  part = choice(cfg, "part", PARTS)
  for key in ("guidance_weighting", "weighting"):
    choice(cfg, key, tuple(progressive.WEIGHTINGS))
  return part, guidance_range(cfg)


@register_objective("guided", defaults=DEFAULTS)
def build(cfg) -> Objective:
  part, w_range = _check(cfg)
  running = str(cfg.stage_part) or part
  n0, n_stages = int(cfg.student_steps), int(cfg.num_stages)
  # Stage 2's teacher: the checkpoint itself (part "progressive") or a frozen copy of the
  # stage-1 student that each stage boundary replaces (part "both").
  w_teacher = "w_teacher" if part == "both" else "teacher"
  networks = [Network("teacher", init="checkpoint", trainable=None),
              Network("student", init="teacher", kwargs={"guidance_embed": True})]
  if part == "both":
    networks.append(Network("w_teacher", init="student", trainable=None,
                            kwargs={"guidance_embed": True}))
  if running == "guidance":
    loss = functools.partial(guidance_loss, student="student", teacher="teacher",
                             weighting=str(cfg.guidance_weighting), guidance_range=w_range,
                             label_dropout=float(cfg.label_dropout))
    phase = Phase("guidance", loss=loss, trains=("student",))
  else:
    loss = functools.partial(progressive.progressive_loss, student="student", teacher=w_teacher,
                             num_steps=n0, weighting=str(cfg.weighting), guidance=1.0,
                             embed_w=True, guidance_range=w_range,
                             label_dropout=float(cfg.label_dropout))
    phase = Phase("progressive", loss=loss, trains=("student",))
  stages = ()
  if not cfg.stage_part and part != "guidance":
    progressive.check_halvable(n0, n_stages)
    halving = [Stage(steps=int(cfg.stage_steps),
                     overrides={"stage_part": "progressive", "student_steps": n0 // 2 ** i},
                     promote={w_teacher: "student"} if (i or part == "both") else {},
                     reset_opt=bool(i or part == "both"))
               for i in range(n_stages)]
    if part == "both":
      halving.insert(0, Stage(steps=int(cfg.guidance_steps),
                              overrides={"stage_part": "guidance"}))
    stages = tuple(halving)
  return Objective(networks=tuple(networks), phases=(phase,), stages=stages,
                   student="student", sampler="ddim", evaluates_as="student",
                   student_steps=None if running == "guidance" else n0, distils_guidance=True)
