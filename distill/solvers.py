"""Samplers for any process: ODE solvers, DDIM, DPM-Solver++(2M) and few-step consistency samplers.

    x = sample(denoiser, process, noise, solver="euler", steps=8, rng=key, **solver_kwargs)

`denoiser(x_t, t) -> x0_hat` with t a per-sample (B,) array in the process's units; eps_hat is
derived as (x_t - alpha x0_hat) / sigma. `noise` is x at the first grid time, i.e. a sample of
`process.prior` (already at the process's scale, like diffusers' init_noise_sigma * randn).

The grid has steps + 1 descending times: `timesteps` if given, else the solver's default
(`process.timesteps(steps, **grid_kwargs)` for most solvers). ODE-type solvers return x at the
last grid time (clean when it is `process.t_end`); consistency-type solvers (consistency, lcm,
trigflow) return the last denoised estimate; tcd returns its last state (as diffusers).

Stochastic solvers draw fresh unit noise per step from `rng` (`fold_in(rng, i)`), or take it from
`step_noise` (shape (steps,) + noise.shape) to reproduce an outside sampler exactly.

Every solver is a `lax.scan` over the grid (one trace of the denoiser), pure and jit-compatible.

| solver        | what                                                           | NFE      |
|---------------|----------------------------------------------------------------|----------|
| `euler`       | Euler on the PF-ODE in the process's time                      | n        |
| `heun`        | EDM's Heun (2nd order), last step Euler                        | 2n - 1   |
| `ddim`        | DDIM, `eta` (0 = deterministic; > 0 needs noise)               | n        |
| `dpmpp_2m`    | DPM-Solver++(2M), data prediction, logSNR multistep            | n        |
| `consistency` | x0 = f(x_t, t); re-noise alpha x0 + sigma eps' at the next time | n        |
| `lcm`         | consistency with LCM's c_skip/c_out boundary (diffusers LCM)   | n        |
|               | on LCMScheduler's grid (`lcm_grid`, discrete processes)        |          |
| `tcd`         | TCD strategic stochastic sampling with `gamma` (diffusers TCD) | n        |
| `trigflow`    | sCM step-adaptive sampler; grid [pi/2, mids..., 0]             | n        |
| `cm`          | consistency on the CM multistep grid (Karras times, then 0)    | n        |

`consistency` and `tcd` take `grid_kwargs={"refine_from": r}` (`refine_grid`): one step from
t_max to r, then even steps from r to the clean end, for teachers whose denoise / re-noise
rounds drift (`evaluation`'s ideal rows measure that drift).

Notes on matching diffusers: EulerDiscreteScheduler is Euler in the VE variable x / alpha and
time sigma / alpha, i.e. our `ddim` (eta = 0) on `vp_discrete`, or our `euler` on `edm`.
FlowMatchEulerDiscreteScheduler is our `euler` on `rectified_flow`. SCMScheduler is `trigflow`.

`euler` integrates in the process's own time, so a single step from t_max to t_end returns x0_hat
only where the path is linear in t (rectified flow; EDM, where dx/dsigma = eps_hat). On VP and
TrigFlow processes a few Euler steps in t are poor (alpha, sigma curve in t); `ddim` is the
first-order solver that is exact for linear paths in every parameterisation.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill import processes as procs
from distill.registry import Registry, parse_spec

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]
NoiseFn = Callable[[Array], Array]


@dataclasses.dataclass(frozen=True)
class Solver:
  """A registered sampler.

  run(denoiser, process, x, grid, noise_at, **kw) -> output, where grid is a (n + 1,) float32
  array and noise_at(i) gives unit Gaussian noise for step i. `grid` builds the default grid
  (process, steps, **grid_kwargs); `nfe` counts denoiser calls for `steps` steps.
  """

  run: Callable
  grid: Optional[Callable] = None
  nfe: Callable[[int], int] = lambda steps: steps


SOLVERS: Registry[Solver] = Registry("solver")


def check_sampler(spec: str, where: str) -> str:
  """The solver name of sampler spec `spec` ("tcd(gamma=0.3)"); raises ValueError naming
  `where` (a config key or a flag) when it does not parse, names no solver or gives an option
  the solver does not take (`grid_kwargs` go to its grid)."""
  try:
    name, options = parse_spec(spec, "sampler")
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from None
  if name not in SOLVERS:
    raise ValueError(f"{where}: unknown solver {name!r} (known: {', '.join(SOLVERS.names())})")
  params = inspect.signature(SOLVERS.get(name).run).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    known = ["grid_kwargs"] + [p for p in list(params)[5:]]
    bad = sorted(set(options) - set(known))
    if bad:
      raise ValueError(f"{where}: solver {name!r} has no option {bad[0]!r} (its options: "
                       f"{', '.join(known)})")
  return name


def sample(denoiser: Denoiser, process: procs.Process, noise: Array, *, solver: str,
           steps: Optional[int] = None, rng: Optional[Array] = None,
           timesteps: Optional[Sequence[float]] = None,
           grid_kwargs: Optional[Mapping] = None, step_noise: Optional[Array] = None,
           **kw) -> Array:
  """Runs `solver` from `noise` (x at timesteps[0]) and returns the sample.

  Args:
    denoiser: fn(x_t, t) -> x0_hat, t of shape (B,).
    process: the noise process (defines alpha, sigma and the default grid).
    noise: x at the first grid time, usually `process.prior(rng, shape)`.
    solver: a name in `SOLVERS`.
    steps: number of steps (grid intervals); may be omitted when `timesteps` is given.
    rng: PRNG key for stochastic solvers.
    timesteps: explicit descending grid of steps + 1 times (includes the end time).
    grid_kwargs: options of the default grid (e.g. spacing="leading" for vp_discrete,
      intermediate=(1.1,) for trigflow).
    step_noise: optional (steps,) + noise.shape unit noise used instead of rng draws.
    **kw: solver options (eta, gamma, timestep_scaling, ...).
  """
  entry = SOLVERS.get(solver)
  if timesteps is None:
    if steps is None:
      raise ValueError("sample() needs `steps` or `timesteps`")
    make_grid = entry.grid or process_grid
    grid = make_grid(process, steps, **dict(grid_kwargs or {}))
  else:
    grid = timesteps
  grid = jnp.asarray(grid, jnp.float32)
  n = grid.shape[0] - 1
  if steps is not None and steps != n:
    raise ValueError(f"steps={steps} but the grid has {n} steps")
  noise_at = _noise_source(rng, step_noise, noise)
  return entry.run(denoiser, process, noise, grid, noise_at, **kw)


def process_grid(process, steps: int, **grid_kwargs) -> np.ndarray:
  return process.timesteps(steps, **grid_kwargs)


def _noise_source(rng, step_noise, like: Array) -> NoiseFn:
  """noise_at(i): step_noise[i], else N(0, I) from fold_in(rng, i); errors if neither."""
  if step_noise is not None:
    step_noise = jnp.asarray(step_noise, like.dtype)
    return lambda i: step_noise[i]
  if rng is not None:
    return lambda i: jax.random.normal(jax.random.fold_in(rng, i), like.shape, like.dtype)

  def missing(i):
    raise ValueError("this solver is stochastic: pass `rng` (or `step_noise`)")
  return missing


def _scan(step: Callable, carry, grid: Array):
  """lax.scan of step(carry, (i, t, t_next)) over consecutive grid pairs; returns the carry.

  Each new carry is cast to the old one's dtype (a bf16 state stays bf16; coefficients are f32).
  """
  n = grid.shape[0] - 1
  xs = (jnp.arange(n), grid[:-1], grid[1:])

  def body(c, a):
    new = step(c, a)
    return jax.tree_util.tree_map(lambda u, v: u.astype(v.dtype), new, c), None
  carry, _ = jax.lax.scan(body, carry, xs)
  return carry


def _denoise(denoiser: Denoiser, x: Array, t: Array) -> Array:
  """denoiser at a scalar grid time, broadcast to a float32 (B,) t."""
  return denoiser(x, jnp.full((x.shape[0],), t, jnp.float32))


def _is_zero(value) -> bool:
  """True for a static zero (Python / numpy number); traced values count as non-zero."""
  return isinstance(value, (int, float, np.number)) and float(value) == 0.0


# --------------------------------------------------------------------------------------------
# ODE solvers
# --------------------------------------------------------------------------------------------


def _euler(denoiser, process, x, grid, noise_at):
  """x <- x + (t_next - t) dx/dt with dx/dt from `processes.ode_velocity`."""
  def step(x, a):
    _, t, tn = a
    v = procs.ode_velocity(process, x, _denoise(denoiser, x, t), t)
    return x + (tn - t) * v
  return _scan(step, x, grid)


def _heun(denoiser, process, x, grid, noise_at):
  """EDM Algorithm 1 (deterministic): Heun's 2nd-order correction except on the last step."""
  n = grid.shape[0] - 1

  def velocity(x, t):
    return procs.ode_velocity(process, x, _denoise(denoiser, x, t), t)

  def step(x, a):
    i, t, tn = a
    d = velocity(x, t)
    x_euler = x + (tn - t) * d

    def correct(_):
      return x + (tn - t) * 0.5 * (d + velocity(x_euler, tn))
    return jax.lax.cond(i < n - 1, correct, lambda _: x_euler, None)
  return _scan(step, x, grid)


