"""Network wrappers: a network seen through a change of parameterisation, without retraining.

    Network("student", init="teacher", wrapper="flow_to_trigflow(sigma_data=1.0)")

`Network.wrapper` is a spec string: a registered name, optionally with keyword arguments in
call syntax (literal values only). `WRAPPERS.get(spec)` returns the configured wrapper. A wrapper
has two parts:

- `present(process, prediction) -> (process, prediction)`: the process and prediction kind the
  wrapped network presents. `NetInfo` applies it when it is built (distill/context.py): the
  network's `process` / `prediction` become the presented ones, and the network's own are kept
  as `inner_process` / `inner_prediction`. Samplers, `ctx.x0` and losses only see the
  presented view.
- `__call__(info, raw, t) -> fn(x_t, timestep, **kw)`: the seam of `Context.apply`. `raw(x,
  timestep, **kw)` applies the network; `t` is the presented process's time (per sample,
  traced, differentiable: `jax.jvp` through `ctx.apply` reaches the time change inside).

## flow_to_trigflow

A rectified-flow network (x_s = (1 - s) x0 + s eps, any prediction kind, usually "flow" =
eps - x0) presented as a TrigFlow model (x_t = cos t x0 + sin t z, z = sigma_d eps, output F with
sigma_d F = dx_t/dt). Both processes share the data x0 and the unit noise eps; matching the
signal-to-noise ratio (1 - s) / s = cos t / (sigma_d sin t) gives, with k = cos t + sigma_d sin t,

    s = sigma_d sin t / k,        x_s = x_t / k,

and from the network's (x0_hat, eps_hat) at (x_s, s) (`processes.decode`)

    F = dx_t/dt / sigma_d = cos t eps_hat - sin t x0_hat / sigma_d.

With sigma_d = 1 this is SANA-Sprint's map (s = sin t / (sin t + cos t), x^F = x_t / (sin t +
cos t), F = ((1 - 2s) x^F + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)). SANA-Sprint with its
sigma_d = 0.5 scales the *data* too (its TrigFlow clean sample is sigma_d times the flow
model's latent), which is this map with sigma_d = 1 up to a global scale; here the TrigFlow
process keeps the teacher's data space, so samples and metrics compare directly.

A network whose process already is TrigFlow with the same sigma_d and kind "trigflow" passes
through unchanged. The converted model's TrigFlow velocity equals the finite difference of the
network's own ODE mapped into TrigFlow coordinates (tests/test_scm.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from distill import processes as procs
from distill import registry
from distill.registry import Registry

Array = jax.Array


class WrapperRegistry(Registry):
  """A registry of wrapper factories; `get("name(k=v, ...)")` calls the factory with kwargs."""

  def get(self, spec: str):
    name, kwargs = parse_spec(spec)
    return super().get(name)(**kwargs)


def parse_spec(spec: str) -> tuple[str, dict]:
  """'name' or 'name(a=1.0, b="x")' -> (name, kwargs); values must be Python literals."""
  return registry.parse_spec(spec, "wrapper")


def wrapper_spec(name: str, **kwargs) -> str:
  """The spec string of wrapper `name` with `kwargs` (the inverse of `parse_spec`)."""
  if not kwargs:
    return name
  return f"{name}({', '.join(f'{k}={v!r}' for k, v in sorted(kwargs.items()))})"


WRAPPERS: WrapperRegistry = WrapperRegistry("wrapper")


# --------------------------------------------------------------------------------------------
# rectified flow (or TrigFlow) -> TrigFlow
# --------------------------------------------------------------------------------------------


def rf_coordinates(t, sigma_data: float) -> tuple[Array, Array]:
  """(s, scale): the rectified-flow time of TrigFlow time t and x_s = scale * x_t (same SNR)."""
  t = jnp.asarray(t, jnp.float32)
  k = jnp.cos(t) + sigma_data * jnp.sin(t)
  return sigma_data * jnp.sin(t) / k, 1.0 / k


def trigflow_from_x0_eps(x0: Array, eps: Array, t, sigma_data: float) -> Array:
  """F = cos t eps - sin t x0 / sigma_d (sigma_d F = dx_t/dt), t scalar or per sample."""
  t = procs.expand_like(jnp.asarray(t, jnp.float32), x0)
  return jnp.cos(t) * eps - jnp.sin(t) * x0 / sigma_data


def as_trigflow(apply_inner: Callable[[Array, Array], Array], process, prediction: str,
                x_t: Array, t: Array, sigma_data: float) -> Array:
  """TrigFlow F(x_t, t) of a network given as apply_inner(x, s) -> raw output at its own time s.

  `process` / `prediction` are the network's own. Supported: rectified flow (any kind) and
  TrigFlow with the same sigma_d ("trigflow" kind: identity; other kinds: converted).
  t is per sample (B,); differentiable in x_t and t.
  """
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
  name = getattr(process, "name", "")
  if name == "rectified_flow":
    s, scale = rf_coordinates(t, sigma_data)
    x_s = procs.expand_like(scale, x_t) * x_t
    out = apply_inner(x_s, s)
    alpha, sigma = process.alpha_sigma(s)
    x0, eps = procs.decode(out, prediction, x_s, procs.expand_like(alpha, x_t),
                           procs.expand_like(sigma, x_t))
    return trigflow_from_x0_eps(x0, eps, t, sigma_data)
  if name == "trigflow" and float(process.sigma_data) == float(sigma_data):
    out = apply_inner(x_t, t)
    if prediction == "trigflow":
      return out
    alpha, sigma = process.alpha_sigma(t)
    x0, eps = procs.decode(out, prediction, x_t, procs.expand_like(alpha, x_t),
                           procs.expand_like(sigma, x_t))
    return trigflow_from_x0_eps(x0, eps, t, sigma_data)
  raise ValueError(f"flow_to_trigflow: cannot present a network of process {name!r} "
                   f"(sigma_data={getattr(process, 'sigma_data', None)}) as TrigFlow with "
                   f"sigma_data={sigma_data}; supported: rectified_flow, trigflow (same "
                   "sigma_data)")


@dataclasses.dataclass(frozen=True)
class FlowToTrigFlow:
  """Presents a rectified-flow network as a TrigFlow model with `sigma_data` (module docstring).

  The presented process is `trigflow` with this sigma_data (p_mean / p_std / c_noise only
  describe the presented process; the wrapped network's time input is its own, s).
  """
  sigma_data: float = 0.5
  p_mean: float = -1.0
  p_std: float = 1.4

  def present(self, process, prediction: str) -> tuple[Any, str]:
    name = getattr(process, "name", "")
    if name not in ("rectified_flow", "trigflow"):
      raise ValueError(f"wrapper flow_to_trigflow: the network's process is {name!r}; "
                       "supported: rectified_flow, trigflow")
    if name == "trigflow" and float(process.sigma_data) != float(self.sigma_data):
      raise ValueError(f"wrapper flow_to_trigflow: the network is TrigFlow with sigma_data="
                       f"{process.sigma_data}, the wrapper asks for {self.sigma_data}")
    out = procs.make_process("trigflow", sigma_data=float(self.sigma_data),
                             p_mean=float(self.p_mean), p_std=float(self.p_std))
    return out, "trigflow"

  def __call__(self, info, raw: Callable, t: Array) -> Callable:
    inner_process, inner_prediction = info.inner_process, info.inner_prediction

    def fn(x_t, timestep, **kw):
      del timestep  # the presented process's time input; the network takes its own
      apply_inner = lambda x, s: raw(x, inner_process.timestep(s), **kw)
      return as_trigflow(apply_inner, inner_process, inner_prediction, x_t, t, self.sigma_data)
    return fn


WRAPPERS.add("flow_to_trigflow", FlowToTrigFlow)


# --------------------------------------------------------------------------------------------
# any (alpha, sigma) process -> EDM, optionally as a consistency function
# --------------------------------------------------------------------------------------------
#
# EDM coordinates of a process x_t = alpha_t x0 + sigma_t eps: x_e = x_t / alpha_t at
# sigma_e = sigma_t / alpha_t (the same x0, eps and signal-to-noise ratio). The inverse maps,
# sigma_e -> (the process's own t, alpha_t), by process name:

EDM_TIMES: dict[str, Callable] = {
    # EDM itself: t = sigma, alpha = 1.
    "edm": lambda process, sigma: (sigma, jnp.ones_like(sigma)),
    # Rectified flow: sigma_e = s / (1 - s)  =>  s = sigma_e / (1 + sigma_e), alpha = 1 - s.
    "rectified_flow": lambda process, sigma: (sigma / (1.0 + sigma), 1.0 / (1.0 + sigma)),
    # TrigFlow: sigma_e = sigma_d tan t  =>  t = arctan(sigma_e / sigma_d), alpha = cos t.
    "trigflow": lambda process, sigma: (jnp.arctan(sigma / process.sigma_data),
                                        jnp.cos(jnp.arctan(sigma / process.sigma_data))),
}


def from_edm(process, x_e: Array, sigma: Array, what: str = "edm_consistency"
             ) -> tuple[Array, Array]:
  """(x_t, t): EDM coordinates (x_e at noise level sigma, per sample) in `process`'s own
  (x_t = alpha_t x_e at the t of the same signal-to-noise ratio). `what` names the caller in
  the error for an unsupported process."""
  name = getattr(process, "name", "")
  if name not in EDM_TIMES:
    raise ValueError(f"{what}: cannot read a network of process {name!r} in EDM coordinates; "
                     f"supported: {', '.join(sorted(EDM_TIMES))}")
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x_e.shape[0],))
  t, alpha = EDM_TIMES[name](process, sigma)
  return procs.expand_like(alpha, x_e) * x_e, t


def as_edm_x0(apply_inner: Callable[[Array, Array], Array], process, prediction: str,
              x_e: Array, sigma: Array) -> Array:
  """The denoiser D(x_e, sigma) = x0_hat of a network given as apply_inner(x, t) -> raw output
  at its own time t (`process` / `prediction` its own). sigma is per sample (B,) and > 0;
  differentiable in x_e and sigma."""
  x_t, t = from_edm(process, x_e, sigma)
  out = apply_inner(x_t, t)
  a, s = process.alpha_sigma(t)
  x0, _ = procs.decode(out, prediction, x_t, procs.expand_like(a, x_e), procs.expand_like(s, x_e))
  return x0


def consistency_from_denoiser(x_e: Array, sigma: Array, denoised: Array, *, sigma_data: float,
                              sigma_min: float) -> Array:
  """f(x, sigma) = c_skip(sigma) x + c_out(sigma) F with the consistency boundary scalings and
  F = (D - c_skip^EDM x) / c_out^EDM the raw EDM output of the denoiser D (Song et al. 2023's
  parameterisation of an EDM network). f(x, sigma_min) = x exactly; f -> D for sigma >>
  sigma_min. Since c_out / c_out^EDM = (sigma - sigma_min) / sigma:
  f = c_skip x + (1 - sigma_min / sigma) (D - c_skip^EDM x)."""
  sigma = procs.expand_like(jnp.asarray(sigma, jnp.float32), x_e)
  c_skip, _, _ = procs.consistency_scalings(sigma, sigma_data, sigma_min)
  c_skip_edm, _, _, _ = procs.edm_scalings(sigma, sigma_data)
  ratio = jnp.where(sigma > 0, 1.0 - sigma_min / jnp.where(sigma > 0, sigma, 1.0), 0.0)
  return c_skip * x_e + ratio * (denoised - c_skip_edm * x_e)


@dataclasses.dataclass(frozen=True)
class EDMConsistency:
  """Presents a network of any supported process (EDM_TIMES) as an EDM x0-predictor (process
  "edm" with these sigma_min / sigma_max / sigma_data / rho) whose output is the consistency
  function f(x, sigma) of `consistency_from_denoiser` (`boundary=True`) or the plain denoiser
  D (`boundary=False`: ECT's training-time preconditioning). Samplers and losses see x0 = f."""
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  rho: float = 7.0
  boundary: bool = True

  def present(self, process, prediction: str) -> tuple[Any, str]:
    name = getattr(process, "name", "")
    if name not in EDM_TIMES:
      raise ValueError(f"wrapper edm_consistency: the network's process is {name!r}; "
                       f"supported: {', '.join(sorted(EDM_TIMES))}")
    out = procs.make_process("edm", sigma_min=float(self.sigma_min),
                             sigma_max=float(self.sigma_max),
                             sigma_data=float(self.sigma_data), rho=float(self.rho))
    return out, "x0"

  def __call__(self, info, raw: Callable, t: Array) -> Callable:
    inner_process, inner_prediction = info.inner_process, info.inner_prediction

    def fn(x_e, timestep, **kw):
      del timestep  # the presented process's time input; the network takes its own
      apply_inner = lambda x, s: raw(x, inner_process.timestep(s), **kw)
      d = as_edm_x0(apply_inner, inner_process, inner_prediction, x_e, t)
      if not self.boundary:
        return d
      return consistency_from_denoiser(x_e, t, d, sigma_data=self.sigma_data,
                                       sigma_min=self.sigma_min)
    return fn


WRAPPERS.add("edm_consistency", EDMConsistency)
