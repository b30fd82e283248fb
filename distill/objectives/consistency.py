"""`cd`, `ct` and `ect`: discrete-time consistency models in EDM coordinates (Song et al. 2023;
iCT, Song & Dhariwal 2023; ECT, Geng et al. 2024).

    python -m launch.train --config configs/toy/cd.py:gmm --workdir runs/toy_cd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm
    (configs/toy/ct.py, configs/toy/ect.py alike)

The student is presented in EDM coordinates (x = x0 + sigma z, sigma in [sigma_min,
sigma_max]) by the wrapper `edm_consistency` (distill/wrappers.py): any EDM, rectified-flow or
TrigFlow network becomes the consistency function

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F,   F = (D(x, sigma) - c_skip^EDM x) / c_out^EDM

with the boundary scalings c_skip = sd^2 / ((sigma - sigma_min)^2 + sd^2), c_out = (sigma -
sigma_min) sd / sqrt(sigma^2 + sd^2), so f(x, sigma_min) = x exactly, and D the network's own
denoiser (`objective.boundary=False`: f = D, ECT's training-time preconditioning). It is
sampled with the `cm` solver (CM multistep: f at Karras times, re-noised in between).

One training step, per sample, with (t, t2), t > t2, a pair of noise levels:

    x_t = x0 + t z
    x_t2 = the teacher's Heun (or Euler) step of its PF-ODE from (x_t, t) to t2   (cd; the
           teacher's own process, read in EDM coordinates; CFG u + w (c - u), w ~ U[range])
         = x0 + t2 z                                                             (ct, ect)
    loss = mean_b lambda(t, t2) d(f_theta(x_t, t), sg f_theta-(x_t2, t2))   (= x0 when t2 = 0)

- `cd`: t = sigma(n), t2 = sigma(n + 1) on the N-point Karras grid sigma(i) = (smax^(1/rho) +
  i / (N - 1) (smin^(1/rho) - smax^(1/rho)))^rho, n ~ U{0..N-2}; theta- the student's EMA
  (`target="ema"`, decay mu = `target_decay`) or the student under stop-gradient ("online").
- `ct`: the same grid with N(k) from a curriculum over the step k: "progressive" (CT:
  N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1, with the adaptive target decay
  mu(k) = exp(s0 ln mu0 / (N(k) - 1))), "exponential" (iCT: N(k) = min(s0 2^floor(k / K'), s1)
  + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)), online target) or "fixed" (N = num_scales);
  the index n uniform or, iCT, log-normal: p(n) ~ erf((ln sigma(n) - P_mean) / (sqrt 2 P_std))
  - erf((ln sigma(n + 1) - P_mean) / (sqrt 2 P_std)).
- `ect`: t = exp(P_mean + P_std xi), t2 = r = max(0, t (1 - q^-(s + 1) (1 + k sigmoid(-b t))))
  with the stage s = floor(step / double_every); online target.

d: "l2" (mean squared error over elements) or "pseudo_huber" (iCT, over the whole sample
vector: sqrt(||a - b||^2 + c^2) - c with c = huber_c sqrt(D); huber_c = 0 is ECT's plain
L2 norm). lambda: `WEIGHTINGS` ("uniform", "snr" = 1 / t^2, "snr+1", "karras" = 1 / t^2 +
1 / sd^2, "truncated_snr", "inverse_step" = 1 / (t - t2): iCT, and ECT's adaptive weighting).

Networks: "teacher" (the checkpoint, frozen; in ct / ect only the reference of the eval rows),
"student" (init from the teacher behind the wrapper, or random with `init="random"` for ct;
EMA roles "target" (cd / ct with an EMA target) and "eval" (`ema_decay` > 0: the evaluated
weights)). Dropout-free models need no shared dropout key; the reference codes share one
between the online and target passes.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from distill import wrappers
from distill.objective import Network, Objective, Phase, register_objective
from distill.objectives.lcm import choice, guidance_range
from distill.objectives.matching import bcast, guided, per_example_mean, per_example_sum, step_cond

COMMON = {
    # The student's EDM coordinates: sigma range, data std sigma_d (0.5 for images in [-1, 1];
    # the toy data's ~1) and the Karras grid's rho.
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "rho": 7.0,
    # The consistency boundary scalings (f(x, sigma_min) = x); False: f = the network's D.
    "boundary": True,
    # Distance d: "l2" (mean squared error) or "pseudo_huber" (c = huber_c sqrt(D)).
    "loss": "l2",
    "huber_c": 0.00054,
    # lambda(t, t2), see WEIGHTINGS.
    "weighting": "uniform",
    # Probability of the null class for a sample (every network of the step alike).
    "label_dropout": 0.1,
    # Decay of the student's `eval` EMA (the evaluated weights); 0 = evaluate the raw weights.
    "ema_decay": 0.0,
}
CD_DEFAULTS = {
    **COMMON,
    "num_scales": 18,             # N of the Karras grid (CM: 18 on CIFAR-10, 40 on ImageNet-64)
    "target": "ema",              # theta-: "ema" (decay target_decay) or "online" (sg theta)
    "target_decay": 0.95,
    "teacher_solver": "heun",     # the teacher's step t -> t2: "heun" (2 calls) or "euler"
    "guidance_range": (1.0, 1.0),  # CFG scale of the teacher step, w ~ U[lo, hi]
}
CT_DEFAULTS = {
    **COMMON,
    "init": "teacher",            # "teacher" (a copy behind the wrapper) or "random" (model.*)
    "curriculum": "progressive",  # "progressive" (CT), "exponential" (iCT) or "fixed"
    "curriculum_steps": 0,        # K of the curriculum (0: required for progressive/exponential)
    "start_scales": 2,            # s0
    "end_scales": 150,            # s1
    "num_scales": 18,             # N of "fixed"
    "target": "ema",              # "ema" (decay: progressive's mu(k), else target_decay) / "online"
    "start_ema": 0.9,             # mu0 of the progressive curriculum's adaptive decay
    "target_decay": 0.95,         # the EMA target's decay for "fixed" / "exponential"
    "index_sampling": "uniform",  # n ~ "uniform" or "lognormal" (iCT, p_mean / p_std)
    "p_mean": -1.1,
    "p_std": 2.0,
}
ECT_DEFAULTS = {
    **COMMON,
    "loss": "pseudo_huber",
    "huber_c": 0.0,               # 0: ECT's plain L2 norm ||a - b||
    "weighting": "inverse_step",  # 1 / (t - r); ECT's ImageNet branch: "karras"
    "p_mean": -1.1,
    "p_std": 2.0,
    "q": 2.0,                     # r(t) tightens by 1 / q per stage
    "k": 8.0,
    "b": 1.0,
    "double_every": 1000,         # steps per stage
}

# lambda(t, t2, sigma_data) per sample.
WEIGHTINGS = {
    "uniform": lambda t, t2, sd: jnp.ones_like(t),
    "snr": lambda t, t2, sd: 1.0 / jnp.square(t),
    "snr+1": lambda t, t2, sd: 1.0 / jnp.square(t) + 1.0,
    "karras": lambda t, t2, sd: 1.0 / jnp.square(t) + 1.0 / sd ** 2,
    "truncated_snr": lambda t, t2, sd: jnp.maximum(1.0 / jnp.square(t), 1.0),
    "inverse_step": lambda t, t2, sd: 1.0 / (t - t2),
}


# --------------------------------------------------------------------------------------------
# Grids and curricula (pure; N may be traced)
# --------------------------------------------------------------------------------------------


def karras_sigma(i, num_scales, sigma_min: float, sigma_max: float, rho: float):
  """sigma(i) of the num_scales-point Karras grid from sigma_max (i = 0) to sigma_min."""
  i = jnp.asarray(i, jnp.float32)
  n = jnp.asarray(num_scales, jnp.float32)
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (hi + i / (n - 1.0) * (lo - hi)) ** rho


def progressive_scales(step, total: int, s0: int, s1: int):
  """CT's N(k) - 1 = max(1, ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1)) (int32)."""
  k = jnp.asarray(step, jnp.float32)
  n = jnp.ceil(jnp.sqrt(k / total * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1.0)
  return jnp.maximum(n, 1.0).astype(jnp.int32)


def progressive_decay(step, total: int, s0: int, s1: int, mu0: float):
  """CT's adaptive target decay mu(k) = exp(s0 ln mu0 / (N(k) - 1))."""
  n = progressive_scales(step, total, s0, s1).astype(jnp.float32)
  return jnp.exp(s0 * math.log(mu0) / n)


def exponential_scales(step, total: int, s0: int, s1: int):
  """iCT's N(k) - 1 = min(s0 2^floor(k / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1))."""
  k_prime = max(1, int(total // (math.log2(s1 // s0) + 1)))
  doublings = jnp.floor(jnp.asarray(step, jnp.float32) / k_prime)
  return jnp.minimum(s0 * jnp.exp2(doublings), s1).astype(jnp.int32)


def lognormal_index_logits(num_scales, max_scales: int, sigma_min: float, sigma_max: float,
                           rho: float, p_mean: float, p_std: float):
  """Log-probabilities of n in 0..max_scales-2 (those >= N - 1 masked out) of iCT's discrete
  log-normal proposal over the N-point grid."""
  i = jnp.arange(max_scales - 1, dtype=jnp.float32)
  cdf = lambda s: jax.scipy.special.erf((jnp.log(s) - p_mean) / (math.sqrt(2.0) * p_std))
  hi = karras_sigma(i, num_scales, sigma_min, sigma_max, rho)
  lo = karras_sigma(i + 1, num_scales, sigma_min, sigma_max, rho)
  mass = jnp.maximum(cdf(hi) - cdf(lo), 1e-30)
  return jnp.where(i < num_scales - 1, jnp.log(mass), -jnp.inf)


def ect_r(t, stage, q: float, k: float, b: float):
  """ECT's r(t) = max(0, t (1 - q^-(stage + 1) (1 + k sigmoid(-b t))))."""
  decay = jnp.power(q, -(jnp.asarray(stage, jnp.float32) + 1.0))
  return jnp.maximum(t * (1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * t))), 0.0)


# --------------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------------


def _shared_draws(rng, x0, guidance=(1.0, 1.0), label_dropout: float = 0.0) -> dict:
  b = x0.shape[0]
  k_z, k_w, k_d = jax.random.split(rng, 3)
  lo, hi = (float(v) for v in guidance)
  return {"z": jax.random.normal(k_z, x0.shape, jnp.float32),
          "w": jax.random.uniform(k_w, (b,), jnp.float32, lo, hi),
          "null": jax.random.bernoulli(k_d, label_dropout, (b,))}


def grid_draws(rng, x0, num_scales, *, sigma_min: float, sigma_max: float, rho: float,
               index_sampling: str = "uniform", max_scales: int = 0, p_mean: float = -1.1,
               p_std: float = 2.0, guidance=(1.0, 1.0), label_dropout: float = 0.0) -> dict:
  """cd / ct draws: grid index n (B,), its pair t = sigma(n) > t2 = sigma(n + 1), noise z,
  guidance w and the null-label mask."""
  b = x0.shape[0]
  k_n, k_rest = jax.random.split(rng)
  if index_sampling == "lognormal":
    logits = lognormal_index_logits(num_scales, max_scales, sigma_min, sigma_max, rho, p_mean,
                                    p_std)
    n = jax.random.categorical(k_n, logits, shape=(b,))
  else:
    n = jax.random.randint(k_n, (b,), 0, jnp.asarray(num_scales, jnp.int32) - 1)
  sig = functools.partial(karras_sigma, num_scales=num_scales, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho)
  return {"n": n, "t": sig(n), "t2": sig(n + 1),
          **_shared_draws(k_rest, x0, label_dropout=label_dropout, guidance=guidance)}


def ect_draws(rng, x0, stage, *, p_mean: float, p_std: float, q: float, k: float, b: float,
              label_dropout: float = 0.0) -> dict:
  """ect draws: t = exp(P_mean + P_std xi), t2 = r(t), noise z and the null-label mask."""
  k_t, k_rest = jax.random.split(rng)
  t = jnp.exp(p_mean + p_std * jax.random.normal(k_t, (x0.shape[0],), jnp.float32))
  return {"t": t, "t2": ect_r(t, stage, q, k, b),
          **_shared_draws(k_rest, x0, label_dropout=label_dropout)}


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def distance(a, b, kind: str, huber_c: float):
  """Per sample: mean squared error ("l2") or sqrt(||a - b||^2 + c^2) - c, c = huber_c sqrt(D)
  ("pseudo_huber"; huber_c = 0: the L2 norm, with a zero gradient where a = b)."""
  d = jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)
  if kind == "l2":
    return per_example_mean(jnp.square(d))
  c = huber_c * math.sqrt(math.prod(d.shape[1:]))
  sq = per_example_sum(jnp.square(d)) + c ** 2
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0) - c