def _ddim(denoiser, process, x, grid, noise_at, eta: float = 0.0):
  """DDIM (Song et al. 2021) for any alpha, sigma.

  x_next = alpha_n x0 + sqrt(sigma_n^2 - std^2) eps_hat + std z, std = eta * sqrt(posterior var),
  posterior var = (sigma^2 - (alpha / alpha_n)^2 sigma_n^2) sigma_n^2 / sigma^2.
  """
  stochastic = not _is_zero(eta)

  def step(x, a):
    i, t, tn = a
    alpha, sigma = process.alpha_sigma(t)
    alpha_n, sigma_n = process.alpha_sigma(tn)
    x0 = _denoise(denoiser, x, t)
    eps = (x - alpha * x0) / sigma
    out = alpha_n * x0
    if not stochastic:
      return out + sigma_n * eps
    var = (jnp.square(sigma) - jnp.square(alpha / alpha_n * sigma_n)) * jnp.square(sigma_n / sigma)
    std = eta * jnp.sqrt(jnp.maximum(var, 0.0))
    dir_coef = jnp.sqrt(jnp.maximum(jnp.square(sigma_n) - jnp.square(std), 0.0))
    return out + dir_coef * eps + std * noise_at(i)
  return _scan(step, x, grid)


def _dpmpp_2m(denoiser, process, x, grid, noise_at):
  """DPM-Solver++(2M) (Lu et al. 2022), midpoint form as diffusers' default.

  With lambda = log(alpha / sigma), h = lambda_n - lambda, r = h_prev / h:
    x_n = (sigma_n / sigma) x - alpha_n (e^-h - 1) (D + (D - D_prev) / (2 r)).
  First order on the first and the last step (diffusers' lower_order_final with a zero final
  sigma). e^-h is computed as a ratio, so alpha = 0 (rectified flow at t = 1) and sigma_n = 0
  (the clean end) stay finite.
  """
  n = grid.shape[0] - 1

  def log_snr_half(alpha, sigma):
    safe = lambda u: jnp.where(u > 0, u, 1.0)
    lam = jnp.log(safe(jnp.abs(alpha))) - jnp.log(safe(sigma))
    lam = jnp.where(alpha == 0, -jnp.inf, lam)
    return jnp.where(sigma == 0, jnp.inf, lam)

  def step(carry, a):
    x, x0_prev, h_prev = carry
    i, t, tn = a
    alpha, sigma = process.alpha_sigma(t)
    alpha_n, sigma_n = process.alpha_sigma(tn)
    x0 = _denoise(denoiser, x, t)
    exp_neg_h = (sigma_n * alpha) / (alpha_n * sigma)
    h = log_snr_half(alpha_n, sigma_n) - log_snr_half(alpha, sigma)
    second = (i > 0) & (i < n - 1)
    inv_r = jnp.where(second, h / jnp.where(second, h_prev, 1.0), 0.0)
    d = x0 + 0.5 * inv_r * (x0 - x0_prev)
    x_next = (sigma_n / sigma) * x - alpha_n * (exp_neg_h - 1.0) * d
    return x_next, x0, h
  carry = (x, jnp.zeros_like(x), jnp.ones((), jnp.float32))
  return _scan(step, carry, grid)[0]


