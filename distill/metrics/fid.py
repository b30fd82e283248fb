"""FID, sFID, Inception Score and precision/recall in the FID Inception's features.

    FID     frechet.frechet_distance of the Gaussians fitted to the 2048-d pool features
            (Heusel et al. 2017); the one Frechet formula of the project (`frechet.py`).
    sFID    the same on the 2023-d spatial features (`mixed_6/conv`, first 7 channels; Nash et
            al. 2021, as ADM's evaluator).
    IS      exp(E_x KL(p(y|x) || p(y))) from the 1008-way logits (Salimans et al. 2016): the
            samples are cut into `splits` (10) consecutive parts (part i = rows
            [i n / splits, (i + 1) n / splits)), p(y) is each part's mean prediction, and the
            mean and standard deviation of the per-part scores are reported. Computed in float64
            from log-softmax. Uniform predictions give 1; confident predictions spread evenly
            over C classes give C.
    P / R   improved precision and recall (Kynkaanniemi et al. 2019), k = 3: each sample of a set
            gets the radius of the ball reaching its k-th nearest neighbour in that set (itself
            excluded); precision = share of generated samples inside at least one real ball
            (distance <= radius), recall = share of real samples inside at least one generated
            ball. Squared Euclidean distances in float32 on the device, computed block by block
            (`block` query rows against the whole set), so 50k x 50k never materialises.

Reference statistics are computed once and cached as `.npz` with the standard keys, so the
published ADM reference batches and pytorch-fid `.npz` statistics load directly:

    mu, sigma          pool-feature mean (2048,) and covariance (2048, 2048), float64
    mu_s, sigma_s      spatial-feature mean and covariance (sFID), when present
    features           the pool features themselves (n, 2048) float32, for precision/recall
                       (optional; a stats-only file gives FID/sFID but no P/R)
    meta               a JSON string describing what was measured (our own files only)

`InceptionMetrics` ties it together for evaluation code:

    m = InceptionMetrics("/path/pt_inception-2015-12-05-6726825d.pth")
    ref = m.reference(real_images, cache="ref_stats.npz", meta={"data": ..., "n": ...})
    m.scores(samples, ref)   # {"fid", "sfid", "inception_score", "inception_score_std",
                             #  "precision", "recall", "num_samples"}

`inception_scores(samples, reference, weights=...)` is the same as one call with a per-process
cache of the extractor and of the reference features (keyed by the reference array's content).
Images are (N, H, W, 3) in [-1, 1] (float) or uint8 in [0, 255], any size (resized to 299).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from distill.metrics import extract
from distill.metrics import frechet
from distill.metrics import inception

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "features")


# ----------------------------------------------------------------------------------------------
# Reference statistics files.

def save_stats(path: str, stats: Mapping[str, Any], meta: Optional[Mapping] = None) -> None:
  """Writes `stats` (keys of STATS_KEYS) to an .npz, via a temporary file then renamed."""
  unknown = sorted(set(stats) - set(STATS_KEYS) - {"meta"})
  if unknown:
    raise ValueError(f"unknown statistics keys {unknown}; expected some of {STATS_KEYS}")
  if "mu" not in stats or "sigma" not in stats:
    raise ValueError("reference statistics need at least 'mu' and 'sigma'")
  arrays = {k: np.asarray(v, np.float32 if k == "features" else np.float64)
            for k, v in stats.items() if k in STATS_KEYS and v is not None}
  meta = meta if meta is not None else stats.get("meta")
  if meta is not None:
    arrays["meta"] = np.asarray(json.dumps(meta, sort_keys=True))
  os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
  tmp = path + ".partial.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def load_stats(path: str) -> dict[str, Any]:
  """The statistics of an .npz (ours, pytorch-fid's or an ADM reference batch): every key of
  STATS_KEYS that is present, plus `meta` (a dict) when the file has one. Other arrays (an ADM
  batch's images `arr_0`) are not read."""
  with np.load(path, allow_pickle=False) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      raise ValueError(f"{path}: not a statistics file (needs 'mu' and 'sigma'; has "
                       f"{sorted(f.files)})")
    out: dict[str, Any] = {k: f[k] for k in STATS_KEYS if k in f.files}
    if "meta" in f.files:
      out["meta"] = json.loads(str(f["meta"]))
  return out


# ----------------------------------------------------------------------------------------------
# Scores from features.

def fid_from_features(a, b) -> float:
  """FID between two feature sets (n, D), via `frechet.stats` / `frechet.frechet_distance`."""
  return frechet.frechet_distance(*frechet.stats(a), *frechet.stats(b))


def _frechet(feats: extract.Features, name: str, mu_ref, sigma_ref, ref_features=None,
             gram: bool = False) -> float:
  """FD of output `name` of `feats` against reference moments; through the features
  (`frechet.frechet_distance_features`, exact) when both sides kept them and the covariances
  are singular (few samples); through the samples' features and the reference moments
  (`frechet.frechet_distance_features_moments`, exact) when only the samples' were kept (a
  published statistics file), theirs is singular and `gram` asks; else the float64 sqrtm
  formula on the moments."""
  kept = feats.arrays.get(name)
  if (ref_features is not None and kept is not None and len(kept)
      and frechet.prefer_features(len(kept), len(ref_features), kept.shape[1])):
    return frechet.frechet_distance_features(kept, ref_features)
  if gram and ref_features is None and kept is not None and 1 < len(kept) <= kept.shape[1]:
    return frechet.frechet_distance_features_moments(kept, mu_ref, sigma_ref)
  return frechet.frechet_distance(*feats.stats(name), mu_ref, sigma_ref)


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """`(mean, std)` of exp(E KL(p(y|x) || p(y))) over `splits` consecutive parts (module doc)."""
  logits = np.asarray(logits, np.float64)
  n = len(logits)
  if n < splits:
    raise ValueError(f"inception_score needs at least {splits} samples (one per split), got {n}")
  logp = logits - logits.max(axis=1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
  scores = []
  for i in range(splits):
    part = logp[i * n // splits:(i + 1) * n // splits]
    p = np.exp(part)
    log_marginal = np.log(p.mean(axis=0))
    kl = np.sum(p * (part - log_marginal), axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(q, x):
  """(B, N) squared distances |q|^2 - 2 q.x + |x|^2, clipped at 0, float32 highest precision."""
  qq = jnp.sum(q * q, axis=1, keepdims=True)
  xx = jnp.sum(x * x, axis=1)
  return jnp.maximum(qq - 2.0 * jnp.dot(q, x.T, precision="highest") + xx[None], 0.0)


@functools.partial(jax.jit, static_argnames=("k",))
def _block_radii(q, x, k: int):
  # The (k + 1)-th smallest distance including the sample itself (at 0) = k-th neighbour.
  return -jax.lax.top_k(-_sq_dists(q, x), k + 1)[0][:, k]


@jax.jit
def _block_covered(q, x, radii):
  return jnp.any(_sq_dists(q, x) <= radii[None], axis=1)


def _blocked(fn, query: np.ndarray, *args, block: int) -> np.ndarray:
  """fn(query block padded to `block` rows, *args) over all rows, padding dropped."""
  out = []
  for i in range(0, len(query), block):
    q = query[i:i + block]
    pad = np.zeros((block - len(q), query.shape[1]), query.dtype)
    out.append(np.asarray(fn(np.concatenate([q, pad]), *args))[:len(q)])
  return np.concatenate(out)


def knn_radii(features, k: int = 3, block: int = 2048) -> np.ndarray:
  """Squared distance of each sample to its k-th nearest neighbour in the set (itself excluded)."""
  x = np.asarray(features, np.float32).reshape(len(features), -1)
  if len(x) <= k:
    raise ValueError(f"k-NN radii need more than k={k} samples, got {len(x)}")
  xd = jnp.asarray(x)
  return _blocked(lambda q: _block_radii(q, xd, k), x, block=min(block, len(x)))


def coverage(query, manifold, radii, block: int = 2048) -> np.ndarray:
  """(n,) bool: whether each query sample lies in a ball of `manifold` (squared `radii`)."""
  q = np.asarray(query, np.float32).reshape(len(query), -1)
  x = jnp.asarray(np.asarray(manifold, np.float32).reshape(len(manifold), -1))
  r = jnp.asarray(radii, jnp.float32)
  return _blocked(lambda b: _block_covered(b, x, r), q, block=min(block, len(q)))


def precision_recall(real, fake, k: int = 3, block: int = 2048) -> tuple[float, float]:
  """Improved precision and recall of `fake` against `real` features (module docstring)."""
  real = np.asarray(real, np.float32).reshape(len(real), -1)
  fake = np.asarray(fake, np.float32).reshape(len(fake), -1)
  precision = coverage(fake, real, knn_radii(real, k, block), block).mean()
  recall = coverage(real, fake, knn_radii(fake, k, block), block).mean()
  return float(precision), float(recall)


# ----------------------------------------------------------------------------------------------
# The evaluation-facing object.

def _to_input(x):
  """uint8 [0, 255] -> float [-1, 1]; floats pass unchanged (inside jit)."""
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)


def _rgb(x):
  """Grayscale (..., 1) -> (..., 3) by repetition; RGB passes (inside jit)."""
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


SCORE_GROUPS = ("fid", "sfid", "inception_score", "precision_recall")


class InceptionMetrics:
  """FID / sFID / IS / precision-recall of image sets with the FID Inception from `weights`.

  Images may be RGB or grayscale (repeated to 3 channels). `resize` (default) resizes them to
  `size` x `size` (299, the standard; a smaller size, >= 75, only for quick checks: its numbers
  are not comparable with published ones) with the bilinear resize of `inception.py`.
  `gram=True`: with few samples (singular covariances) the FID goes through the kept pool
  features (`frechet.frechet_distance_features`: exact, and fast where the 2048 x 2048 root is
  slow and ill posed); default False, the sqrtm formula with its eps fallback.
  """

  def __init__(self, weights: str, *, batch_size: int = 200, devices=None, resize: bool = True,
               splits: int = 10, k: int = 3, block: int = 2048, size: int = inception.SIZE,
               gram: bool = False):
    own_resize = resize and int(size) == inception.SIZE
    module, variables = inception.load(weights, resize=own_resize)
    pre = int(size) if resize and not own_resize else 0
    if pre and pre < inception.MIN_SIZE:
      raise ValueError(f"Inception input size {pre} is below the minimum {inception.MIN_SIZE}")
    self.weights = weights
    self.size = int(size) if resize else 0
    self.splits, self.k, self.block = splits, k, block
    self.gram = bool(gram)

    def fn(v, x):
      x = _rgb(_to_input(x))
      if pre:
        x = inception.resize_bilinear(x, pre)
      return module.apply(v, x)

    self.extractor = extract.FeatureExtractor(fn, variables, batch_size=batch_size,
                                              devices=devices)

  def features(self, images: Union[np.ndarray, Iterable[np.ndarray]]) -> extract.Features:
    """pool/spatial moments and the kept pool features and logits of all images."""
    return self.extractor.run(images, moments=("pool", "spatial"), keep=("pool", "logits"))

  def reference(self, images=None, *, cache: Optional[str] = None,
                meta: Optional[Mapping] = None, keep_features: bool = True) -> dict[str, Any]:
    """Reference statistics: loaded from `cache` when it exists, else computed from `images`
    (and written to `cache`). A cached file of ours whose `meta` differs from `meta` raises
    (stale statistics are never used silently); files without `meta` (published statistics)
    are taken as they are."""
    if cache is not None and os.path.exists(cache):
      stats = load_stats(cache)
      if meta is not None and "meta" in stats and stats["meta"] != json.loads(
          json.dumps(meta, sort_keys=True)):
        raise ValueError(f"{cache}: cached reference statistics were computed for "
                         f"{stats['meta']}, not {dict(meta)}; delete the file to recompute")
      return stats
    if images is None:
      raise ValueError(f"no reference images given and no cached statistics at {cache}")
    feats = self.features(images)
    stats = self._stats(feats, keep_features)
    if cache is not None:
      save_stats(cache, stats, meta)
    return stats

  @staticmethod
  def _stats(feats: extract.Features, keep_features: bool = True) -> dict[str, Any]:
    mu, sigma = feats.stats("pool")
    mu_s, sigma_s = feats.stats("spatial")
    out = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if keep_features:
      out["features"] = feats.arrays["pool"]
    return out

  def scores(self, samples, reference: Mapping[str, Any],
             which: Sequence[str] = SCORE_GROUPS) -> dict[str, float]:
    """`{"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall",
    "num_samples"}` of `samples` against `reference` statistics (sFID only when the reference
    has `mu_s`; precision/recall only when it has `features`). `which` (some of SCORE_GROUPS)
    limits what is computed. With `gram` and few samples the FID goes through the kept
    features (`_frechet`)."""
    feats = samples if isinstance(samples, extract.Features) else self.features(samples)
    out = {}
    if "fid" in which:
      out["fid"] = _frechet(feats, "pool", reference["mu"], reference["sigma"],
                            reference.get("features") if self.gram else None, self.gram)
    if "sfid" in which and "mu_s" in reference:
      out["sfid"] = _frechet(feats, "spatial", reference["mu_s"], reference["sigma_s"])
    if "inception_score" in which:
      is_mean, is_std = inception_score(feats.arrays["logits"], self.splits)
      out["inception_score"], out["inception_score_std"] = is_mean, is_std
    if "precision_recall" in which and "features" in reference:
      out["precision"], out["recall"] = precision_recall(reference["features"],
                                                         feats.arrays["pool"], self.k,
                                                         self.block)
    out["num_samples"] = feats.num_samples
    return out


@functools.lru_cache(maxsize=2)
def _metrics(weights: str, batch_size: int, options: tuple = ()) -> InceptionMetrics:
  return InceptionMetrics(weights, batch_size=batch_size, **dict(options))


_REFERENCES: dict[tuple, dict] = {}


def fingerprint(images: np.ndarray) -> str:
  """sha1 of an array's shape, dtype and bytes (the in-process reference cache key)."""
  a = np.ascontiguousarray(images)
  h = hashlib.sha1(f"{a.shape}{a.dtype}".encode())
  h.update(a.view(np.uint8).reshape(-1))
  return h.hexdigest()


def inception_scores(samples: np.ndarray, reference: np.ndarray, *, weights: str,
                     cache: Optional[str] = None, batch_size: int = 200,
                     metrics: Sequence[str] = (), **options) -> dict[str, float]:
  """Evaluation's entry point: the scores of `samples` against real `reference` images.

  `weights`: path of pytorch-fid's FID Inception weights. The reference's statistics are
  computed once per process (keyed by the array's content) and, with `cache`, stored in / read
  from that .npz (its `meta` records the reference fingerprint and size, so a different
  reference set raises instead of reusing the file). `metrics` limits the returned keys
  (default: all of `InceptionMetrics.scores`); `options` go to `InceptionMetrics` (`resize`,
  `splits`, `k`, `block`, `devices`).
  """
  m = _metrics(os.fspath(weights), int(batch_size), tuple(sorted(options.items())))
  reference = np.asarray(reference)
  key = (m.weights, fingerprint(reference))
  if key not in _REFERENCES:
    meta = {"reference_sha1": key[1], "num_samples": int(len(reference))}
    _REFERENCES.clear()  # one reference set at a time (its features can be large)
    _REFERENCES[key] = m.reference(reference, cache=cache, meta=meta)
  out = m.scores(np.asarray(samples), _REFERENCES[key])
  return {k: v for k, v in out.items() if not metrics or k in metrics}