def teacher_denoiser(ctx, teacher: str, x_e, sigma, cond, w, guidance: bool):
  """The teacher's D(x_e, sigma) in EDM coordinates (its own process read through
  wrappers.as_edm_x0), with CFG u + w (c - u) when `guidance`."""
  info = ctx.nets[teacher]
  apply_inner = lambda x, s: guided(ctx, teacher, x, s, cond, w if guidance else 1.0, "raw")
  return wrappers.as_edm_x0(apply_inner, info.process, info.prediction, x_e, sigma)


def teacher_step(ctx, teacher: str, x, t, t2, cond, w, guidance: bool, solver: str):
  """One Heun (EDM's, second order) or Euler step of the teacher's PF-ODE dx/dsigma =
  (x - D(x, sigma)) / sigma from t to t2 > 0."""
  D = lambda y, s: teacher_denoiser(ctx, teacher, y, s, cond, w, guidance)
  d1 = (x - D(x, t)) / bcast(t, x)
  x_euler = x + bcast(t2 - t, x) * d1
  if solver == "euler":
    return x_euler
  d2 = (x_euler - D(x_euler, t2)) / bcast(t2, x)
  return x + bcast(t2 - t, x) * 0.5 * (d1 + d2)


def cm_loss_given(trainable, ctx, batch, draws: dict, *, student: str, teacher: str,
                  kind: str, target: str, loss: str, huber_c: float, weighting: str,
                  teacher_solver: str = "heun", guidance: bool = False):
  """The loss for given draws (t, t2, z, w, null); see the module docstring."""
  sd = float(ctx.nets[student].process.sigma_data)
  x0 = jnp.asarray(batch["x"], jnp.float32)
  t, t2, z, w = draws["t"], draws["t2"], draws["z"], draws["w"]
  cond = step_cond(ctx, batch, draws, student)
  x_t = x0 + bcast(t, x0) * z
  if kind == "cd":
    x_t2 = teacher_step(ctx, teacher, x_t, t, t2, cond, w, guidance, teacher_solver)
  else:
    x_t2 = x0 + bcast(t2, x0) * z
  x_t2 = jax.lax.stop_gradient(x_t2)

  online = ctx.x0(student, x_t, t, cond, params=trainable[student])
  theta_minus = (ctx.ema[student]["target"] if target == "ema"
                 else jax.lax.stop_gradient(trainable[student]))
  positive = t2 > 0
  f_minus = ctx.x0(student, x_t2, jnp.where(positive, t2, 1.0), cond, params=theta_minus)
  tgt = jax.lax.stop_gradient(jnp.where(bcast(positive, x0), f_minus, x_t2))
  lam = WEIGHTINGS[weighting](t, t2, sd)
  per = lam * distance(online, tgt, loss, huber_c)
  return jnp.mean(per), {"t_mean": jnp.mean(t), "gap_mean": jnp.mean(t - t2),
                         "distance": jnp.mean(per / lam)}