# --------------------------------------------------------------------------------------------
# Consistency-type samplers
# --------------------------------------------------------------------------------------------


def _consistency(denoiser, process, x, grid, noise_at):
  """Multistep consistency sampling: x0 = f(x_t, t), x_next = alpha_n x0 + sigma_n z.

  The denoiser is the consistency function. Returns the last x0. (Song et al.'s sampler
  re-noises with sqrt(t_n^2 - sigma_min^2) instead of sigma_n; here the re-noised state is
  exactly on the process's marginal at t_next.)
  """
  def step(carry, a):
    x, _ = carry
    i, t, tn = a
    alpha_n, sigma_n = process.alpha_sigma(tn)
    x0 = _denoise(denoiser, x, t)
    return alpha_n * x0 + sigma_n * noise_at(i), x0
  return _scan(step, (x, jnp.zeros_like(x)), grid)[1]


def _lcm(denoiser, process, x, grid, noise_at, timestep_scaling: float = 10.0,
         sigma_data: float = 0.5):
  """diffusers LCMScheduler: f = c_skip x + c_out x0_hat with LCM's discrete boundary scalings
  at process.timestep(t), then consistency re-noising (the last denoised output is returned)."""
  def boundary(x_t, t):
    c_skip, c_out = procs.lcm_boundary_scalings(process.timestep(t), sigma_data, timestep_scaling)
    return procs.expand_like(c_skip, x_t) * x_t + procs.expand_like(c_out, x_t) * denoiser(x_t, t)
  return _consistency(boundary, process, x, grid, noise_at)


