"""Registry of converters between diffusers/PyTorch modules and our Flax modules.

A converter module registers, under the diffusers class name it handles (e.g.
"DiTTransformer2DModel", "AutoencoderKL"), an object with

    from_torch(torch_module) -> (flax_module, variables)       # strict: raises on any mismatch
    to_torch(flax_module, variables) -> torch_module           # the diffusers module, weights set

`models.convert.from_diffusers` / `to_diffusers` dispatch through this registry.
"""
from __future__ import annotations

from distill.registry import Registry

CONVERTERS: Registry = Registry("converter")
register_converter = CONVERTERS.register
