"""AGD's guidance adapter (Jensen & Sadat, TMLR 2025), shared by the models that offer a
`guidance_adapter` option (the toy MLP, DiT, the SD UNet): an additive offset
Dense(features)(silu(Dense(hidden)(silu(c)))) of a block's conditioning embedding c (time,
class or prompt, and the guidance scale w), added to the block's output. The last layer is
zero-initialised, so a model that gains adapters starts as it was."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class GuidanceAdapter(nn.Module):
  features: int          # the block's width (the offset's size)
  hidden: int            # the adapter's hidden width
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c):
    def dense(features, axes, name, init):
      return nn.Dense(features, name=name, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=nn.with_logical_partitioning(init, axes),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             axes[-1:]))
    y = dense(self.hidden, ("embed", "mlp"), "fc1", nn.initializers.lecun_normal())(nn.silu(c))
    return dense(self.features, ("mlp", "embed"), "fc2", nn.initializers.zeros_init())(
        nn.silu(y))
