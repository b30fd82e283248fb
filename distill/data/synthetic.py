"""`synthetic`: Gaussian noise batches of any shape, for benchmarks and compile checks.

Keys: `height`, `width`, `channels` (an image/latent of shape (height, width, channels); with
height = 0 a flat vector of `channels` values) and `num_classes` (labels drawn uniformly when
> 0). Deterministic in (seed, step) like every source; there is nothing to learn from it.
"""
from __future__ import annotations

import numpy as np

from distill.data.sources import Source, register_dataset


@register_dataset("synthetic")
class Synthetic(Source):
  DEFAULTS = {"height": 32, "width": 32, "channels": 4, "num_classes": 1000}

  def __init__(self, seed: int, height: int, width: int, channels: int, num_classes: int):
    super().__init__(seed)
    self.shape = (height, width, channels) if height else (channels,)
    self.num_classes = int(num_classes)

  def draw(self, rng: np.random.Generator, n: int) -> dict:
    out = {"x": rng.standard_normal((n,) + self.shape, dtype=np.float32)}
    if self.num_classes:
      out["label"] = rng.integers(0, self.num_classes, n).astype(np.int32)
    return out