def num_scales_at(step, *, curriculum: str, num_scales: int, total: int, s0: int, s1: int):
  """N at a step: fixed, or the curriculum's N(k) (progressive / exponential)."""
  if curriculum == "progressive":
    return progressive_scales(step, total, s0, s1) + 1
  if curriculum == "exponential":
    return exponential_scales(step, total, s0, s1) + 1
  return jnp.asarray(num_scales, jnp.int32)


def grid_loss(trainable, ctx, batch, rng, t, *, schedule: dict, grid: dict,
              guidance_range=(1.0, 1.0), label_dropout: float = 0.0, **kw):
  """cd / ct phase loss: N from the schedule at t.step, the grid draws, then cm_loss_given."""
  n_scales = num_scales_at(t.step, **schedule)
  draws = grid_draws(rng, batch["x"], n_scales, guidance=guidance_range,
                     label_dropout=label_dropout, **grid)
  loss, metrics = cm_loss_given(trainable, ctx, batch, draws, **kw)
  return loss, {**metrics, "num_scales": n_scales.astype(jnp.float32)}


def ect_loss(trainable, ctx, batch, rng, t, *, double_every: int, ect: dict,
             label_dropout: float = 0.0, **kw):
  """ect phase loss: the stage from t.step, ECT's draws, then cm_loss_given."""
  stage = jnp.floor(jnp.asarray(t.step, jnp.float32) / double_every)
  draws = ect_draws(rng, batch["x"], stage, label_dropout=label_dropout, **ect)
  loss, metrics = cm_loss_given(trainable, ctx, batch, draws, **kw)
  return loss, {**metrics, "stage": stage}


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def _edm_keys(cfg) -> dict:
  smin, smax = float(cfg.sigma_min), float(cfg.sigma_max)
  if not 0.0 < smin < smax:
    raise ValueError(f"config keys 'objective.sigma_min' / 'objective.sigma_max': need "
                     f"0 < sigma_min < sigma_max, got {smin} and {smax}")
  return {"sigma_min": smin, "sigma_max": smax, "rho": float(cfg.rho)}