def _tcd(denoiser, process, x, grid, noise_at, gamma: float = 0.3):
  """TCD strategic stochastic sampling (Zheng et al. 2024; diffusers TCDScheduler, gamma = eta).

  s = floor((1 - gamma) t_next) (floored on discrete processes); z_s = alpha_s x0 + sigma_s eps;
  x_next = (alpha_n / alpha_s) z_s + sqrt(sigma_n^2 - (alpha_n / alpha_s)^2 sigma_s^2) z
  (the forward transition s -> t_next). gamma = 0 is DDIM; the output is the last x_next.
  """
  stochastic = not _is_zero(gamma)

  def step(x, a):
    i, t, tn = a
    alpha, sigma = process.alpha_sigma(t)
    x0 = _denoise(denoiser, x, t)
    eps = (x - alpha * x0) / sigma
    s = process.floor_time((1.0 - gamma) * tn)
    alpha_s, sigma_s = process.alpha_sigma(s)
    z_s = alpha_s * x0 + sigma_s * eps
    if not stochastic:
      return z_s
    alpha_n, sigma_n = process.alpha_sigma(tn)
    ratio = alpha_n / alpha_s
    std = jnp.sqrt(jnp.maximum(jnp.square(sigma_n) - jnp.square(ratio * sigma_s), 0.0))
    return ratio * z_s + std * noise_at(i)
  return _scan(step, x, grid)


