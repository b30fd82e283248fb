"""`MLPDenoiser` ("mlp"): a residual MLP denoiser for flat `(B, D)` toy data.

    out = model.apply(variables, x, timestep, class_labels=None,
                      timestep2=None, guidance=None, train=False)        # (B, D)
    out, feats = model.apply(variables, x, timestep, return_features=(1,))  # feats[1]: (B, H)

Architecture (hidden width `H = hidden`, inner width `M = hidden * mlp_ratio`):
- conditioning vector `c` (B, H): `sinusoidal(timestep * time_scale)` -> Dense(H) -> SiLU ->
  Dense(H); plus a class embedding when `num_classes > 0`; plus the optional extras below;
- `h = Dense(H)(x)`, then `depth` pre-norm residual blocks
  `h += Dense(H)(SiLU(Dense(M)(LayerNorm(h)) + Dense(M)(SiLU(c))))`;
- `out = Dense(D)(SiLU(LayerNorm(h)))`.

Conditioning:
- `class_labels` (B,) int in [0, num_classes]; the extra index `num_classes` is the *null* class
  used for classifier-free guidance (label dropout replaces labels by it). `None` means the null
  class for every example. Unconditional models (`num_classes == 0`) ignore `class_labels`.
- `extra_time_input=True` adds a second timestep embedding (keyword `timestep2`, e.g. the target
  time of a consistency-trajectory student); `guidance_embed=True` adds an embedding of the
  guidance scale (keyword `guidance`, scaled by `guidance_scale` before the sinusoid). Each is
  a sinusoid -> Dense -> SiLU -> Dense whose last layer is zero-initialised, so a fresh model
  computes exactly what the plain model does. A missing `timestep2` / `guidance` counts as 0.

`return_features` (block indices, negative counts from the end) returns `(out, {i: h_i})` with
`h_i` (B, H) the residual stream after block `i` (for adversarial heads, as DiT's keyword of the
same name); the default `()` returns `out` alone.

Parameters carry logical axis names (`embed` = the width H, `mlp` = inner widths, `norm`), see
docs/conventions.md. `train` is accepted for the common calling convention (no dropout here).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from models.adapters import GuidanceAdapter
from models.registry import register_model

Dtype = Any


def sinusoidal_embedding(t, dim: int, max_period: float = 10_000.0):
  """`(B,) -> (B, dim)`: `[cos(t f_i), sin(t f_i)]` with `f_i = max_period^(-i / (dim / 2))`."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _dense(features: int, axes: tuple, name: str, dtype, param_dtype, zero: bool = False):
  """A Dense layer whose kernel/bias carry logical axis names `axes` / `axes[-1:]`."""
  kernel_init = nn.initializers.zeros_init() if zero else nn.initializers.lecun_normal()
  return nn.Dense(
      features, name=name, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def _layer_norm(name: str, dtype, param_dtype):
  return nn.LayerNorm(
      name=name, dtype=dtype, param_dtype=param_dtype,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class ScalarEmbedding(nn.Module):
  """A scalar per example -> sinusoid -> Dense(H) -> SiLU -> Dense(H) (optionally zero-init)."""

  hidden: int
  freq_dim: int
  scale: float = 1.0
  zero_init_out: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s):
    emb = sinusoidal_embedding(s * self.scale, self.freq_dim).astype(self.dtype)
    emb = _dense(self.hidden, (None, "mlp"), "fc1", self.dtype, self.param_dtype)(emb)
    emb = nn.silu(emb)
    return _dense(self.hidden, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype,
                  zero=self.zero_init_out)(emb)


class ResidualBlock(nn.Module):
  """Pre-norm residual MLP block with additive conditioning."""

  hidden: int
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, c):
    y = _layer_norm("norm", self.dtype, self.param_dtype)(h)
    y = _dense(self.inner, ("embed", "mlp"), "fc1", self.dtype, self.param_dtype)(y)
    y = y + _dense(self.inner, ("embed", "mlp"), "cond", self.dtype, self.param_dtype)(nn.silu(c))
    y = _dense(self.hidden, ("mlp", "embed"), "fc2", self.dtype, self.param_dtype)(nn.silu(y))
    return h + y


