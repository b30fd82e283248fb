"""Forward noising processes, prediction kinds and loss weightings.

A process describes

    x_t = alpha(t) * x0 + sigma(t) * eps,      eps ~ N(0, I),

with `t` in the process's own units; larger t is noisier. Every process is a frozen dataclass
(hashable, so it can be a static argument of `jax.jit`) registered by name in `PROCESSES`:

    proc = make_process("rectified_flow", shift=3.0)
    alpha, sigma = proc.alpha_sigma(t)

| name             | t                         | alpha, sigma                                  |
|------------------|---------------------------|-----------------------------------------------|
| `vp_discrete`    | index 0..999 (float)      | sqrt(abar_t), sqrt(1 - abar_t) (DDPM / SD)    |
| `vp_cosine`      | [0, 1]                    | sqrt(sigmoid(+-logsnr)), clipped cosine logSNR |
| `edm`            | sigma in [0.002, 80]      | 1, t                                          |
| `rectified_flow` | [0, 1]                    | 1 - t, t                                      |
| `trigflow`       | [0, pi/2]                 | cos t, sigma_d sin t                          |

Besides `alpha_sigma` every process has `t_min`, `t_max` (the training interval; t_max is the
pure-noise end), `t_end` (the clean end of a sampling grid: alpha/sigma = inf), `sample_t`
(training-time proposal), `prior` (a sample of x at t_max), `prior_std`, `timestep` (the value fed
to a network), `snr`, `logsnr`, `timesteps(n)` (a descending grid of n + 1 times from t_max to
t_end) and `alpha_sigma_dot` (time derivatives by `jax.jvp`, used by the ODE solvers).

Prediction kinds (`convert`): "x0"; "eps"; "v" = alpha eps - sigma x0 (Salimans & Ho; not
normalised when alpha^2 + sigma^2 != 1); "flow" = eps - x0 (the rectified-flow velocity).

Loss weightings (`WEIGHTINGS`) are weights of the x0-space squared error; see `loss_factor` for how
they carry over to a network predicting eps / v / flow.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np

from distill.registry import Registry

Array = jax.Array

PROCESSES: Registry[type] = Registry("process")
PROPOSALS: Registry[Callable] = Registry("time proposal")
BETA_SCHEDULES: Registry[Callable] = Registry("beta schedule")
SPACINGS: Registry[Callable] = Registry("timestep spacing")
TIME_INPUTS: Registry[Callable] = Registry("trigflow time input")
WEIGHTINGS: Registry[Callable] = Registry("loss weighting")
_DECODE: Registry[Callable] = Registry("prediction kind")
_ENCODE: Registry[Callable] = Registry("prediction kind")
_LOSS_FACTORS: Registry[Callable] = Registry("prediction kind")


def make_process(name: str, **kwargs) -> "Process":
  """Builds the process registered as `name` with the dataclass fields in `kwargs`."""
  return PROCESSES.get(name)(**kwargs)


def process_config(process: "Process") -> dict:
  """A process as config: its registry name and dataclass fields (`make_process(**it)`)."""
  return {"name": process.name, **dataclasses.asdict(process)}


def expand_like(a: Array, x: Array) -> Array:
  """Reshapes a scalar or per-sample (B,) array to broadcast against x of shape (B, ...)."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (jnp.ndim(x) - a.ndim))