def _student(cfg, init: str = "teacher") -> Network:
  spec = wrappers.wrapper_spec("edm_consistency", sigma_data=float(cfg.sigma_data),
                               boundary=bool(cfg.boundary), **_edm_keys(cfg))
  return Network("student", init=init, wrapper=spec)


def _loss_keys(cfg) -> dict:
  return {"student": "student", "teacher": "teacher",
          "loss": choice(cfg, "loss", ("l2", "pseudo_huber")), "huber_c": float(cfg.huber_c),
          "weighting": choice(cfg, "weighting", tuple(WEIGHTINGS))}


def _objective(cfg, student: Network, phase: Phase, target_decay=None) -> Objective:
  roles = {}
  if target_decay is not None:
    roles["target"] = target_decay
  if float(cfg.ema_decay) > 0:
    roles["eval"] = float(cfg.ema_decay)
  return Objective(networks=(Network("teacher", init="checkpoint", trainable=None), student),
                   phases=(phase,), ema={"student": roles} if roles else {},
                   student="student", sampler="cm", evaluates_as="student")


def _check_scales(cfg, key: str, minimum: int = 2):
  if int(cfg[key]) < minimum:
    raise ValueError(f"config key 'objective.{key}': must be >= {minimum}, got {cfg[key]}")


@register_objective("cd", defaults=CD_DEFAULTS)
def build_cd(cfg) -> Objective:
  _check_scales(cfg, "num_scales")
  target = choice(cfg, "target", ("ema", "online"))
  lo, hi = guidance_range(cfg)
  schedule = {"curriculum": "fixed", "num_scales": int(cfg.num_scales), "total": 1, "s0": 1,
              "s1": 1}
  loss = functools.partial(
      grid_loss, schedule=schedule, grid=_edm_keys(cfg), guidance_range=(lo, hi),
      label_dropout=float(cfg.label_dropout), kind="cd", target=target,
      teacher_solver=choice(cfg, "teacher_solver", ("heun", "euler")),
      guidance=(lo, hi) != (1.0, 1.0), **_loss_keys(cfg))
  return _objective(cfg, _student(cfg), Phase("cd", loss=loss, trains=("student",)),
                    float(cfg.target_decay) if target == "ema" else None)