@register_model("mlp")
class MLPDenoiser(nn.Module):
  """Residual MLP denoiser for `(B, dim)` inputs; output `(B, dim)` (see the module docstring)."""

  dim: int = 2
  hidden: int = 256
  depth: int = 4
  mlp_ratio: int = 1
  num_classes: int = 0
  time_embed_dim: int = 64
  time_scale: float = 1.0
  extra_time_input: bool = False
  guidance_embed: bool = False
  guidance_scale: float = 1.0
  # AGD's additive guidance adapter: > 0 adds after every block an MLP (this hidden width) of
  # the conditioning (time + class + guidance embeddings), zero-initialised output.
  guidance_adapter: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def inner(self) -> int:
    return self.hidden * self.mlp_ratio

  def _embedding(self, name: str, scale: float, zero: bool) -> ScalarEmbedding:
    return ScalarEmbedding(self.hidden, self.time_embed_dim, scale, zero, self.dtype,
                           self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x, timestep, class_labels=None, *, timestep2=None, guidance=None,
               train: bool = False, return_features: Sequence[int] = ()):
    del train  # no dropout: kept for the common calling convention
    if x.ndim != 2 or x.shape[-1] != self.dim:
      raise ValueError(f"MLPDenoiser(dim={self.dim}) expects (B, {self.dim}) inputs, got {x.shape}")
    batch = x.shape[0]

    def per_example(v, dtype=jnp.float32):  # a scalar, (B,) or (B, 1) -> (B,)
      v = jnp.asarray(v, dtype)
      return jnp.broadcast_to(v.reshape(batch) if v.size == batch else v, (batch,))

    c = self._embedding("time_embed", self.time_scale, False)(per_example(timestep))
    if self.num_classes > 0:
      if class_labels is None:
        class_labels = jnp.full((batch,), self.num_classes, jnp.int32)
      table = nn.Embed(
          self.num_classes + 1, self.hidden, name="class_embed", dtype=self.dtype,
          param_dtype=self.param_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                      (None, "embed")))
      c = c + table(per_example(class_labels, jnp.int32))
    if self.extra_time_input:
      t2 = per_example(0.0 if timestep2 is None else timestep2)
      c = c + self._embedding("time2_embed", self.time_scale, True)(t2)
    if self.guidance_embed:
      w = per_example(0.0 if guidance is None else guidance)
      c = c + self._embedding("guidance_embed", self.guidance_scale, True)(w)

    h = _dense(self.hidden, (None, "embed"), "in_proj", self.dtype, self.param_dtype)(
        x.astype(self.dtype))
    wanted = {}
    for i in return_features:
      j = i + self.depth if i < 0 else i
      if not 0 <= j < self.depth:
        raise ValueError(f"return_features index {i} out of range for {self.depth} blocks")
      wanted[i] = j
    feats = {}
    for i in range(self.depth):
      h = ResidualBlock(self.hidden, self.inner, self.dtype, self.param_dtype,
                        name=f"block_{i}")(h, c)
      if self.guidance_adapter:
        h = h + GuidanceAdapter(self.hidden, self.guidance_adapter, self.dtype, self.param_dtype,
                                name=f"guidance_adapter_{i}")(c)
      feats.update({k: h for k, j in wanted.items() if j == i})
    h = nn.silu(_layer_norm("out_norm", self.dtype, self.param_dtype)(h))
    out = _dense(self.dim, ("embed", None), "out_proj", self.dtype, self.param_dtype)(h)
    return (out, feats) if wanted else out

  def flops_per_example(self) -> int:
    """Matmul FLOPs of one forward pass per example (2*m*n*k; gathers, norms, biases excluded)."""
    h, m, f = self.hidden, self.inner, self.time_embed_dim
    embed = 2 * (f * h + h * h)
    num_embeddings = 1 + int(self.extra_time_input) + int(self.guidance_embed)
    block = 2 * (h * m + h * m + m * h) + 4 * h * self.guidance_adapter
    total = num_embeddings * embed + 2 * self.dim * h + self.depth * block + 2 * h * self.dim
    return int(total)
