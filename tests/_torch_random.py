"""Seeded random weights for diffusers / torch reference models in parity tests."""
from __future__ import annotations

import torch


def randomize_torch(model, seed: int = 0, std: float = 0.05, *, buffers: bool = False,
                    unit_normal: tuple[str, ...] = ()):
  """Sets every parameter of `model` in place (and with `buffers` every buffer but BatchNorm's
  counters) to base + std * N(0, 1) from a generator seeded with `seed`, in registration order:
  base 1 for norm weights and running variances, 0 otherwise; the keys in `unit_normal` (e.g. a
  class-embedding table) get N(0, 1). Returns `model`."""
  gen = torch.Generator().manual_seed(seed)
  items = list(model.named_parameters()) + (list(model.named_buffers()) if buffers else [])
  with torch.no_grad():
    for key, p in items:
      if key.endswith("num_batches_tracked"):
        continue
      if key in unit_normal:
        p.copy_(torch.randn(p.shape, generator=gen))
        continue
      one = ("norm" in key and key.endswith("weight")) or key.endswith("running_var")
      p.copy_((1.0 if one else 0.0) + std * torch.randn(p.shape, generator=gen))
  return model
