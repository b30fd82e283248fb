"""`agd`: adapter guidance distillation (Jensen & Sadat, TMLR 2025): a frozen base model plus a
small trained adapter that takes the guidance scale w, so that one pass does what CFG does in
two, trained on the CFG sampler's own trajectories.

    python -m launch.train --config configs/toy/agd.py:gmm --workdir runs/toy_agd \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The student is the teacher plus the adapter: a zero-initialised guidance embedding
(`guidance_embed`: an MLP of the sinusoidal embedding of w added to the conditioning) and,
with `adapter_hidden` > 0, AGD's additive per-block adapters (`guidance_adapter`: after every
block, an offset MLP of the conditioning, time + class + w, zero-initialised output). Only
parameters matching `adapter_params` (a regex) are trained: the base weights stay the
teacher's, and the student starts as the conditional teacher. Per sample:

    w ~ U[w_min, w_max]  (CFG u + w (c - u))
    x_t: `states="teacher"` (AGD): n ~ U{0..N-1} DDIM steps of the CFG teacher at w from noise
         on its N-step grid (`trajectory_steps`), so the adapter learns on the states the
         guided sampler visits; `states="data"`: noised data at a grid time (the ablation)
    loss = mean ||eps_student(x_t, t, c; w) - [u + w (c - u)](eps_teacher(x_t, t))||^2

(the target in eps space, as AGD regresses the guided noise prediction). Sample the student
with `eval.guidance = w`: one network call per step against CFG's two.

Networks: "teacher" (frozen), "student" (init from the teacher, adapter trained).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill.context import to_kind
from distill.objective import Network, Objective, Phase, register_objective
from distill.objectives.lcm import (choice, draw_inputs, guidance_range,
                                    teacher_trajectory_state)
from distill.objectives.matching import bcast, guided, per_example_mean, step_cond

DEFAULTS = {
    "guidance_range": (1.0, 4.0),       # w ~ U[lo, hi]
    "states": "teacher",                # teacher (CFG trajectories) | data (noised data)
    "trajectory_steps": 16,             # N: the guided sampler's DDIM grid of the states
    # The adapter: per-block additive offsets of this hidden width (models with a
    # `guidance_adapter` option: the toy MLP, DiT, the SD UNet; 0: the guidance embedding alone).
    "adapter_hidden": 64,
    "adapter_params": "guidance_embed|guidance_adapter",  # regex of the trained parameters
    "label_dropout": 0.1,               # null-class probability per sample
}


def agd_loss_given(trainable, ctx, batch, draws: dict, *, student: str, teacher: str,
                   num_steps: int, states: str):
  """The loss for given draws (n, eps, w, null; lcm.draw_inputs); see the module docstring."""
  process = ctx.nets[teacher].process
  grid = jnp.asarray(process.timesteps(num_steps), jnp.float32)
  x0 = jnp.asarray(batch["x"], jnp.float32)
  n, w = draws["n"], draws["w"]
  t = grid[n]
  cond = step_cond(ctx, batch, draws, teacher)
  if states == "teacher":
    x_t = teacher_trajectory_state(ctx, teacher, process.prior_std * draws["eps"], grid, n,
                                   cond, w, True)
  else:
    alpha, sigma = process.alpha_sigma(t)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * draws["eps"]
  target = jax.lax.stop_gradient(guided(ctx, teacher, x_t, t, cond, w, kind="eps"))
  out = ctx.apply(student, x_t, t, cond, params=trainable[student],
                  **ctx.guidance_inputs(student, w))
  eps = to_kind(ctx.nets[student], out, "eps", x_t, t)
  mse = per_example_mean(jnp.square(jnp.asarray(eps, jnp.float32) - target))
  return jnp.mean(mse), {"t_mean": jnp.mean(t)}


def agd_loss(trainable, ctx, batch, rng, t, *, num_steps: int, guidance_range,
             label_dropout: float, **kw):
  draws = draw_inputs(rng, batch["x"], num_steps=num_steps, guidance_range=guidance_range,
                      label_dropout=label_dropout)
  return agd_loss_given(trainable, ctx, batch, draws, num_steps=num_steps, **kw)


@register_objective("agd", defaults=DEFAULTS)
def build(cfg) -> Objective:
  states = choice(cfg, "states", ("teacher", "data"))
  lo, hi = guidance_range(cfg)
  if int(cfg.trajectory_steps) < 1:
    raise ValueError("config key 'objective.trajectory_steps': expected >= 1")
  kwargs = {"guidance_embed": True}
  if int(cfg.adapter_hidden) > 0:
    kwargs["guidance_adapter"] = int(cfg.adapter_hidden)
  loss = functools.partial(agd_loss, student="student", teacher="teacher",
                           num_steps=int(cfg.trajectory_steps), states=states,
                           guidance_range=(lo, hi), label_dropout=float(cfg.label_dropout))
  return Objective(
      networks=(Network("teacher", init="checkpoint", trainable=None),
                Network("student", init="teacher", kwargs=kwargs,
                        trainable=str(cfg.adapter_params))),
      phases=(Phase("agd", loss=loss, trains=("student",)),),
      student="student", sampler="euler", evaluates_as="student", real_data=states == "data",
      distils_guidance=True)