def _f32(t) -> Array:
  return jnp.asarray(t, jnp.float32)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Process:
  """Shared behaviour; subclasses are frozen dataclasses that define `alpha_sigma`."""

  name: ClassVar[str] = ""
  proposal: str = "uniform"

  def alpha_sigma(self, t) -> tuple[Array, Array]:
    raise NotImplementedError

  @property
  def t_min(self) -> float:
    raise NotImplementedError

  @property
  def t_max(self) -> float:
    raise NotImplementedError

  @property
  def t_end(self) -> float:
    """Clean end of a sampling grid (sigma = 0): 0 unless a process says otherwise."""
    return 0.0

  @property
  def max_steps(self) -> Optional[int]:
    """The most sampling steps its time grid has (None: continuous time, any number)."""
    return None

  @property
  def prior_std(self) -> float:
    """Std of x at t_max for unit-variance data: sqrt(alpha^2 + sigma^2) at t_max."""
    a, s = self.alpha_sigma(self.t_max)
    return float(np.sqrt(float(a) ** 2 + float(s) ** 2))

  def alpha_sigma_dot(self, t) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """((alpha, sigma), (d alpha / dt, d sigma / dt)) by forward-mode differentiation."""
    t = _f32(t)
    return jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))

  def snr(self, t) -> Array:
    a, s = self.alpha_sigma(t)
    return jnp.square(a / s)

  def logsnr(self, t) -> Array:
    a, s = self.alpha_sigma(t)
    return 2.0 * (jnp.log(jnp.abs(a)) - jnp.log(s))

  def sample_t(self, rng: Array, shape) -> Array:
    """Training-time proposal for t (registry `PROPOSALS`, chosen by the `proposal` field)."""
    return PROPOSALS.get(self.proposal)(self, rng, tuple(shape))

  def prior(self, rng: Array, shape, dtype=jnp.float32) -> Array:
    """A sample of x at t_max: prior_std * N(0, I)."""
    return self.prior_std * jax.random.normal(rng, tuple(shape), dtype)

  def timestep(self, t) -> Array:
    """The value fed to a network's timestep input."""
    raise NotImplementedError

  def timesteps(self, num_steps: int) -> np.ndarray:
    """Descending float32 grid of num_steps + 1 times: first t_max, last t_end."""
    raise NotImplementedError

  def floor_time(self, t) -> Array:
    """Rounds a time down onto the process's time lattice (identity for continuous time)."""
    return t


# --------------------------------------------------------------------------------------------
# Discrete VP (DDPM / Stable Diffusion)
# --------------------------------------------------------------------------------------------


@BETA_SCHEDULES.register("linear")
def _betas_linear(n: int, start: Optional[float], end: Optional[float]) -> np.ndarray:
  start = 1e-4 if start is None else start
  end = 0.02 if end is None else end
  return np.linspace(start, end, n, dtype=np.float64)


@BETA_SCHEDULES.register("scaled_linear")
def _betas_scaled_linear(n: int, start: Optional[float], end: Optional[float]) -> np.ndarray:
  start = 0.00085 if start is None else start
  end = 0.012 if end is None else end
  return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


@BETA_SCHEDULES.register("squaredcos_cap_v2")
def _betas_cosine(n: int, start: Optional[float], end: Optional[float]) -> np.ndarray:
  del start, end  # the cosine schedule has no endpoints (Nichol & Dhariwal)
  abar = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
  i = np.arange(n, dtype=np.float64)
  return np.minimum(1.0 - abar((i + 1) / n) / abar(i / n), 0.999)


@functools.lru_cache(maxsize=32)
def _alphas_cumprod(schedule: str, start, end, n: int) -> np.ndarray:
  betas = BETA_SCHEDULES.get(schedule)(n, start, end)
  return np.cumprod(1.0 - betas)


@functools.lru_cache(maxsize=32)
def _ve_sigma_table(schedule: str, start, end, n: int) -> np.ndarray:
  """float32 [0, sigma_ve(0), ..., sigma_ve(n - 1)] with sigma_ve = sqrt((1 - abar) / abar)."""
  abar = _alphas_cumprod(schedule, start, end, n)
  return np.concatenate([[0.0], np.sqrt((1.0 - abar) / abar)]).astype(np.float32)


@SPACINGS.register("trailing")
def _spacing_trailing(n_train: int, n: int, **_) -> np.ndarray:
  """diffusers "trailing": round(arange(N, 0, -N/n)) - 1, starts at N - 1."""
  return np.round(np.arange(n_train, 0, -n_train / n)) - 1


