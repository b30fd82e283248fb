"""Frechet distance between Gaussians fitted to features (FID-style), in float64.

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

The matrix square root is `scipy.linalg.sqrtm`. When it is not finite, or its relative error
`|X X - S1 S2|_F / |S1 S2|_F` exceeds `tol`, both covariances get `eps * I` added and the root
is recomputed (the fallback of the reference FID implementation). A complex result whose
imaginary part is negligible (`max |imag| <= 1e-3 * max(1, max |real|)`) is replaced by its real
part; a larger imaginary part raises. Tiny negative results from rounding are clipped to 0.
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
