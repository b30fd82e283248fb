"""Frechet distance between Gaussians fitted to features (FID-style), in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The matrix square root is `scipy.linalg.sqrtm`. When it is not finite, or its relative error
`|X X - S1 S2|_F / |S1 S2|_F` exceeds `tol`, both covariances get `eps * I` added and the root
is recomputed (the fallback of the reference FID implementation). A complex result whose
imaginary part is negligible (`max |imag| <= 1e-3 * max(1, max |real|)`) is replaced by its real
part; a larger imaginary part raises. Tiny negative results from rounding are clipped to 0.

Few samples (`frechet_distance_features`). With n1 + n2 - 2 < D the covariances are singular
(rank <= n - 1): the D x D square root is slow (minutes at D = 2048 on a small CPU) and ill
posed. From the features themselves the same quantity is exact and cheap: with A, B the centred
features (n1 x D, n2 x D), S1 = A^T A / (n1 - 1), S2 = B^T B / (n2 - 1), the non-zero eigenvalues
of S1 S2 are those of C C^T / c with C = A B^T (n1 x n2) and c = (n1 - 1)(n2 - 1), so

    tr((S1 S2)^(1/2)) = sum_i sv_i(C) / sqrt(c)      (the nuclear norm of C, scaled)

No eps offset is involved. Every sum is float64.

Few samples against published moments (`frechet_distance_features_moments`: a reference given
as (mu, sigma) only, e.g. pytorch-fid's statistics). With S1 = A^T A / (n1 - 1) as above and S2
any covariance, the non-zero eigenvalues of S1 S2 are those of the n1 x n1 symmetric PSD matrix
A S2 A^T / (n1 - 1), so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A^T / (n1 - 1))): exact,
O(n1 D^2), and never the ill-posed D x D root of a singular product.
"""
from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def stats(features) -> tuple[np.ndarray, np.ndarray]:
  """`(mu, sigma)`: mean `(D,)` and unbiased covariance `(D, D)` of `(n, ...)` features, float64."""
  f = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(f) < 2:
    raise ValueError(f"stats needs at least 2 samples, got {len(f)}")
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_product(s1: np.ndarray, s2: np.ndarray, tol: float) -> tuple[np.ndarray, float]:
  """`(sqrtm(s1 @ s2), relative error)`; the error is inf when the root is not finite."""
  prod = s1 @ s2
  with warnings.catch_warnings():  # singularity is detected below from the actual error
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    root = np.asarray(scipy.linalg.sqrtm(prod))
  if not np.all(np.isfinite(root)):
    return root, np.inf
  scale = max(np.linalg.norm(prod), 1e-300)
  return root, float(np.linalg.norm(root @ root - prod) / scale)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, tol: float = 1e-6) -> float:
  """The Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2,
                                                                                  np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f"mismatched shapes: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
  covmean, err = _sqrtm_product(s1, s2, tol)
  if err > tol:
    offset = eps * np.eye(len(s1))
    covmean, err = _sqrtm_product(s1 + offset, s2 + offset, tol)
    if not np.isfinite(err):
      raise FloatingPointError("sqrtm of the covariance product is not finite, even with offset")
  if np.iscomplexobj(covmean):
    bound = 1e-3 * max(1.0, float(np.max(np.abs(covmean.real))))
    if np.max(np.abs(covmean.imag)) > bound:
      raise FloatingPointError(f"sqrtm has a large imaginary part {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  diff = mu1 - mu2
  value = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)
  return float(max(value, 0.0))


def frechet_distance_features(x, y) -> float:
  """The Frechet distance between the Gaussians fitted (`stats`) to features `x` (n1, ...) and
  `y` (n2, ...), through the n1 x n2 cross-Gram matrix (module docstring): exact, for any sizes,
  and the fast path when n1 + n2 is small against the feature dimension (O(n1 n2 D))."""
  a = np.asarray(x, np.float64).reshape(len(x), -1)
  b = np.asarray(y, np.float64).reshape(len(y), -1)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"mismatched feature dimensions {a.shape[1]} and {b.shape[1]}")
  if len(a) < 2 or len(b) < 2:
    raise ValueError(f"the Frechet distance needs at least 2 samples per set, got {len(a)} and "
                     f"{len(b)}")
  diff = a.mean(axis=0) - b.mean(axis=0)
  a = a - a.mean(axis=0)
  b = b - b.mean(axis=0)
  c = (len(a) - 1) * (len(b) - 1)
  cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c)
  value = (diff @ diff + np.sum(a * a) / (len(a) - 1) + np.sum(b * b) / (len(b) - 1)
           - 2.0 * cross)
  return float(max(value, 0.0))


def frechet_distance_features_moments(x, mu2, sigma2) -> float:
  """The Frechet distance between the Gaussian fitted (`stats`) to features `x` (n1, ...) and
  N(mu2, sigma2), through the n1 x n1 matrix A sigma2 A^T (module docstring): exact, and the
  stable path when n1 - 1 < D (the samples' covariance is singular)."""
  a = np.asarray(x, np.float64).reshape(len(x), -1)
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu2.shape != (a.shape[1],) or s2.shape != (a.shape[1],) * 2:
    raise ValueError(f"mismatched shapes: features {a.shape}, mu {mu2.shape}, sigma {s2.shape}")
  if len(a) < 2:
    raise ValueError(f"the Frechet distance needs at least 2 samples, got {len(a)}")
  diff = a.mean(axis=0) - mu2
  a = a - a.mean(axis=0)
  m = a @ s2 @ a.T / (len(a) - 1)
  lam = np.linalg.eigvalsh(0.5 * (m + m.T))
  # Eigenvalues at rounding level are zeros (the centring's null direction, at least): their
  # square roots would add sqrt(eps)-sized terms.
  lam = np.where(lam > len(lam) * np.finfo(np.float64).eps * max(lam.max(), 0.0), lam, 0.0)
  cross = np.sqrt(lam).sum()
  value = diff @ diff + np.sum(a * a) / (len(a) - 1) + np.trace(s2) - 2.0 * cross
  return float(max(value, 0.0))


def prefer_features(n1: int, n2: int, dim: int) -> bool:
  """Whether `frechet_distance_features` is the better path: the covariances are singular
  (n1 + n2 - 2 < dim), so the D x D root is both slow and ill posed."""
  return n1 + n2 - 2 < dim
