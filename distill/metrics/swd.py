"""Sliced Wasserstein distance (SW2) between two equal-size sample sets, with fixed projections.

Definition (exactly what `swd` returns). With `K = num_projections` unit directions
`theta_1..theta_K` drawn once from `seed` (standard normals in float64, each normalised to unit
length, i.e. uniform on the sphere S^{D-1}), and `n` samples in each set,

    swd(x, y) = sqrt( 1/K sum_k  1/n sum_i (sort(x theta_k)_i - sort(y theta_k)_i)^2 ),

the square root of the mean over projections of the squared 1-D Wasserstein-2 distance between
the two empirical distributions (sorting matches quantiles). This is a Monte-Carlo estimate of
SW2 = (E_theta W2^2(theta#P, theta#Q))^(1/2). Example: for N(0, I_D) against N(m, I_D),
SW2^2 = E_theta (theta . m)^2 = |m|^2 / D.

Samples of any shape `(n, ...)` are flattened to `(n, D)`. All arithmetic is numpy float64, so
results are deterministic. Every number compared in one report must use the same `n`,
`num_projections` and `seed`.
"""
from __future__ import annotations

import numpy as np


def projections(dim: int, num_projections: int = 256, seed: int = 0) -> np.ndarray:
  """`(dim, num_projections)` float64 unit directions, uniform on the sphere, fixed by `seed`."""
  rng = np.random.default_rng(seed)
  theta = rng.standard_normal((num_projections, dim))
  theta /= np.linalg.norm(theta, axis=1, keepdims=True)
  return theta.T


def swd(x, y, num_projections: int = 256, seed: int = 0) -> float:
  """SW2 between equal-size sample sets `x` and `y` (see the module docstring)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  y = np.asarray(y, np.float64).reshape(len(y), -1)
  if x.shape != y.shape:
    raise ValueError(f"swd needs equal-size sets of equal dimension, got {x.shape} and {y.shape}")
  if not len(x):
    raise ValueError("swd needs at least one sample")
  theta = projections(x.shape[1], num_projections, seed)
  px = np.sort(x @ theta, axis=0)
  py = np.sort(y @ theta, axis=0)
  return float(np.sqrt(np.mean((px - py) ** 2)))


def floor_seeds(seed: int) -> tuple[int, int]:
  """The two reference seeds `data_floor` compares: `seed` and one derived from it."""
  other = int(np.random.SeedSequence([int(seed) & 0xFFFF_FFFF, 0x5EED]).generate_state(1)[0])
  return int(seed), other


def data_floor(source, n: int, seed: int = 0, num_projections: int = 256,
               projection_seed: int = 0) -> float:
  """The noise floor: `swd` between two independent real samples of size `n` from `source`.

  The samples are `source.reference(n, a)` and `source.reference(n, b)` with
  `(a, b) = floor_seeds(seed)`; pass the same `num_projections`/`projection_seed` as the
  numbers it is reported beside.
  """
  a, b = floor_seeds(seed)
  return swd(source.reference(n, a), source.reference(n, b), num_projections, projection_seed)
