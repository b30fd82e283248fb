"""Frechet distance: closed forms, an independent eigen-decomposition computation, robustness."""
import numpy as np
import pytest

from distill.metrics.frechet import frechet_distance, stats


def _spd(d, seed, rank=None):
  a = np.random.default_rng(seed).standard_normal((d, rank or d))
  return a @ a.T / d + (0 if rank else 0.1) * np.eye(d)


def _psd_sqrt(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _reference_fd(mu1, s1, mu2, s2):
  """tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): symmetric, via eigh only (no sqrtm)."""
  r1 = _psd_sqrt(s1)
  cross = np.trace(_psd_sqrt(r1 @ s2 @ r1))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross)


def test_stats_mean_and_unbiased_covariance():
  f = np.random.default_rng(0).standard_normal((50, 2, 3)).astype(np.float32)
  mu, sigma = stats(f)
  flat = f.reshape(50, 6).astype(np.float64)
  assert mu.shape == (6,) and sigma.shape == (6, 6) and sigma.dtype == np.float64
  np.testing.assert_allclose(mu, flat.mean(0), rtol=1e-12)
  centred = flat - flat.mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / 49, rtol=1e-10)
  assert stats(np.arange(10.0)[:, None])[1].shape == (1, 1)


def test_identical_is_zero_and_symmetric():
  mu, s = np.ones(8), _spd(8, 0)
  assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
  mu2, s2 = np.zeros(8), _spd(8, 1)
  np.testing.assert_allclose(frechet_distance(mu, s, mu2, s2), frechet_distance(mu2, s2, mu, s),
                             rtol=1e-9)


def test_closed_forms():
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2.
  assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)
  # Diagonal (commuting) covariances: |dm|^2 + sum (sqrt(a) - sqrt(b))^2.
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3.0, 16), rng.uniform(0.1, 3.0, 16)
  m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(frechet_distance(m1, np.diag(a), m2, np.diag(b)), expected, rtol=1e-10)
  # Scaling both Gaussians by c scales the distance by c^2.
  s1, s2 = _spd(6, 2), _spd(6, 3)
  np.testing.assert_allclose(frechet_distance(3 * m1[:6], 9 * s1, 3 * m2[:6], 9 * s2),
                             9 * frechet_distance(m1[:6], s1, m2[:6], s2), rtol=1e-9)


def test_matches_independent_float64_computation():
  rng = np.random.default_rng(1)
  for d, seed in ((3, 0), (32, 1), (64, 2)):
    m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(d, seed), _spd(d, seed + 100)
    np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), _reference_fd(m1, s1, m2, s2),
                               rtol=1e-8)


def test_float32_features_computed_in_float64():
  """Large-offset float32 features: the statistics and the distance must not lose precision."""
  rng = np.random.default_rng(0)
  f1 = (rng.standard_normal((4000, 8)) + 1000.0).astype(np.float32)
  f2 = (rng.standard_normal((4000, 8)) * 1.5 + 1000.5).astype(np.float32)
  got = frechet_distance(*stats(f1), *stats(f2))
  g1, g2 = f1.astype(np.float64), f2.astype(np.float64)
  want = _reference_fd(g1.mean(0), np.cov(g1, rowvar=False), g2.mean(0), np.cov(g2, rowvar=False))
  np.testing.assert_allclose(got, want, rtol=1e-8)
  np.testing.assert_allclose(got, 8 * 0.25 + 8 * 0.25, rtol=0.1)  # |dm|^2 + sum (1 - 1.5)^2


def test_rank_deficient_covariances_stay_finite_and_accurate():
  """Fewer samples than dimensions (singular covariances): the eps-offset fallback keeps it real."""
  d = 64
  f1 = np.random.default_rng(0).standard_normal((20, d))
  f2 = np.random.default_rng(1).standard_normal((20, d)) + 0.1
  (m1, s1), (m2, s2) = stats(f1), stats(f2)
  got = frechet_distance(m1, s1, m2, s2)
  assert np.isfinite(got) and got >= 0.0
  np.testing.assert_allclose(got, _reference_fd(m1, s1, m2, s2), rtol=1e-3)
  assert frechet_distance(np.zeros(3), np.zeros((3, 3)), np.zeros(3), np.zeros((3, 3))) == 0.0


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="mismatched"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fallback_paths(monkeypatch):
  """A non-finite root triggers the eps-offset retry; tiny imaginary parts are dropped."""
  from distill.metrics import frechet  # pylint: disable=g-import-not-at-top
  real_sqrtm = frechet.scipy.linalg.sqrtm
  m1, m2, s1, s2 = np.zeros(4), np.ones(4), _spd(4, 0), _spd(4, 1)
  want = _reference_fd(m1, s1, m2, s2)
  calls = []

  def nan_first(a):
    calls.append(a)
    return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", nan_first)
  np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2, eps=1e-6), want, rtol=1e-5)
  assert len(calls) == 2
  np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(4)) @ (s2 + 1e-6 * np.eye(4)))

  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 1e-9j)
  np.testing.assert_allclose(frechet_distance(m1, s1, m2, s2), want, rtol=1e-8)
  monkeypatch.setattr(frechet.scipy.linalg, "sqrtm", lambda a: real_sqrtm(a) + 0.5j)
  with pytest.raises(FloatingPointError, match="imaginary"):
    frechet_distance(m1, s1, m2, s2)


def test_few_samples_against_moments_equal_the_features_form():
  """Few samples against a reference given by (mu, sigma) only (a published statistics file):
  `frechet_distance_features_moments` equals the exact two-sided features form when sigma is
  the covariance of reference features, and the sqrtm formula where that is well posed.
  Tolerance 1e-8 relative: float64 eigen / singular values of small matrices."""
  from distill.metrics.frechet import (frechet_distance_features,
                                       frechet_distance_features_moments)
  rng = np.random.default_rng(3)
  d = 64
  x = rng.standard_normal((12, d)) * 0.7 + 0.2                   # singular: 11 < 64
  y = rng.standard_normal((200, d)) @ rng.standard_normal((d, d)) * 0.2
  want = frechet_distance_features(x, y)
  got = frechet_distance_features_moments(x, *stats(y))
  assert got == pytest.approx(want, rel=1e-8)
  x = rng.standard_normal((300, 8))                               # well posed: sqrtm agrees
  y = rng.standard_normal((300, 8)) * 1.3 + 0.5
  assert frechet_distance_features_moments(x, *stats(y)) == pytest.approx(
      frechet_distance(*stats(x), *stats(y)), rel=1e-8)
  with pytest.raises(ValueError, match="mismatched shapes"):
    frechet_distance_features_moments(x, np.zeros(3), np.eye(3))
