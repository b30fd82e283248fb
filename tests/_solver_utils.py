"""Shared helpers of tests/test_processes.py and tests/test_solvers.py.

A fixed random nonlinear model of (x, timestep) written once in JAX (both our samplers and the
diffusers loops call it, the latter through numpy), the exact denoiser of Gaussian data and the
exact probability-flow ODE map of Gaussian data.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from distill import processes as procs


def random_model(dim: int, seed: int, *, skip: float, time_scale: float, hidden: int = 32):
  """fn(x, timestep) = skip * x + 0.3 * tanh(x W1 + sin(timestep * f / time_scale + p)) W2.

  `timestep` is per-sample (B,). A smooth model that depends on both x and the timestep, so a
  wrong timestep, wrong input scaling or wrong coefficient changes the result.
  """
  rs = np.random.RandomState(seed)
  w1 = jnp.asarray(rs.randn(dim, hidden) / np.sqrt(dim), jnp.float32)
  w2 = jnp.asarray(rs.randn(hidden, dim) / np.sqrt(hidden), jnp.float32)
  freq = jnp.asarray(3.0 * rs.randn(hidden), jnp.float32)
  phase = jnp.asarray(rs.uniform(0, 2 * np.pi, hidden), jnp.float32)

  def fn(x, timestep):
    timestep = jnp.asarray(timestep, jnp.float32).reshape(-1, 1)
    h = jnp.tanh(x @ w1 + jnp.sin(timestep * freq / time_scale + phase))
    return skip * x + 0.3 * (h @ w2)
  return fn


def as_torch_model(fn):
  """Wraps a JAX fn(x, timestep) as a torch fn(sample, t) for a diffusers loop."""
  import torch

  def call(sample, t):
    x = np.asarray(sample.detach().cpu().numpy(), np.float32)
    ts = np.full((x.shape[0],), float(t), np.float32)
    return torch.from_numpy(np.array(fn(jnp.asarray(x), jnp.asarray(ts))))
  return call


def gaussian_denoiser(process, data_std: float):
  """E[x0 | x_t] for x0 ~ N(0, s^2 I): alpha s^2 / (alpha^2 s^2 + sigma^2) x_t."""
  def denoiser(x, t):
    a, s = process.alpha_sigma(t)
    k = a * data_std ** 2 / (jnp.square(a) * data_std ** 2 + jnp.square(s))
    return procs.expand_like(k, x) * x
  return denoiser


def marginal_std(process, t, data_std: float) -> np.ndarray:
  """Std of x_t for Gaussian data, in float64 numpy."""
  a, s = process.alpha_sigma(t)
  a, s = np.asarray(a, np.float64), np.asarray(s, np.float64)
  return np.sqrt(a ** 2 * data_std ** 2 + s ** 2)


def exact_ode_map(process, x, t_from, t_to, data_std: float) -> np.ndarray:
  """The PF-ODE of Gaussian data is linear: x_t = x_T * std(t) / std(T)."""
  ratio = marginal_std(process, t_to, data_std) / marginal_std(process, t_from, data_std)
  return np.asarray(x, np.float64) * ratio
