"""Discriminator heads on a frozen backbone's features (LADD, SANA-Sprint).

    heads = LaddHeads(feature_dims=(1152, 1152, 1152))
    logits = heads.apply(variables, x, timestep, features=(h2, h8, h14))   # (B, sum_i N_i)

One StyleGAN-T head (`DiscHead`) per backbone block: features (B, N, C) (tokens; a (B, C)
feature is one token) ->

    conv1d k=1 -> BatchNormLocal -> LeakyReLU(0.2)
    (h + [conv1d k=9 circular -> BatchNormLocal -> LeakyReLU(0.2)](h)) / sqrt(2)
    conv1d k=1 -> 1 logit per token

with spectral normalisation on every conv (one power iteration per training call; `u` and
`sigma` live in the `batch_stats` collection and are updated with `update_stats=True`). The
heads are unconditional (SANA-Sprint's c_dim = 0): the conditioning enters through the
backbone. BatchNormLocal normalises each channel over the tokens of groups of `virtual_bs`
consecutive samples (no running statistics), as StyleGAN-T's.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.registry import register_model


class BatchNormLocal(nn.Module):
  """Per-channel normalisation over (virtual batch group, tokens) of x (B, N, C)."""
  virtual_bs: int = 8
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    b, n, c = x.shape
    group = min(self.virtual_bs, b)
    if b % group:
      raise ValueError(f"BatchNormLocal: batch {b} is not a multiple of virtual_bs "
                       f"{self.virtual_bs}")
    g = x.astype(jnp.float32).reshape(b // group, group, n, c)
    mean = jnp.mean(g, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2), keepdims=True)
    g = (g - mean) * jax.lax.rsqrt(var + self.eps)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             ("norm",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("norm",)), (c,))
    return (g * scale + bias).reshape(b, n, c).astype(x.dtype)


def _l2_normalize(v, eps: float = 1e-12):
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SpectralConv1d(nn.Module):
  """Conv1d over tokens (B, N, C) with circular padding and, when `spectral`, the kernel
  divided by its largest singular value as torch's spectral_norm estimates it: the kernel as a
  (out, k * in) matrix W, one power iteration v = W^T u / |.|, u' = W v / |.| from the stored u
  (`batch_stats`, no gradient), sigma = u'^T W v; u' is stored when `update_stats`."""
  features: int
  kernel_size: int = 1
  spectral: bool = True

  @nn.compact
  def __call__(self, x, update_stats: bool = False):
    k, cin, cout = self.kernel_size, x.shape[-1], self.features
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, "conv_in", "conv_out")), (k, cin, cout))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("conv_out",)), (cout,))
    kernel = kernel.astype(jnp.float32)
    if self.spectral:
      u_var = self.variable("batch_stats", "u", lambda: _l2_normalize(
          jax.random.normal(self.make_rng("params"), (cout,), jnp.float32)))
      w = jnp.transpose(kernel, (2, 1, 0)).reshape(cout, cin * k)   # torch's (out, in, k)
      v = jax.lax.stop_gradient(_l2_normalize(w.T @ u_var.value))
      u = jax.lax.stop_gradient(_l2_normalize(w @ v))
      sigma = u @ (w @ v)
      if update_stats and not self.is_initializing():
        u_var.value = u
      kernel = kernel / sigma
    pad = k // 2
    xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap") if pad else x
    y = jax.lax.conv_general_dilated(xp.astype(jnp.float32), kernel, (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias


class DiscHead(nn.Module):
  """StyleGAN-T's unconditional discriminator head: (B, N, C) -> (B, N) logits."""
  channels: int
  virtual_bs: int = 8
  spectral: bool = True

  @nn.compact
  def __call__(self, h, update_stats: bool = False):
    def block(x, k, name):
      x = SpectralConv1d(self.channels, k, self.spectral, name=f"{name}_conv")(x, update_stats)
      x = BatchNormLocal(self.virtual_bs, name=f"{name}_norm")(x)
      return nn.leaky_relu(x, 0.2)
    h = block(h, 1, "block0")
    h = (h + block(h, 9, "residual")) / math.sqrt(2.0)
    return SpectralConv1d(1, 1, self.spectral, name="cls")(h, update_stats)[..., 0]


@register_model("ladd_heads")
class LaddHeads(nn.Module):
  """One DiscHead per backbone feature. Called as (x, timestep, features=(f_1, ...),
  update_stats=...) -> logits (B, sum_i N_i); without `features` (the engine's init) it reads
  zeros (B, 1, feature_dims[i]). x and timestep only fix the batch (the features carry time
  and conditioning)."""
  feature_dims: Sequence[int] = (128,)
  virtual_bs: int = 8
  spectral: bool = True

  @nn.compact
  def __call__(self, x, timestep=None, class_labels=None, *,
               features: Optional[Sequence[jax.Array]] = None, update_stats: bool = False):
    del timestep, class_labels
    b = x.shape[0]
    if features is None:
      features = [jnp.zeros((b, 1, d), jnp.float32) for d in self.feature_dims]
    if len(features) != len(self.feature_dims):
      raise ValueError(f"ladd_heads: {len(self.feature_dims)} heads, got {len(features)} "
                       "features")
    logits = []
    for i, (f, d) in enumerate(zip(features, self.feature_dims)):
      f = f.reshape(b, 1, f.shape[-1]) if f.ndim == 2 else f.reshape(b, -1, f.shape[-1])
      if f.shape[-1] != d:
        raise ValueError(f"config key 'objective.feature_dims': head {i} reads features of "
                         f"width {d}, the backbone gives {f.shape[-1]}")
      logits.append(DiscHead(d, self.virtual_bs, self.spectral, name=f"head_{i}")(
          f.astype(jnp.float32), update_stats))
    return jnp.concatenate(logits, axis=1)