@SPACINGS.register("leading")
def _spacing_leading(n_train: int, n: int, steps_offset: int = 0, **_) -> np.ndarray:
  """diffusers "leading": arange(n) * (N // n) reversed, plus steps_offset (SD uses 1)."""
  return (np.arange(n) * (n_train // n))[::-1] + steps_offset


@SPACINGS.register("linspace")
def _spacing_linspace(n_train: int, n: int, **_) -> np.ndarray:
  """linspace(0, N - 1, n) reversed, unrounded (diffusers EulerDiscreteScheduler)."""
  return np.linspace(0, n_train - 1, n)[::-1]


@SPACINGS.register("lcm")
def _spacing_lcm(n_train: int, n: int, original_steps: int = 50, **_) -> np.ndarray:
  """LCM / TCD schedulers: n of the `original_steps` DDIM times (k*(N//orig) - 1)."""
  origin = (np.arange(1, original_steps + 1) * (n_train // original_steps) - 1)[::-1]
  return origin[np.floor(np.linspace(0, original_steps, n, endpoint=False)).astype(int)]


@PROCESSES.register("vp_discrete")
@dataclasses.dataclass(frozen=True)
class VPDiscrete(Process):
  """DDPM / SD: t is the integer training index as a float, alpha^2 = alphas_cumprod[t].

  Between integer indices the VE noise level sigma_ve = sigma / alpha = sqrt((1 - abar) / abar)
  is interpolated linearly (as diffusers' Euler / DPM-Solver schedulers do for fractional
  timesteps); alpha = 1 / sqrt(1 + sigma_ve^2), sigma = sigma_ve * alpha. Index -1 is clean data
  (alpha = 1, sigma = 0; diffusers' `set_alpha_to_one`), so sampling grids end at t_end = -1.
  `beta_start` / `beta_end` default to the schedule's own (scaled_linear: SD's 0.00085 -> 0.012;
  linear: DDPM's 1e-4 -> 0.02). `spacing` picks the default grid of `timesteps` (`SPACINGS`).
  """

  name: ClassVar[str] = "vp_discrete"
  beta_schedule: str = "scaled_linear"
  beta_start: Optional[float] = None
  beta_end: Optional[float] = None
  num_train_timesteps: int = 1000
  spacing: str = "trailing"
  steps_offset: int = 0
  proposal: str = "uniform_int"

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """float64 alphas_cumprod[0..N-1]."""
    return _alphas_cumprod(self.beta_schedule, self.beta_start, self.beta_end,
                           self.num_train_timesteps)

  def alpha_sigma(self, t):
    table = _ve_sigma_table(self.beta_schedule, self.beta_start, self.beta_end,
                            self.num_train_timesteps)
    knots = np.arange(-1, self.num_train_timesteps, dtype=np.float32)
    s_ve = jnp.interp(_f32(t), knots, table)
    alpha = jax.lax.rsqrt(1.0 + jnp.square(s_ve))
    return alpha, s_ve * alpha

  @property
  def t_min(self) -> float:
    return 0.0

  @property
  def t_max(self) -> float:
    return float(self.num_train_timesteps - 1)

  @property
  def t_end(self) -> float:
    return -1.0

  @property
  def prior_std(self) -> float:
    return 1.0  # diffusers' init_noise_sigma for VP schedulers

  def timestep(self, t):
    return _f32(t)

  @property
  def max_steps(self) -> int:
    return int(self.num_train_timesteps)

  def timesteps(self, num_steps: int, spacing: Optional[str] = None, **kw) -> np.ndarray:
    if not 1 <= num_steps <= self.max_steps:   # more would repeat (then skip past) timesteps
      raise ValueError(f"{num_steps} sampling steps: a discrete process of "
                       f"{self.num_train_timesteps} timesteps takes 1 to {self.max_steps}")
    kw.setdefault("steps_offset", self.steps_offset)
    ts = SPACINGS.get(spacing or self.spacing)(self.num_train_timesteps, num_steps, **kw)
    return np.concatenate([ts, [self.t_end]]).astype(np.float32)

  def floor_time(self, t):
    return jnp.floor(t)


# --------------------------------------------------------------------------------------------
# Continuous VP with the cosine logSNR schedule
# --------------------------------------------------------------------------------------------


@PROCESSES.register("vp_cosine")
@dataclasses.dataclass(frozen=True)
class VPCosine(Process):
  """logsnr(t) = -2 log tan(a t + b), with a, b such that logsnr(0) = logsnr_max and
  logsnr(1) = logsnr_min (the clipped cosine schedule of Salimans & Ho / Meng et al.);
  alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr). timestep(t) = timestep_scale * t.
  (t is not clipped: the schedule itself is bounded on [0, 1], and a clip would zero the
  time derivative at the ends.)
  Note t_end = 0 has logSNR = logsnr_max (sigma ~ 4.5e-5 at 20), i.e. clean to float32 accuracy.
  """

  name: ClassVar[str] = "vp_cosine"
  logsnr_min: float = -20.0
  logsnr_max: float = 20.0
  timestep_scale: float = 1000.0
  proposal: str = "uniform"

  def _ab(self) -> tuple[float, float]:
    b = math.atan(math.exp(-0.5 * self.logsnr_max))
    a = math.atan(math.exp(-0.5 * self.logsnr_min)) - b
    return a, b

  def logsnr(self, t):
    a, b = self._ab()
    return -2.0 * jnp.log(jnp.tan(a * _f32(t) + b))

  def alpha_sigma(self, t):
    lam = self.logsnr(t)
    return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))

  @property
  def t_min(self) -> float:
    return 0.0

  @property
  def t_max(self) -> float:
    return 1.0

  @property
  def prior_std(self) -> float:
    return 1.0

  def timestep(self, t):
    return self.timestep_scale * _f32(t)

  def timesteps(self, num_steps: int) -> np.ndarray:
    return np.linspace(1.0, 0.0, num_steps + 1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# EDM (variance exploding, t = sigma)
# --------------------------------------------------------------------------------------------


def edm_scalings(sigma, sigma_data: float = 0.5) -> tuple[Array, Array, Array, Array]:
  """EDM preconditioning (Karras et al. 2022): (c_skip, c_out, c_in, c_noise)."""
  sigma = _f32(sigma)
  d2 = jnp.square(sigma) + sigma_data ** 2
  c_skip = sigma_data ** 2 / d2
  c_out = sigma * sigma_data * jax.lax.rsqrt(d2)
  c_in = jax.lax.rsqrt(d2)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def consistency_scalings(sigma, sigma_data: float = 0.5,
                         sigma_min: float = 0.002) -> tuple[Array, Array, Array]:
  """Consistency-model boundary scalings (Song et al. 2023): f(x, sigma_min) = x exactly.

  c_skip = sd^2 / ((s - s_min)^2 + sd^2), c_out = (s - s_min) sd / sqrt(s^2 + sd^2),
  c_in = 1 / sqrt(s^2 + sd^2).
  """
  sigma = _f32(sigma)
  d = sigma - sigma_min
  c_skip = sigma_data ** 2 / (jnp.square(d) + sigma_data ** 2)
  c_out = d * sigma_data * jax.lax.rsqrt(jnp.square(sigma) + sigma_data ** 2)
  c_in = jax.lax.rsqrt(jnp.square(sigma) + sigma_data ** 2)
  return c_skip, c_out, c_in


def lcm_boundary_scalings(timestep, sigma_data: float = 0.5,
                          timestep_scaling: float = 10.0) -> tuple[Array, Array]:
  """LCM's discrete boundary scalings at a network timestep: (c_skip, c_out).

  With u = timestep * timestep_scaling: c_skip = sd^2 / (u^2 + sd^2), c_out = u / sqrt(u^2 + sd^2).
  """
  u = _f32(timestep) * timestep_scaling
  c_skip = sigma_data ** 2 / (jnp.square(u) + sigma_data ** 2)
  c_out = u * jax.lax.rsqrt(jnp.square(u) + sigma_data ** 2)
  return c_skip, c_out


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
  """The rho-spaced grid of n sigmas from sigma_max down to sigma_min (EDM eq. 5)."""
  if n == 1:
    return np.array([sigma_max], np.float64)
  i = np.arange(n, dtype=np.float64) / (n - 1)
  hi, lo = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
  return (hi + i * (lo - hi)) ** rho


@PROCESSES.register("edm")
@dataclasses.dataclass(frozen=True)
class EDM(Process):
  """x = x0 + sigma eps with t = sigma; log-normal training proposal; Karras grid.

  timestep(t) = 0.25 log t (EDM's c_noise); `timesteps(n)` = n Karras sigmas + [0].
  prior_std = sigma_max (EDM / CM sample x_T = sigma_max * eps).
  """

  name: ClassVar[str] = "edm"
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  rho: float = 7.0
  p_mean: float = -1.2
  p_std: float = 1.2
  proposal: str = "lognormal"

  def alpha_sigma(self, t):
    t = _f32(t)
    return jnp.ones_like(t), t

  @property
  def t_min(self) -> float:
    return float(self.sigma_min)

  @property
  def t_max(self) -> float:
    return float(self.sigma_max)

  @property
  def prior_std(self) -> float:
    return float(self.sigma_max)

  def timestep(self, t):
    return 0.25 * jnp.log(_f32(t))

  def timesteps(self, num_steps: int) -> np.ndarray:
    s = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
    return np.concatenate([s, [0.0]]).astype(np.float32)

  def scalings(self, sigma):
    """EDM (c_skip, c_out, c_in, c_noise) with this process's sigma_data."""
    return edm_scalings(sigma, self.sigma_data)

  def consistency_scalings(self, sigma):
    """Consistency boundary (c_skip, c_out, c_in) with this process's sigma_data, sigma_min."""
    return consistency_scalings(sigma, self.sigma_data, self.sigma_min)


# --------------------------------------------------------------------------------------------
# Rectified flow
# --------------------------------------------------------------------------------------------


def time_shift(t, shift: float):
  """SD3 / SANA resolution shift t' = shift t / (1 + (shift - 1) t) (identity for shift = 1)."""
  return shift * t / (1.0 + (shift - 1.0) * t)


@PROCESSES.register("rectified_flow")
@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Process):
  """x_t = (1 - t) x0 + t eps, t in [0, 1]; timestep(t) = timestep_scale * t (SD3: 1000).

  `shift` is applied to both the training proposal and the sampling grid (as SD3 training with
  a shifted scheduler does): grid = shift(linspace(1, 0, n + 1)). `proposal`: "uniform" or
  "logit_normal" (t = sigmoid(N(logit_mean, logit_std^2)), SD3).
  """

  name: ClassVar[str] = "rectified_flow"
  timestep_scale: float = 1000.0
  shift: float = 1.0
  proposal: str = "uniform"
  logit_mean: float = 0.0
  logit_std: float = 1.0

  def alpha_sigma(self, t):
    t = _f32(t)
    return 1.0 - t, t

  @property
  def t_min(self) -> float:
    return 0.0

  @property
  def t_max(self) -> float:
    return 1.0

  @property
  def prior_std(self) -> float:
    return 1.0

  def sample_t(self, rng, shape):
    return time_shift(super().sample_t(rng, shape), self.shift)

  def timestep(self, t):
    return self.timestep_scale * _f32(t)

  def timesteps(self, num_steps: int, shift: Optional[float] = None) -> np.ndarray:
    shift = self.shift if shift is None else shift
    return time_shift(np.linspace(1.0, 0.0, num_steps + 1), shift).astype(np.float32)


# --------------------------------------------------------------------------------------------
# TrigFlow (sCM, SANA-Sprint)
# --------------------------------------------------------------------------------------------


@TIME_INPUTS.register("identity")
def _time_identity(process, t):
  """sCM's c_noise(t) = t."""
  return t


@TIME_INPUTS.register("flow")
def _time_flow(process, t):
  """SANA-Sprint: the rectified-flow time sin t / (sin t + cos t) of the same noise level."""
  return jnp.sin(t) / (jnp.sin(t) + jnp.cos(t))


@TIME_INPUTS.register("edm")
def _time_edm(process, t):
  """EDM's c_noise of the equivalent sigma = sigma_d tan t: 0.25 log(sigma_d tan t)."""
  return 0.25 * jnp.log(process.sigma_data * jnp.tan(t))


@PROCESSES.register("trigflow")
@dataclasses.dataclass(frozen=True)
class TrigFlow(Process):
  """x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), t in [0, pi/2].

  W.r.t. a unit eps: alpha = cos t, sigma = sigma_d sin t. The network F sees x_t / sigma_d and
  its PF-ODE is dx/dt = sigma_d F; its x0 is `trigflow_denoise`. timestep(t) =
  timestep_scale * TIME_INPUTS[c_noise](t) ("identity": t, as sCM; "flow": SANA-Sprint's
  sin/(sin + cos); "edm": 0.25 log(sigma_d tan t)). Proposal: t = arctan(exp(N(p_mean, p_std^2))
  / sigma_d) (sCM defaults -1.0, 1.4).
  """

  name: ClassVar[str] = "trigflow"
  sigma_data: float = 0.5
  p_mean: float = -1.0
  p_std: float = 1.4
  c_noise: str = "identity"
  timestep_scale: float = 1.0
  proposal: str = "lognormal_arctan"

  def alpha_sigma(self, t):
    t = _f32(t)
    return jnp.cos(t), self.sigma_data * jnp.sin(t)

  @property
  def t_min(self) -> float:
    return 0.0

  @property
  def t_max(self) -> float:
    return float(np.float32(np.pi / 2))

  @property
  def prior_std(self) -> float:
    return float(self.sigma_data)

  def timestep(self, t):
    return self.timestep_scale * TIME_INPUTS.get(self.c_noise)(self, _f32(t))

  def timesteps(self, num_steps: int) -> np.ndarray:
    return np.linspace(self.t_max, 0.0, num_steps + 1).astype(np.float32)


def trigflow_denoise(x_t: Array, t, F: Array, sigma_data: float = 0.5) -> Array:
  """x0 of a TrigFlow network output F (= the consistency function of sCM):
  cos t x_t - sin t sigma_d F, with t scalar or per-sample."""
  t = expand_like(_f32(t), x_t)
  return jnp.cos(t) * x_t - jnp.sin(t) * sigma_data * F


def trigflow_target(x0: Array, z: Array, t) -> Array:
  """The TrigFlow velocity target v_t = cos t z - sin t x0 (= sigma_d F), z ~ N(0, sigma_d^2)."""
  t = expand_like(_f32(t), x0)
  return jnp.cos(t) * z - jnp.sin(t) * x0


# --------------------------------------------------------------------------------------------
# Training-time proposals for t
# --------------------------------------------------------------------------------------------


@PROPOSALS.register("uniform")
def _proposal_uniform(process, rng, shape):
  return jax.random.uniform(rng, shape, jnp.float32, process.t_min, process.t_max)


@PROPOSALS.register("uniform_int")
def _proposal_uniform_int(process, rng, shape):
  lo, hi = int(process.t_min), int(process.t_max) + 1
  return jax.random.randint(rng, shape, lo, hi).astype(jnp.float32)


@PROPOSALS.register("lognormal")
def _proposal_lognormal(process, rng, shape):
  """EDM: ln sigma ~ N(p_mean, p_std^2) (not clipped to [sigma_min, sigma_max], as EDM)."""
  return jnp.exp(process.p_mean + process.p_std * jax.random.normal(rng, shape, jnp.float32))


@PROPOSALS.register("lognormal_arctan")
def _proposal_lognormal_arctan(process, rng, shape):
  """sCM: sigma = exp(N(p_mean, p_std^2)), t = arctan(sigma / sigma_d)."""
  sigma = jnp.exp(process.p_mean + process.p_std * jax.random.normal(rng, shape, jnp.float32))
  return jnp.arctan(sigma / process.sigma_data)


@PROPOSALS.register("logit_normal")
def _proposal_logit_normal(process, rng, shape):
  """SD3: t = sigmoid(N(logit_mean, logit_std^2))."""
  n = jax.random.normal(rng, shape, jnp.float32)
  return jax.nn.sigmoid(process.logit_mean + process.logit_std * n)


# --------------------------------------------------------------------------------------------
# Prediction kinds
# --------------------------------------------------------------------------------------------


@_DECODE.register("x0")
def _decode_x0(pred, x_t, alpha, sigma):
  return pred, (x_t - alpha * pred) / sigma


@_DECODE.register("eps")
def _decode_eps(pred, x_t, alpha, sigma):
  return (x_t - sigma * pred) / alpha, pred


@_DECODE.register("v")
def _decode_v(pred, x_t, alpha, sigma):
  # v = a eps - s x0 and x_t = a x0 + s eps  =>  x0 = (a x_t - s v) / (a^2 + s^2), etc.
  norm = jnp.square(alpha) + jnp.square(sigma)
  return (alpha * x_t - sigma * pred) / norm, (sigma * x_t + alpha * pred) / norm


@_DECODE.register("flow")
def _decode_flow(pred, x_t, alpha, sigma):
  # f = eps - x0 and x_t = a x0 + s eps  =>  x0 = (x_t - s f) / (a + s),
  # eps = (x_t + a f) / (a + s).
  norm = alpha + sigma
  return (x_t - sigma * pred) / norm, (x_t + alpha * pred) / norm


@_ENCODE.register("x0")
def _encode_x0(x0, eps, alpha, sigma):
  return x0


@_ENCODE.register("eps")
def _encode_eps(x0, eps, alpha, sigma):
  return eps


@_ENCODE.register("v")
def _encode_v(x0, eps, alpha, sigma):
  return alpha * eps - sigma * x0


@_ENCODE.register("flow")
def _encode_flow(x0, eps, alpha, sigma):
  return eps - x0


PREDICTION_KINDS = ("x0", "eps", "v", "flow")


def prediction_kinds() -> tuple[str, ...]:
  """The names a network's `prediction` may take."""
  return tuple(_DECODE.names())


def decode(pred: Array, src: str, x_t: Array, alpha, sigma) -> tuple[Array, Array]:
  """(x0, eps) implied by a prediction of kind `src` at x_t = alpha x0 + sigma eps."""
  return _DECODE.get(src)(pred, x_t, alpha, sigma)


def encode(x0: Array, eps: Array, dst: str, alpha, sigma) -> Array:
  """The prediction of kind `dst` for a pair (x0, eps)."""
  return _ENCODE.get(dst)(x0, eps, alpha, sigma)


def convert(pred: Array, src: str, dst: str, x_t: Array, alpha, sigma) -> Array:
  """Converts a prediction between kinds "x0", "eps", "v", "flow" at fixed x_t.

  Generic for any x_t = alpha x0 + sigma eps (alpha, sigma broadcast against x_t): both x0 and
  eps are solved from (x_t, pred) and the target kind is built from them.
  """
  if src == dst:
    _DECODE.get(src)  # still reject unknown kinds
    return pred
  x0, eps = decode(pred, src, x_t, alpha, sigma)
  return encode(x0, eps, dst, alpha, sigma)


@_LOSS_FACTORS.register("x0")
def _factor_x0(alpha, sigma):
  return jnp.ones_like(alpha * sigma)


@_LOSS_FACTORS.register("eps")
def _factor_eps(alpha, sigma):
  return jnp.square(alpha / sigma)


@_LOSS_FACTORS.register("v")
def _factor_v(alpha, sigma):
  return jnp.square((jnp.square(alpha) + jnp.square(sigma)) / sigma)


@_LOSS_FACTORS.register("flow")
def _factor_flow(alpha, sigma):
  return jnp.square((alpha + sigma) / sigma)


def loss_factor(kind: str, alpha, sigma) -> Array:
  """c_kind with ||pred - pred_hat||^2 = c_kind ||x0 - x0_hat||^2 at fixed x_t.

  eps: SNR; v: (alpha^2 + sigma^2)^2 / sigma^2 (= 1 + SNR for VP); flow: (alpha + sigma)^2 /
  sigma^2 (= 1 / t^2 for rectified flow); x0: 1. An x0-space weighting w(t) is therefore the
  prediction-space weighting w(t) / c_kind(t), e.g. the plain eps-MSE is "snr" in x0 space.
  """
  return _LOSS_FACTORS.get(kind)(alpha, sigma)


# --------------------------------------------------------------------------------------------
# Loss weightings (weights of the x0-space squared error)
# --------------------------------------------------------------------------------------------


@WEIGHTINGS.register("uniform")
def _w_uniform(process, t):
  return jnp.ones_like(_f32(t))


@WEIGHTINGS.register("snr")
def _w_snr(process, t):
  """SNR: the plain eps-prediction MSE."""
  return process.snr(t)


@WEIGHTINGS.register("snr_plus_one")
def _w_snr_plus_one(process, t):
  """SNR + 1: the plain v-prediction MSE for VP processes (alpha^2 + sigma^2 = 1)."""
  return process.snr(t) + 1.0


@WEIGHTINGS.register("min_snr")
def _w_min_snr(process, t, gamma: float = 5.0):
  """min(SNR, gamma) (Hang et al. 2023, Min-SNR-gamma)."""
  return jnp.minimum(process.snr(t), gamma)


@WEIGHTINGS.register("truncated_snr")
def _w_truncated_snr(process, t):
  """max(SNR, 1) (Salimans & Ho 2022, "truncated SNR")."""
  return jnp.maximum(process.snr(t), 1.0)


WEIGHTINGS.add("max_snr_one", _w_truncated_snr)


@WEIGHTINGS.register("edm")
def _w_edm(process, t):
  """EDM lambda = (s^2 + sd^2) / (s sd)^2 with s = sigma / alpha (the VE noise level), i.e.
  SNR + 1 / sd^2; sigma_data from the process (0.5 where it has none)."""
  sd = getattr(process, "sigma_data", 0.5)
  return process.snr(t) + 1.0 / sd ** 2


def get_weighting(name: str, **kwargs) -> Callable[[Process, Array], Array]:
  """The weighting `name` as fn(process, t), with its options (e.g. gamma) bound."""
  return functools.partial(WEIGHTINGS.get(name), **kwargs)


# --------------------------------------------------------------------------------------------
# ODE velocity
# --------------------------------------------------------------------------------------------


def ode_velocity(process: Process, x_t: Array, x0_hat: Array, t) -> Array:
  """dx_t/dt of the probability-flow ODE in the process's time, given the denoiser's x0.

  dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat with eps_hat = (x_t - alpha x0_hat) / sigma;
  the derivatives come from `jax.jvp` of `alpha_sigma`. t is a scalar or per-sample (B,).
  """
  (alpha, sigma), (d_alpha, d_sigma) = process.alpha_sigma_dot(t)
  alpha, sigma = expand_like(alpha, x_t), expand_like(sigma, x_t)
  d_alpha, d_sigma = expand_like(d_alpha, x_t), expand_like(d_sigma, x_t)
  eps_hat = (x_t - alpha * x0_hat) / sigma
  return d_alpha * x0_hat + d_sigma * eps_hat


# --------------------------------------------------------------------------------------------
# The TrigFlow network output as a prediction kind
# --------------------------------------------------------------------------------------------
# "trigflow": F with sigma_d F = dx_t/dt = cos t z - sin t x0 (z = sigma_d eps). For a TrigFlow
# process (alpha = cos t, sigma = sigma_d sin t, so sin^2 t = 1 - alpha^2 and sigma_d sin t =
# sigma) everything follows from (alpha, sigma) alone:
#   F = alpha eps - (1 - alpha^2) / sigma x0,
#   x0 = alpha x_t - sigma F  (sCM's consistency function cos t x_t - sin t sigma_d F),
#   eps = (1 - alpha^2) / sigma x_t + alpha F.
# Only valid with a TrigFlow process (alpha^2 + (sigma / sigma_d)^2 = 1).


@_DECODE.register("trigflow")
def _decode_trigflow(pred, x_t, alpha, sigma):
  return alpha * x_t - sigma * pred, (1.0 - jnp.square(alpha)) / sigma * x_t + alpha * pred


@_ENCODE.register("trigflow")
def _encode_trigflow(x0, eps, alpha, sigma):
  return alpha * eps - (1.0 - jnp.square(alpha)) / sigma * x0


@_LOSS_FACTORS.register("trigflow")
def _factor_trigflow(alpha, sigma):
  # x0 - x0_hat = -sigma (F - F_hat) at fixed x_t.
  return 1.0 / jnp.square(sigma)
