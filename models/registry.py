"""Model registry: `build_model(name, **kwargs)` returns a Flax Linen module.

Every denoiser registered here follows the calling convention of DESIGN.md: its `__call__`
mirrors the diffusers counterpart's inputs (NHWC images, or flat vectors for toy models), the
timestep in the model's own units first after `x`, conditioning after that, extras as keywords.
"""
from __future__ import annotations

from distill.registry import Registry

MODELS: Registry = Registry("model")
register_model = MODELS.register


def build_model(name: str, **kwargs):
  return MODELS.get(name)(**kwargs)