def _grid_through(process, steps: int, intermediate: Sequence[float]) -> np.ndarray:
  """[t_max, intermediate..., t_end] as float32; steps - 1 intermediate times."""
  if len(intermediate) != steps - 1:
    raise ValueError(f"{steps} steps need {steps - 1} intermediate times, got {intermediate}")
  grid = [process.t_max, *[float(u) for u in intermediate], process.t_end]
  return np.asarray(grid, np.float32)


def refine_grid(process, steps: int, refine_from: Optional[float] = None,
                **grid_kwargs) -> np.ndarray:
  """The process's default grid; with `refine_from` = r: [t_max, r, ..., t_end], one step from
  t_max to r and steps - 1 evenly spaced steps from r to t_end (4 steps: r, 2r/3, r/3 on a
  process ending at 0). A consistency sampler's later steps then re-noise only to low noise."""
  if refine_from is None:
    return process.timesteps(steps, **grid_kwargs)
  r = float(refine_from)
  if not process.t_end < r < process.t_max:
    raise ValueError(f"sampler grid: refine_from={r} must lie between the process's clean end "
                     f"{process.t_end} and t_max {process.t_max}")
  return _grid_through(process, steps, np.linspace(r, process.t_end, steps)[:-1] if steps > 1
                       else ())


def trigflow_grid(process, steps: int, intermediate: Optional[Sequence[float]] = None,
                  mid_t: float = 1.1) -> np.ndarray:
  """sCM grid [t_max, intermediate..., t_end]: 2 steps -> [pi/2, mid_t, 0] (sCM's 1.1;
  diffusers' pipeline uses 1.3); otherwise `intermediate` or linspace(t_max, 0, steps + 1)."""
  if intermediate is None:
    if steps == 2:
      intermediate = (mid_t,)
    else:
      intermediate = np.linspace(process.t_max, process.t_end, steps + 1)[1:-1]
  return _grid_through(process, steps, intermediate)


def lcm_grid(process, steps: int, original_steps: int = 50, **grid_kwargs) -> np.ndarray:
  """LCMScheduler's grid: on a discrete process, `steps` of the `original_steps`-step DDIM
  times the LCM student is trained on (the "lcm" spacing; 4 of 50 on SD: 999, 759, 499, 259),
  then t_end; on continuous processes their own grid (no lattice to stay on)."""
  if getattr(process, "name", "") == "vp_discrete" and "spacing" not in grid_kwargs:
    return process.timesteps(steps, spacing="lcm", original_steps=int(original_steps),
                             **grid_kwargs)
  return process.timesteps(steps, **grid_kwargs)


def cm_grid(process, steps: int, intermediate: Optional[Sequence[float]] = None) -> np.ndarray:
  """Consistency-model multistep grid [t_max, intermediate..., t_end]: by default the first
  `steps` times of the rho-spaced (Karras) grid of steps + 1 times from t_max to t_min (1 step:
  [t_max, t_end]; 2 steps on EDM(0.002, 80): [80, 2.51, 0]), or the given intermediate times
  (ECT's 2-step mid time 0.821)."""
  if intermediate is None:
    rho = float(getattr(process, "rho", 7.0))
    intermediate = procs.karras_sigmas(steps + 1, process.t_min, process.t_max, rho)[1:-1]
  return _grid_through(process, steps, intermediate)


SOLVERS.add("euler", Solver(_euler))
SOLVERS.add("heun", Solver(_heun, nfe=lambda steps: 2 * steps - 1))
SOLVERS.add("ddim", Solver(_ddim))
SOLVERS.add("dpmpp_2m", Solver(_dpmpp_2m))
SOLVERS.add("consistency", Solver(_consistency, grid=refine_grid))
SOLVERS.add("lcm", Solver(_lcm, grid=lcm_grid))
SOLVERS.add("tcd", Solver(_tcd, grid=refine_grid))
SOLVERS.add("trigflow", Solver(_consistency, grid=trigflow_grid))
SOLVERS.add("cm", Solver(_consistency, grid=cm_grid))
