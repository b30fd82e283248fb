"""`lcm` and `segmented_cm`: discrete consistency distillation over the teacher's DDIM grid
(LCM, Luo et al. 2023; segment-wise consistency as in PCM / MLCM / Hyper-SD's TSCD).

    python -m launch.train --config configs/toy/lcm.py:gmm --workdir runs/toy_lcm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm
    python -m launch.train --config configs/toy/segmented_cm.py:gmm --workdir runs/toy_pcm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

The grid is the teacher process's own N-step grid, `process.timesteps(num_ddim_steps)`
(descending t_0 = t_max > ... > t_N = t_end; for SD's vp_discrete with "trailing" spacing and
N = 50 these are diffusers' LCM timesteps 999, 979, ..., 19 and the skipping step k = 20). One
training step, per sample:

    n ~ U{0..N-1},  t = t_n,  t' = t_{n+1}         (t' is one teacher solver step below t)
    x_t = alpha_t x0 + sigma_t eps                 (or, MLCM, `states="teacher"`: x_t on the
                                                    CFG teacher's own DDIM trajectory from noise)
    w ~ U[w_min, w_max];  teacher CFG  u + w (c - u) of its x0 and eps (LCM's w_LCM = w - 1)
    x_t' = alpha_t' x0_cfg + sigma_t' eps_cfg      (one DDIM step of the guided teacher)
    loss = mean d(f_theta(x_t, t), sg f_theta-(x_t', t'))

with d = squared error ("l2") or diffusers' element-wise pseudo-Huber sqrt(diff^2 + c^2) - c
("huber"), and theta- the EMA of the student (`target="ema"`, decay `target_decay`; it is also
the evaluated weights, as LCM ships its target network) or the student itself under
stop-gradient (`target="online"`, LCM-LoRA). The consistency function f:

- `lcm`: f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t), LCM's boundary scalings of the
  timestep (`processes.lcm_boundary_scalings`, sigma_data 0.5, timestep scaling 10); sampled
  with the `lcm` solver, which applies the same scalings (diffusers' LCMScheduler).
- `segmented_cm`: M = `num_segments` segments with edges every N / M grid points (edge times
  = the process's own M-step grid for uniform spacings); f maps x_t to the lower edge s of its
  segment by a DDIM jump, alpha_s x0_hat + sigma_s eps_hat (PCM's c_skip = 0, c_out = 1); the
  target is x_t' itself when t' is that edge. M = 1 is LCM with an exact boundary. Sampled
  with `ddim` (M steps: from edge to edge). `segment_stages = (8, 4, 2, 1)` with
  `stage_steps` runs Hyper-SD's progressive TSCD as engine stages: each stage's evaluated
  student (under `target="ema"` its EMA, which also restarts the student) becomes the next
  stage's teacher (promotion, optimizer and EMA reset).

Networks: "teacher" (frozen), "student" (init from the teacher; `guidance_embed` adds LCM's
w-embedding, zero-initialised so the student starts as the teacher; `lora_rank` > 0: a LoRA
adapter over the shared teacher weights, LCM-LoRA, with the online target).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from distill import processes as procs
from distill.context import to_kind
from distill.objective import LoRA, Network, Objective, Phase, Stage, register_objective
from distill.objectives.matching import bcast, guided, per_example_mean, step_cond

COMMON = {
    # N: the teacher solver's grid, process.timesteps(N) (LCM: 50 DDIM steps, k = 1000 / N).
    "num_ddim_steps": 50,
    # CFG scale w ~ U[lo, hi] of the teacher step, u + w (c - u) (1, 1: no guidance; LCM's SD1.5
    # range w_LCM in [5, 15] is (6, 16) here).
    "guidance_range": (1.0, 1.0),
    # The student embeds w (LCM's time_cond_proj; a new zero-initialised embedding).
    "guidance_embed": False,
    # Target network theta-: "ema" (EMA of the student, decay target_decay; also the evaluated
    # weights) or "online" (the student under stop-gradient, LCM-LoRA).
    "target": "ema",
    "target_decay": 0.95,
    # Distance: "l2" (mean squared error) or "huber" (element-wise sqrt(d^2 + c^2) - c).
    "loss": "l2",
    "huber_c": 1e-3,
    # Probability of the null class for a sample (teacher, student and target alike), so the
    # student keeps its unconditional path.
    "label_dropout": 0.1,
    # Training states: "data" (noised data) or "teacher" (MLCM: the guided teacher's own DDIM
    # trajectory from noise; costs up to N teacher calls per step).
    "states": "data",
    # LCM-LoRA / PCM-LoRA: rank > 0 trains a LoRA adapter (kernels matching lora_pattern,
    # multiplier lora_alpha / rank, 0: alpha = rank) over the frozen teacher's shared weights
    # instead of a full copy; the target is then the online student (no EMA), as LCM-LoRA.
    "lora_rank": 0,
    "lora_pattern": r"block_\d+",
    "lora_alpha": 0.0,
}
LCM_DEFAULTS = {**COMMON, "sigma_data": 0.5, "timestep_scaling": 10.0}
SEGMENTED_DEFAULTS = {**COMMON, "num_segments": 4, "segment_stages": (), "stage_steps": 0}


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def ddim_jump(x0_hat, eps_hat, process, s):
  """alpha_s x0_hat + sigma_s eps_hat: the first-order (DDIM) jump to time s."""
  alpha, sigma = process.alpha_sigma(s)
  return bcast(alpha, x0_hat) * x0_hat + bcast(sigma, eps_hat) * eps_hat


def segment_edges(num_steps: int, num_segments: int) -> np.ndarray:
  """Grid indices (descending grid, 0 = t_max) of each interval's lower segment edge:
  interval n = [t_{n+1}, t_n] lies in segment n // K (K = N / M) whose lower edge is
  t_{(n // K + 1) K}."""
  if num_segments < 1 or num_steps % num_segments:
    raise ValueError(f"config keys 'objective.num_ddim_steps' / 'objective.num_segments': the "
                     f"{num_steps} grid steps must split into {num_segments} equal segments")
  k = num_steps // num_segments
  n = np.arange(num_steps)
  return ((n // k + 1) * k).astype(np.int32)


def distance(a, b, kind: str, huber_c: float):
  """Per-sample mean over elements of the squared error or the element-wise pseudo-Huber."""
  d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  if kind == "l2":
    return per_example_mean(jnp.square(d))
  return per_example_mean(jnp.sqrt(jnp.square(d) + huber_c ** 2) - huber_c)


def draw_inputs(rng, x0, *, num_steps: int, guidance_range=(1.0, 1.0),
                label_dropout: float = 0.0) -> dict:
  """The random draws of one loss call: grid index n (B,), eps (like x0), w (B,) and `null`
  (B,), True where a sample's label becomes the null class (matching.step_cond)."""
  b = x0.shape[0]
  k_n, k_e, k_w, k_d = jax.random.split(rng, 4)
  lo, hi = (float(v) for v in guidance_range)
  return {"n": jax.random.randint(k_n, (b,), 0, num_steps),
          "eps": jax.random.normal(k_e, x0.shape, jnp.float32),
          "w": jax.random.uniform(k_w, (b,), jnp.float32, lo, hi),
          "null": jax.random.bernoulli(k_d, label_dropout, (b,))}


def teacher_ddim_step(ctx, teacher: str, x_t, t, t_next, cond, w, guidance: bool,
                      extras=None):
  """One DDIM step t -> t_next of the teacher with CFG u + w (c - u) on x0 and eps; with
  `extras` (a w-conditioned teacher's inputs, `ctx.guidance_inputs`) one plain pass instead."""
  info = ctx.nets[teacher]
  if extras:
    raw = ctx.apply(teacher, x_t, t, cond, **extras)
  else:
    raw = guided(ctx, teacher, x_t, t, cond, w if guidance else 1.0, kind="raw")
  x0 = to_kind(info, raw, "x0", x_t, t)
  eps = to_kind(info, raw, "eps", x_t, t)
  return ddim_jump(x0, eps, info.process, t_next)


def teacher_trajectory_state(ctx, teacher: str, noise, grid, n, cond, w, guidance: bool):
  """x at grid index n (per sample) of the guided teacher's DDIM trajectory from `noise` at
  grid[0] (MLCM's training states): a scan over the grid, keeping each sample's state at its
  own index."""
  b = noise.shape[0]

  def body(x, i):
    t = jnp.full((b,), grid[i])
    x_next = teacher_ddim_step(ctx, teacher, x, t, jnp.full((b,), grid[i + 1]), cond, w,
                               guidance)
    keep = bcast(i < n, x)           # samples whose index is not reached yet move on
    return jnp.where(keep, x_next, x), None

  x, _ = jax.lax.scan(body, noise, jnp.arange(grid.shape[0] - 1))
  return jax.lax.stop_gradient(x)


# The consistency functions f(ctx, net, x, t, cond, params, extras, **kind's keywords).


def lcm_consistency(ctx, net, x, t, cond, params, extras, *, sigma_data: float,
                    timestep_scaling: float, **_):
  """c_skip(t) x + c_out(t) x0_hat(x, t) with LCM's boundary scalings of the timestep."""
  info = ctx.nets[net]
  x0 = ctx.x0(net, x, t, cond, params=params, **extras)
  c_skip, c_out = procs.lcm_boundary_scalings(info.process.timestep(t), sigma_data,
                                              timestep_scaling)
  return bcast(c_skip, x) * x + bcast(c_out, x) * x0


def segment_consistency(ctx, net, x, t, cond, params, extras, *, edge_t, at_edge=None, **_):
  """The DDIM jump of the network's (x0, eps) at (x, t) to its segment's lower edge; x itself
  where `at_edge` (t is that edge: the boundary condition)."""
  info = ctx.nets[net]
  raw = ctx.apply(net, x, t, cond, params=params, **extras)
  jump = ddim_jump(to_kind(info, raw, "x0", x, t), to_kind(info, raw, "eps", x, t),
                   info.process, edge_t)
  if at_edge is None:
    return jump
  return jnp.where(bcast(at_edge, x), jnp.asarray(x, jump.dtype), jump)


CONSISTENCY = {"lcm": lcm_consistency, "segmented_cm": segment_consistency}


def discrete_cm_loss_given(trainable, ctx, batch, draws: dict, *, student: str, teacher: str,
                           kind: str, num_steps: int, num_segments: int, guidance: bool,
                           guidance_embed: bool, target: str, loss: str, huber_c: float,
                           states: str, **scalings):
  """The loss for given draws; see the module docstring."""
  info = ctx.nets[teacher]
  process = info.process
  grid = jnp.asarray(process.timesteps(num_steps), jnp.float32)
  x0 = jnp.asarray(batch["x"], jnp.float32)
  n, eps, w = draws["n"], draws["eps"], draws["w"]
  t, t_next = grid[n], grid[n + 1]
  cond = step_cond(ctx, batch, draws, teacher)
  if states == "teacher":
    x_t = teacher_trajectory_state(ctx, teacher, process.prior_std * eps, grid, n, cond, w,
                                   guidance)
  else:
    alpha, sigma = process.alpha_sigma(t)
    x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * eps
  x_next = jax.lax.stop_gradient(
      teacher_ddim_step(ctx, teacher, x_t, t, t_next, cond, w, guidance))

  extras = ctx.guidance_inputs(student, w) if guidance_embed else {}
  f = functools.partial(CONSISTENCY[kind], **scalings)
  edge_kw = {}
  if kind == "segmented_cm":
    edge_idx = jnp.asarray(segment_edges(num_steps, num_segments))[n]
    edge_kw = {"edge_t": grid[edge_idx]}
  online = f(ctx, student, x_t, t, cond, trainable[student], extras, **edge_kw)
  theta_minus = (ctx.ema[student]["eval"] if target == "ema"
                 else jax.lax.stop_gradient(trainable[student]))
  if kind == "segmented_cm":
    edge_kw["at_edge"] = (n + 1) == edge_idx
  tgt = jax.lax.stop_gradient(f(ctx, student, x_next, t_next, cond, theta_minus, extras,
                                **edge_kw))
  per = distance(online, tgt, loss, huber_c)
  return jnp.mean(per), {"t_mean": jnp.mean(t)}


def discrete_cm_loss(trainable, ctx, batch, rng, t, *, num_steps: int,
                     guidance_range=(1.0, 1.0), label_dropout: float = 0.0, **kw):
  draws = draw_inputs(rng, batch["x"], num_steps=num_steps, guidance_range=guidance_range,
                      label_dropout=label_dropout)
  return discrete_cm_loss_given(trainable, ctx, batch, draws, num_steps=num_steps, **kw)


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def choice(cfg, key: str, options: tuple) -> str:
  """cfg[key] as a string, one of `options` (else one line naming the key)."""
  v = str(cfg[key])
  if v not in options:
    raise ValueError(f"config key 'objective.{key}': expected one of {options}, got {v!r}")
  return v


def guidance_range(cfg) -> tuple[float, float]:
  """cfg.guidance_range as (lo, hi) with lo <= hi (else one line naming the key)."""
  lo, hi = (float(v) for v in cfg.guidance_range)
  if lo > hi:
    raise ValueError(f"config key 'objective.guidance_range': expected (lo, hi) with lo <= hi, "
                     f"got {tuple(cfg.guidance_range)}")
  return lo, hi


def _build(cfg, kind: str, sampler: str, num_segments: int = 1,
           scalings: Optional[dict] = None, stages: tuple = ()) -> Objective:
  target = choice(cfg, "target", ("ema", "online"))
  if int(cfg.lora_rank) < 0:
    raise ValueError(f"config key 'objective.lora_rank': expected >= 0 (0: no LoRA), got "
                     f"{cfg.lora_rank}")
  lora = int(cfg.lora_rank) > 0
  if lora and target != "online":
    raise ValueError("config key 'objective.target': a LoRA student (lora_rank > 0) uses the "
                     "online target (LCM-LoRA), set target='online'")
  if lora and cfg.guidance_embed:
    raise ValueError("config key 'objective.guidance_embed': a LoRA student cannot add a w "
                     "embedding to the shared teacher (LCM-LoRA does not embed w)")
  lo, hi = guidance_range(cfg)
  num_steps = int(cfg.num_ddim_steps)
  if kind == "segmented_cm":
    segment_edges(num_steps, num_segments)   # validates the split
  loss = functools.partial(
      discrete_cm_loss, student="student", teacher="teacher", kind=kind, num_steps=num_steps,
      num_segments=num_segments, guidance=(lo, hi) != (1.0, 1.0),
      guidance_embed=bool(cfg.guidance_embed), guidance_range=(lo, hi), target=target,
      loss=choice(cfg, "loss", ("l2", "huber")), huber_c=float(cfg.huber_c),
      states=choice(cfg, "states", ("data", "teacher")),
      label_dropout=float(cfg.label_dropout), **(scalings or {}))
  networks = [Network("teacher", init="checkpoint", trainable=None)]
  if lora:
    # With stages the teacher becomes each stage's merged student, so the adapter keeps the
    # original weights as its own frozen base (one LoRA over the original model at the end).
    base = "base" if stages else "teacher"
    if stages:
      networks.append(Network("base", init="checkpoint", trainable=None))
    student = Network("student", init="teacher", base=base,
                      adapter=LoRA(str(cfg.lora_pattern), rank=int(cfg.lora_rank),
                                   alpha=float(cfg.lora_alpha) or None))
  else:
    kwargs = {"guidance_embed": True} if cfg.guidance_embed else {}
    student = Network("student", init="teacher", kwargs=kwargs)
  ema = {"student": {"eval": float(cfg.target_decay)}} if target == "ema" else {}
  return Objective(
      networks=tuple(networks) + (student,),
      phases=(Phase(kind, loss=loss, trains=("student",)),), ema=ema, stages=stages,
      student="student", sampler=sampler, evaluates_as="student",
      student_steps=num_segments if kind == "segmented_cm" else None,
      distils_guidance=(lo, hi) != (1.0, 1.0))


def lcm_sampler(num_ddim_steps: int, sigma_data: float, timestep_scaling: float) -> str:
  """The `lcm` sampler spec of a student trained with these settings: its grid on the
  `num_ddim_steps` lattice it was trained on, its boundary scalings; the plain name at LCM's
  defaults (50, 0.5, 10), which diffusers' LCMScheduler defaults to as well."""
  options = []
  if float(timestep_scaling) != LCM_DEFAULTS["timestep_scaling"]:
    options.append(f"timestep_scaling={float(timestep_scaling)!r}")
  if float(sigma_data) != LCM_DEFAULTS["sigma_data"]:
    options.append(f"sigma_data={float(sigma_data)!r}")
  if int(num_ddim_steps) != LCM_DEFAULTS["num_ddim_steps"]:
    options.append(f"grid_kwargs={{'original_steps': {int(num_ddim_steps)}}}")
  return f"lcm({', '.join(options)})" if options else "lcm"


@register_objective("lcm", defaults=LCM_DEFAULTS)
def build_lcm(cfg) -> Objective:
  return _build(cfg, "lcm", lcm_sampler(cfg.num_ddim_steps, cfg.sigma_data, cfg.timestep_scaling),
                scalings={"sigma_data": float(cfg.sigma_data),
                          "timestep_scaling": float(cfg.timestep_scaling)})


@register_objective("segmented_cm", defaults=SEGMENTED_DEFAULTS)
def build_segmented(cfg) -> Objective:
  schedule = tuple(int(m) for m in cfg.segment_stages)
  stages = ()
  if schedule:
    if int(cfg.stage_steps) <= 0:
      raise ValueError("config key 'objective.stage_steps': segment_stages needs the steps of "
                       "each stage (> 0)")
    # The finished stage's evaluated student goes on: the online weights, or under the EMA
    # target its average, which then starts the next stage's student as well.
    promote = ({"teacher": "student@eval", "student": "student@eval"}
               if choice(cfg, "target", ("ema", "online")) == "ema" else {"teacher": "student"})
    stages = tuple(Stage(steps=int(cfg.stage_steps), overrides={"num_segments": m},
                         promote=promote if i else {}, reset_opt=bool(i), reset_ema=bool(i))
                   for i, m in enumerate(schedule))
  return _build(cfg, "segmented_cm", "ddim", num_segments=int(cfg.num_segments), stages=stages)
