"""`synthetic`: Gaussian noise batches of any shape, for benchmarks and compile checks.

Keys: `height`, `width`, `channels` (an image/latent of shape (height, width, channels); with
height = 0 a flat vector of `channels` values) and `num_classes` (labels drawn uniformly when
> 0). Text-to-image shapes: `text_tokens` x `text_dim` prompt embeddings (`text_embeds`, the
models' encoder_hidden_states; 0 = none) and, with `pooled_dim` > 0, SDXL's pooled embedding
(`pooled_text_embeds`) and six size/crop ids (`time_ids`: the image size, no crop).
Deterministic in (seed, step) like every source; there is nothing to learn from it.
"""
from __future__ import annotations

import numpy as np

from distill.data.sources import Source, reference_rng, register_dataset


@register_dataset("synthetic")
class Synthetic(Source):
  DEFAULTS = {"height": 32, "width": 32, "channels": 4, "num_classes": 1000, "text_tokens": 0,
              "text_dim": 0, "pooled_dim": 0}

  def __init__(self, seed: int, height: int, width: int, channels: int, num_classes: int,
               text_tokens: int = 0, text_dim: int = 0, pooled_dim: int = 0):
    super().__init__(seed)
    self.shape = (height, width, channels) if height else (channels,)
    self.num_classes = int(num_classes)
    if bool(text_tokens) != bool(text_dim):
      raise ValueError(f"data.text_tokens and data.text_dim: set both or neither, got "
                       f"{text_tokens} and {text_dim}")
    self.text = (int(text_tokens), int(text_dim)) if text_tokens else None
    self.pooled_dim = int(pooled_dim)

  def draw(self, rng: np.random.Generator, n: int) -> dict:
    out = {"x": rng.standard_normal((n,) + self.shape, dtype=np.float32)}
    if self.num_classes:
      out["label"] = rng.integers(0, self.num_classes, n).astype(np.int32)
    out.update(self._text(rng, n))
    return out

  def conditions(self, n: int, seed: int) -> dict:
    """Random prompt embeddings (and SDXL ids) of `n` samples from `reference_rng(seed)`."""
    return self._text(reference_rng(seed), n)

  def _text(self, rng: np.random.Generator, n: int) -> dict:
    out = {}
    if self.text:
      out["text_embeds"] = rng.standard_normal((n,) + self.text, dtype=np.float32)
    if self.pooled_dim:
      out["pooled_text_embeds"] = rng.standard_normal((n, self.pooled_dim), dtype=np.float32)
      size = 8 * np.asarray(self.shape[:2], np.float32)   # pixels of an SD-VAE latent
      out["time_ids"] = np.tile(np.concatenate([size, [0.0, 0.0], size]).astype(np.float32),
                                (n, 1))
    return out