@register_objective("ct", defaults=CT_DEFAULTS)
def build_ct(cfg) -> Objective:
  curriculum = choice(cfg, "curriculum", ("progressive", "exponential", "fixed"))
  target = choice(cfg, "target", ("ema", "online"))
  sampling = choice(cfg, "index_sampling", ("uniform", "lognormal"))
  init = choice(cfg, "init", ("teacher", "random"))
  s0, s1, total = int(cfg.start_scales), int(cfg.end_scales), int(cfg.curriculum_steps)
  if curriculum == "fixed":
    _check_scales(cfg, "num_scales")
    max_scales = int(cfg.num_scales)
  else:
    if total < 1:
      raise ValueError(f"config key 'objective.curriculum_steps': the {curriculum} curriculum "
                       f"needs its length K >= 1 (usually train.steps), got {total}")
    _check_scales(cfg, "start_scales", 1)
    if s1 < s0:
      raise ValueError(f"config key 'objective.end_scales': must be >= start_scales ({s0}), "
                       f"got {s1}")
    max_scales = s1 + 1
  schedule = {"curriculum": curriculum, "num_scales": int(cfg.num_scales), "total": max(total, 1),
              "s0": s0, "s1": s1}
  grid = {**_edm_keys(cfg), "index_sampling": sampling, "max_scales": max_scales,
          "p_mean": float(cfg.p_mean), "p_std": float(cfg.p_std)}
  loss = functools.partial(grid_loss, schedule=schedule, grid=grid,
                           label_dropout=float(cfg.label_dropout), kind="ct", target=target,
                           **_loss_keys(cfg))
  decay = None
  if target == "ema":
    if curriculum == "progressive":
      mu0 = float(cfg.start_ema)
      decay = lambda t: progressive_decay(t.step, max(total, 1), s0, s1, mu0)
    else:
      decay = float(cfg.target_decay)
  return _objective(cfg, _student(cfg, init), Phase("ct", loss=loss, trains=("student",)),
                    decay)


@register_objective("ect", defaults=ECT_DEFAULTS)
def build_ect(cfg) -> Objective:
  if int(cfg.double_every) < 1:
    raise ValueError(f"config key 'objective.double_every': must be >= 1, got "
                     f"{cfg.double_every}")
  if float(cfg.q) <= 1.0:
    raise ValueError(f"config key 'objective.q': must be > 1, got {cfg.q}")
  ect = {"p_mean": float(cfg.p_mean), "p_std": float(cfg.p_std), "q": float(cfg.q),
         "k": float(cfg.k), "b": float(cfg.b)}
  loss = functools.partial(ect_loss, double_every=int(cfg.double_every), ect=ect,
                           label_dropout=float(cfg.label_dropout), kind="ect", target="online",
                           **_loss_keys(cfg))
  return _objective(cfg, _student(cfg), Phase("ect", loss=loss, trains=("student",)))

