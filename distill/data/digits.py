"""The bundled scikit-learn handwritten digits (1,797 8x8 images, no download) as a source.

Registered as `digits`, keys `size=16` and `method="linear"`:
- the 8x8 images (grey levels 0..16) are resized to `size x size` with `jax.image.resize`
  (`method="linear"`: bilinear with half-pixel centres, i.e. each output pixel interpolates the
  input at `(i + 0.5) * 8 / size - 0.5`, clamped at the border; `"nearest"` replicates pixels;
  `size=8` keeps the originals),
- scaled to [-1, 1] (`x / 8 - 1`; interpolation stays within [0, 16], so within [-1, 1]),
- laid out NHWC: `shape == (size, size, 1)`; labels are the digits 0..9 (`num_classes = 10`).

`batch` draws the global batch's row indices with replacement from the step's generator and
gathers only this process's rows. `reference(n, seed)` returns real images without replacement
while `n <= 1797` (a seeded permutation), continuing with further independent permutations
beyond that, so every image appears `floor(n / 1797)` or `ceil(n / 1797)` times.
`floor_reference(n, seed)` is disjoint from `reference(n, seed)` while `2 n <= 1797` (rows
`n .. 2n` of the same permutation): the data floor of the `fd` metric then compares two real
sets with no image in common, as two draws from the true distribution would (beyond that it
falls back to an overlapping second permutation, and the floor is optimistic).
`content_hash()` is the sha256 of the float32 image bytes followed by the int32 label bytes.
"""
from __future__ import annotations

import functools
import hashlib
import logging

import numpy as np

from distill.data.sources import Source, reference_rng, register_dataset

log = logging.getLogger(__name__)

NUM_IMAGES = 1797
_METHODS = ("linear", "nearest")


def load(size: int = 16, method: str = "linear") -> tuple[np.ndarray, np.ndarray]:
  """`(images (1797, size, size, 1) float32 in [-1, 1], labels (1797,) int32)`, read-only.

  Computed once per `(size, method)` and cached.
  """
  return _load(int(size), str(method))


@functools.lru_cache(maxsize=8)
def _load(size: int, method: str) -> tuple[np.ndarray, np.ndarray]:
  if method not in _METHODS:
    raise ValueError(f"data.method must be one of {_METHODS}, got {method!r}")
  if size < 1:
    raise ValueError(f"data.size must be >= 1, got {size}")
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  raw = load_digits()
  images = raw.images.astype(np.float32)[..., None]  # (N, 8, 8, 1), grey levels 0..16
  if size != images.shape[1]:
    import jax  # pylint: disable=g-import-not-at-top  (only needed once, at load time)
    images = np.asarray(jax.image.resize(images, (len(images), size, size, 1), method=method))
  images = np.clip(images / 8.0 - 1.0, -1.0, 1.0).astype(np.float32)
  labels = raw.target.astype(np.int32)
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


@register_dataset("digits")
class Digits(Source):
  """The scikit-learn digits, upsampled, in [-1, 1], NHWC, labelled 0..9."""

  DEFAULTS = {"size": 16, "method": "linear"}
  metric = "fd"   # Frechet distance in the digit classifier's features (distill.metrics)

  def __init__(self, seed: int, size: int, method: str):
    super().__init__(seed)
    self.images, self.labels = load(size, method)
    self.shape = tuple(self.images.shape[1:])
    self.num_classes = 10

  def __len__(self) -> int:
    return len(self.images)

  def global_rows(self, rng, global_batch, rows):
    index = rng.integers(0, len(self.images), size=global_batch)[rows]
    return {"x": self.images[index], "label": self.labels[index]}

  def draw(self, rng, n):
    index = rng.integers(0, len(self.images), size=n)
    return {"x": self.images[index], "label": self.labels[index]}

  def reference_index(self, n: int, seed: int) -> np.ndarray:
    """Row indices of `reference(n, seed)`: successive seeded permutations of the data set."""
    rng = reference_rng(seed)
    count = len(self.images)
    perms = [rng.permutation(count) for _ in range(-(-n // count))]
    return np.concatenate(perms)[:n] if perms else np.zeros((0,), np.int64)

  def reference(self, n: int, seed: int) -> np.ndarray:
    return self.images[self.reference_index(n, seed)]

  def floor_reference(self, n: int, seed: int) -> np.ndarray:
    if 2 * n <= len(self.images):
      return self.images[self.reference_index(2 * n, seed)[n:]]
    log.warning("data floor of %d samples: the digits hold %d images, so its two real sets "
                "share images and the floor is optimistic (independent sets up to %d samples)",
                n, len(self.images), len(self.images) // 2)
    return super().floor_reference(n, seed)

  def content_hash(self) -> str:
    """sha256 (hex) of the image bytes (float32, C order) followed by the label bytes (int32)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(self.images).tobytes())
    h.update(np.ascontiguousarray(self.labels).tobytes())
    return h.hexdigest()
