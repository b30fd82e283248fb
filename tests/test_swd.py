"""Sliced Wasserstein distance: exact identities, closed forms, sample-size behaviour, floor."""
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from distill.data import sources
from distill.metrics.swd import data_floor, floor_seeds, projections, swd


def _gauss(n, d, seed, mean=0.0):
  return np.random.default_rng(seed).standard_normal((n, d)) + mean


def test_projections_are_fixed_unit_directions():
  p = projections(5, 64, seed=3)
  assert p.shape == (5, 64) and p.dtype == np.float64
  np.testing.assert_allclose(np.linalg.norm(p, axis=0), 1.0, rtol=1e-12)
  np.testing.assert_array_equal(p, projections(5, 64, seed=3))
  assert not np.array_equal(p, projections(5, 64, seed=4))


def test_identical_and_permuted_sets_are_zero_and_symmetric():
  x, y = _gauss(500, 3, 0), _gauss(500, 3, 1)
  assert swd(x, x) == 0.0
  assert swd(x, x[np.random.default_rng(0).permutation(500)]) == 0.0
  assert swd(x, y) > 0.0
  assert swd(x, y) == swd(y, x)
  assert swd(x, y, seed=0) == swd(x, y, seed=0)  # deterministic
  with pytest.raises(ValueError, match="equal-size"):
    swd(x, y[:-1])


def test_exact_shift_equals_projected_shift():
  """y = x + m moves every 1-D projection by theta.m, so SW2^2 = mean_k (theta_k . m)^2 exactly."""
  x, m = _gauss(200, 4, 0), np.array([1.0, -2.0, 0.5, 0.0])
  theta = projections(4, 256, seed=7)
  expected = np.sqrt(np.mean((m @ theta) ** 2))
  np.testing.assert_allclose(swd(x, x + m, seed=7), expected, rtol=1e-10)
  # ... and with many projections the average tends to E (theta.m)^2 = |m|^2 / D.
  np.testing.assert_allclose(swd(x, x + m, num_projections=20_000), np.linalg.norm(m) / 2.0,
                             rtol=0.02)


def test_shifted_gaussians_vs_closed_form():
  """Independent samples of N(0, I) and N(m, I): SW2^2 -> mean_k (theta_k.m)^2 ~ |m|^2 / D."""
  m = np.array([2.0, 0.0, 0.0, 0.0])
  value = swd(_gauss(10_000, 4, 0), _gauss(10_000, 4, 1, mean=m), seed=3)
  np.testing.assert_allclose(value, np.sqrt(np.mean((m @ projections(4, 256, seed=3)) ** 2)),
                             rtol=0.03)  # finite-sample noise only (floor ~0.02 at n = 10k)
  np.testing.assert_allclose(value, np.linalg.norm(m) / 2.0, rtol=0.1)  # + 256-projection noise


def test_matches_brute_force_optimal_transport_in_1d():
  """In 1-D the only projections are +-1; W2 is the optimal assignment under squared cost."""
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((40, 1)), rng.exponential(size=(40, 1))
  cost = (x - y.T) ** 2
  rows, cols = linear_sum_assignment(cost)
  np.testing.assert_allclose(swd(x, y, num_projections=8), np.sqrt(cost[rows, cols].mean()),
                             rtol=1e-10)


def test_decreases_with_sample_size_toward_floor():
  floors = [swd(_gauss(n, 2, 0), _gauss(n, 2, 1)) for n in (100, 400, 1600, 6400)]
  assert all(a > b for a, b in zip(floors, floors[1:]))
  ratios = np.array(floors[:-1]) / np.array(floors[1:])
  assert np.all((ratios > 1.3) & (ratios < 3.0)), ratios  # ~2 per 4x samples (n^-1/2)
  # A truly different distribution converges to a positive limit, far above the floor.
  shifted = [swd(_gauss(n, 2, 0), _gauss(n, 2, 1, mean=0.3)) for n in (100, 6400)]
  assert shifted[1] > 5 * floors[-1]
  np.testing.assert_allclose(shifted[1], 0.3, rtol=0.1)


def test_data_floor_on_a_toy_source():
  src = sources.make_source({"name": "gmm"}, seed=0)
  f1k, f4k = data_floor(src, 1000, seed=0), data_floor(src, 4000, seed=0)
  assert 0.0 < f4k < f1k
  assert data_floor(src, 1000, seed=0) == f1k
  a, b = floor_seeds(0)
  assert a == 0 and b != 0
  np.testing.assert_allclose(f1k, swd(src.reference(1000, a), src.reference(1000, b)))
  wider = sources.make_source({"name": "gmm", "std": 0.4}, seed=0).reference(4000, 123)
  assert swd(wider, src.reference(4000, 0)) > 2 * f4k
