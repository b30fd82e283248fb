"""AutoencoderKL (the SD / SDXL / SD3 / FLUX VAE) as a Flax Linen module.

Mirrors diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py and vae.py) layer for
layer, with parameter names that follow the torch module tree (`down_blocks.0.resnets.1.conv1`
becomes `down_blocks_0/resnets_1/conv1`), so weight conversion is a rename plus transposes.

Layout and units:
  * images are NHWC in [-1, 1]; latents are NHWC;
  * `encode(x) -> (mean, logvar)` and `decode(z)` work on *unscaled* latents, like diffusers;
  * `encode_latents` / `decode_latents` work on the latents that denoisers see, i.e. scaled as
    diffusers pipelines do: `(z - shift_factor) * scaling_factor`, or, where the config has
    per-channel `latents_mean`/`latents_std` (SDXL-style fine-tunes),
    `(z - mean) * scaling_factor / std`.

Parameters carry logical axis names (conv kernels `(None, None, "conv_in", "conv_out")`, dense
kernels `("embed", "mlp")`, norms `("norm",)`); `dtype` sets the compute dtype, `param_dtype` the
stored one. GroupNorm statistics and the attention softmax are computed in float32 whatever
`dtype` is, like diffusers' `upcast_softmax`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.registry import register_model

Array = jax.Array
Dtype = Any

_CONV_AXES = (None, None, "conv_in", "conv_out")
_DENSE_AXES = ("embed", "mlp")
_NORM_AXES = ("norm",)
_NORM_EPS = 1e-6  # diffusers' VAE uses eps 1e-6 in every GroupNorm


def activation(name: str) -> Callable[[Array], Array]:
  """The activation diffusers' `get_activation(name)` returns, as a jax function."""
  table = {
      "silu": jax.nn.silu,
      "swish": jax.nn.silu,
      "relu": jax.nn.relu,
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch.nn.GELU() is exact
      "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
  }
  if name.lower() not in table:
    raise ValueError(f"unsupported act_fn {name!r} (known: {', '.join(sorted(table))})")
  return table[name.lower()]


def conv(features: int, kernel: int, *, dtype: Dtype, param_dtype: Dtype, name: str,
         strides: int = 1, padding: Any = None) -> nn.Conv:
  """A Conv2d with torch's default padding (`kernel // 2` on each side) and logical axes."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2), (kernel // 2, kernel // 2))
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=padding,
      dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def dense(features: int, *, dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True,
          axes: tuple = _DENSE_AXES) -> nn.Dense:
  """A Linear layer with logical axes `axes` (kernel (in, out); the bias takes the out axis)."""
  return nn.Dense(
      features, dtype=dtype, param_dtype=param_dtype, name=name, use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def group_norm(groups: int, *, dtype: Dtype, param_dtype: Dtype, name: str,
               eps: float = _NORM_EPS) -> nn.GroupNorm:
  """torch.nn.GroupNorm(groups, eps) over NHWC: contiguous channel groups, exact variance."""
  return nn.GroupNorm(
      num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), _NORM_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), _NORM_AXES))


@dataclasses.dataclass(frozen=True)
class VAESettings:
  """What every block shares: norm groups, activation, attention and remat names, dtypes."""
  groups: int = 32
  act_fn: str = "silu"
  attention: str = "xla"
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def rematted(cls: type[nn.Module], remat: str) -> type[nn.Module]:
  """`cls`, or `nn.remat(cls)` under the policy named `remat` (models.dit.REMAT_POLICIES)."""
  if remat == "none":
    return cls
  from models.dit import REMAT_POLICIES  # pylint: disable=import-outside-toplevel
  return nn.remat(cls, policy=REMAT_POLICIES.get(remat)())


class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D without time embedding: norm-act-conv twice plus a skip."""
  out_channels: int
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, act = self.cfg, activation(self.cfg.act_fn)
    h = act(group_norm(cfg.groups, name="norm1", **cfg.kw)(x))
    h = conv(self.out_channels, 3, name="conv1", **cfg.kw)(h)
    h = act(group_norm(cfg.groups, name="norm2", **cfg.kw)(h))
    h = conv(self.out_channels, 3, name="conv2", **cfg.kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **cfg.kw)(x)
    return x + h


class Downsample(nn.Module):
  """diffusers' Downsample2D(padding=0): pad right/bottom by one, 3x3 conv with stride 2."""
  channels: int
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return conv(self.channels, 3, strides=2, padding=((0, 1), (0, 1)), name="conv",
                **self.cfg.kw)(x)


class Upsample(nn.Module):
  """diffusers' Upsample2D(use_conv=True): nearest-neighbour x2, then a 3x3 conv."""
  channels: int
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, 3, name="conv", **self.cfg.kw)(x)


def attend(q: Array, k: Array, v: Array, impl: str = "xla") -> Array:
  """Single-head attention softmax(q k^T / sqrt(C)) v over (B, L, C) arrays.

  "xla" is plain jnp with the softmax in float32 (diffusers' `upcast_softmax`); any other name
  goes to `models.attention.attention` (fused kernels: the mid block attends over every latent
  position, so at 1024^2 pixels its logits alone are 128^4 floats per image).
  """
  if impl == "xla":
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bqk,bkc->bqc", probs, v)
  from models.attention import attention  # pylint: disable=import-outside-toplevel
  return attention(q[:, :, None], k[:, :, None], v[:, :, None], impl=impl)[:, :, 0]


class SpatialAttention(nn.Module):
  """The mid block's attention: group norm, one head over the H*W positions, residual."""
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    cfg = self.cfg
    y = group_norm(cfg.groups, name="group_norm", **cfg.kw)(x).reshape(b, h * w, c)
    q = dense(c, name="to_q", **cfg.kw)(y)
    k = dense(c, name="to_k", **cfg.kw)(y)
    v = dense(c, name="to_v", **cfg.kw)(y)
    y = dense(c, name="to_out_0", **cfg.kw)(attend(q, k, v, cfg.attention))
    return x + y.reshape(b, h, w, c)


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2D (one layer): resnet, optional attention, resnet."""
  channels: int
  add_attention: bool
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    resnet = rematted(ResnetBlock, self.cfg.remat)
    x = resnet(self.channels, self.cfg, name="resnets_0")(x)
    if self.add_attention:
      x = rematted(SpatialAttention, self.cfg.remat)(self.cfg, name="attentions_0")(x)
    return resnet(self.channels, self.cfg, name="resnets_1")(x)


class DownEncoderBlock(nn.Module):
  """diffusers' DownEncoderBlock2D: `num_layers` resnets, then an optional downsampler."""
  out_channels: int
  num_layers: int
  add_downsample: bool
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    resnet = rematted(ResnetBlock, self.cfg.remat)
    for i in range(self.num_layers):
      x = resnet(self.out_channels, self.cfg, name=f"resnets_{i}")(x)
    if self.add_downsample:
      x = Downsample(self.out_channels, self.cfg, name="downsamplers_0")(x)
    return x


class UpDecoderBlock(nn.Module):
  """diffusers' UpDecoderBlock2D: `num_layers` resnets, then an optional upsampler."""
  out_channels: int
  num_layers: int
  add_upsample: bool
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    resnet = rematted(ResnetBlock, self.cfg.remat)
    for i in range(self.num_layers):
      x = resnet(self.out_channels, self.cfg, name=f"resnets_{i}")(x)
    if self.add_upsample:
      x = Upsample(self.out_channels, self.cfg, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """diffusers' vae.Encoder with double_z: image -> 2 * latent_channels moments.

  As in diffusers, `act_fn` applies inside the resnets; the output activation is always SiLU.
  """
  latent_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  mid_block_add_attention: bool
  cfg: VAESettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, chans = self.cfg, tuple(self.block_out_channels)
    x = conv(chans[0], 3, name="conv_in", **cfg.kw)(x)
    for i, ch in enumerate(chans):
      x = DownEncoderBlock(ch, self.layers_per_block, i < len(chans) - 1, cfg,
                           name=f"down_blocks_{i}")(x)
    x = MidBlock(chans[-1], self.mid_block_add_attention, cfg, name="mid_block")(x)
    x = jax.nn.silu(group_norm(cfg.groups, name="conv_norm_out", **cfg.kw)(x))  # SiLU always
    return conv(2 * self.latent_channels, 3, name="conv_out", **cfg.kw)(x)


class Decoder(nn.Module):
  """diffusers' vae.Decoder (group norm): latent -> image (output activation always SiLU)."""
  out_channels: int
  block_out_channels: Sequence[int]
  layers_per_block: int
  mid_block_add_attention: bool
  cfg: VAESettings

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, chans = self.cfg, tuple(reversed(tuple(self.block_out_channels)))
    x = conv(chans[0], 3, name="conv_in", **cfg.kw)(z)
    x = MidBlock(chans[0], self.mid_block_add_attention, cfg, name="mid_block")(x)
    for i, ch in enumerate(chans):
      x = UpDecoderBlock(ch, self.layers_per_block + 1, i < len(chans) - 1, cfg,
                         name=f"up_blocks_{i}")(x)
    x = jax.nn.silu(group_norm(cfg.groups, name="conv_norm_out", **cfg.kw)(x))  # SiLU always
    return conv(self.out_channels, 3, name="conv_out", **cfg.kw)(x)


def sample_posterior(rng: Array, mean: Array, logvar: Array) -> Array:
  """A draw from N(mean, exp(logvar)) (diffusers' DiagonalGaussianDistribution.sample)."""
  eps = jax.random.normal(rng, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def blend(a: Array, b: Array, extent: int, axis: int) -> Array:
  """diffusers' blend_v / blend_h: ramp the first `extent` rows of `b` in from the end of `a`.

  Row y of the overlap becomes `a[-e + y] * (1 - y / e) + b[y] * (y / e)`, e = min(extent,
  a.shape[axis], b.shape[axis]); rows of `b` past the overlap are unchanged.
  """
  e = min(extent, a.shape[axis], b.shape[axis])
  if e <= 0:
    return b
  shape = [1] * b.ndim
  shape[axis] = e
  w = (jnp.arange(e, dtype=jnp.float32) / e).astype(b.dtype).reshape(shape)
  head = (jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis) * (1 - w)
          + jax.lax.slice_in_dim(b, 0, e, axis=axis) * w)
  return jnp.concatenate([head, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis=axis)


@register_model("autoencoder_kl")
class AutoencoderKL(nn.Module):
  """diffusers' AutoencoderKL. Field names and defaults follow its config.

  `__call__(x, sample_posterior=False, rng=None)` is diffusers' forward (encode, take the mode
  or a sample, decode); use `method=` with `apply` for the other entry points.
  `sample_size` and `force_upcast` have no effect here; they are kept for export. Execution
  fields (not in diffusers' config): `attention` (implementation name for the mid-block
  attention, see `attend`), `remat` (policy name, applied per resnet / attention block),
  `dtype`, `param_dtype`.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int | Sequence[int] = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: Sequence[float] | None = None
  latents_std: Sequence[float] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention: str = "xla"
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cfg = VAESettings(self.norm_num_groups, self.act_fn, self.attention, self.remat, **kw)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block,
                  mid_block_add_attention=self.mid_block_add_attention, cfg=cfg)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    if self.use_quant_conv:
      self.quant_conv = conv(2 * self.latent_channels, 1, name="quant_conv", **kw)
    if self.use_post_quant_conv:
      self.post_quant_conv = conv(self.latent_channels, 1, name="post_quant_conv", **kw)

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side: 2 ** (number of blocks - 1)."""
    return 2 ** (len(self.block_out_channels) - 1)

  # --- the diffusers entry points -------------------------------------------------------------

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Image NHWC in [-1, 1] -> posterior (mean, logvar), unscaled, float32; logvar in [-30, 20]."""
    h = self.encoder(x.astype(self.dtype))
    if self.use_quant_conv:
      h = self.quant_conv(h)
    h = h.astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z: Array) -> Array:
    """Unscaled latent NHWC -> image NHWC (float32), no tiling."""
    z = z.astype(self.dtype)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array, sample_posterior: bool = False,  # pylint: disable=redefined-outer-name
               rng: Array | None = None) -> Array:
    """Reconstruction: decode(mode or sample of encode(x))."""
    if sample_posterior and rng is None:
      raise ValueError("sample_posterior=True needs rng")
    mean, logvar = self.encode(x)
    z = self.sample(rng, mean, logvar) if sample_posterior else mean
    return self.decode(z)

  # --- helpers for denoisers -------------------------------------------------------------------

  def sample(self, rng: Array, mean: Array, logvar: Array) -> Array:
    """A posterior draw; see `sample_posterior`."""
    return sample_posterior(rng, mean, logvar)

  def _latent_stats(self) -> tuple[Array, Array]:
    """(shift, scale) with (z - shift) * scale the denoiser's latent."""
    if self.latents_mean is not None and self.latents_std is not None:
      mean = jnp.asarray(self.latents_mean, jnp.float32)
      std = jnp.asarray(self.latents_std, jnp.float32)
      return mean, self.scaling_factor / std
    shift = 0.0 if self.shift_factor is None else self.shift_factor
    return jnp.asarray(shift, jnp.float32), jnp.asarray(self.scaling_factor, jnp.float32)

  def scale_latents(self, z: Array) -> Array:
    """Unscaled VAE latent -> the latent a denoiser sees."""
    shift, scale = self._latent_stats()
    return (z - shift) * scale

  def unscale_latents(self, z_scaled: Array) -> Array:
    """The latent a denoiser sees -> unscaled VAE latent (inverse of `scale_latents`)."""
    shift, scale = self._latent_stats()
    return z_scaled / scale + shift

  def encode_latents(self, x: Array, rng: Array | None = None) -> Array:
    """Image -> denoiser latent: the posterior mean (rng None) or a draw, then scaled."""
    mean, logvar = self.encode(x)
    z = mean if rng is None else sample_posterior(rng, mean, logvar)
    return self.scale_latents(z)

  def decode_latents(self, z_scaled: Array) -> Array:
    """Denoiser latent -> image NHWC in about [-1, 1]."""
    return self.decode(self.unscale_latents(z_scaled))

  # --- tiling --------------------------------------------------------------------------------

  def decode_tiled(self, z: Array, tile: int = 64, overlap: int = 16) -> Array:
    """Decode in overlapping `tile` x `tile` latent tiles, blended linearly across overlaps.

    Tiles start every `tile - overlap` latents; each decoded tile is blended into its already
    final upper and left neighbours over `overlap * downscale` pixels (diffusers' blend_v /
    blend_h) and cropped to `(tile - overlap) * downscale` pixels. This is diffusers'
    `tiled_decode` with `tile_latent_min_size = tile`, `tile_sample_min_size = tile * downscale`
    and `tile_overlap_factor = f` wherever `overlap == tile - int(tile * (1 - f))` and
    `overlap * downscale == int(tile * downscale * f)` (e.g. the defaults, 64 and f = 0.25).
    A latent no larger than one tile is decoded whole, as diffusers does.
    """
    if not 0 <= overlap < tile:
      raise ValueError(f"decode_tiled needs 0 <= overlap < tile, got tile={tile} overlap={overlap}")
    height, width = z.shape[1], z.shape[2]
    if height <= tile and width <= tile:
      return self.decode(z)
    step, s = tile - overlap, self.downscale
    extent, keep = overlap * s, step * s
    starts_h, starts_w = range(0, height, step), range(0, width, step)
    decoded = self._decode_tiles(
        {(i, j): z[:, i:i + tile, j:j + tile] for i in starts_h for j in starts_w})
    rows: list[list[Array]] = []
    for i in starts_h:
      row: list[Array] = []
      for j in starts_w:
        out = decoded[(i, j)]
        if rows:
          out = blend(rows[-1][len(row)], out, extent, axis=1)
        if row:
          out = blend(row[-1], out, extent, axis=2)
        row.append(out)
      rows.append(row)
    return jnp.concatenate(
        [jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2) for row in rows], axis=1)

  def _decode_tiles(self, tiles: dict[Any, Array]) -> dict[Any, Array]:
    """Decode each tile on its own: one `lax.map` (a sequential loop) per distinct tile shape.

    Tiles of equal shape are stacked and decoded one after another, so memory holds one tile's
    activations and the decoder is compiled once per shape (at most four), not once per tile.
    """
    params = {"params": self.variables["params"]}
    unbound = self.clone(parent=None)

    def decode_one(zt: Array) -> Array:
      return unbound.apply(params, zt, method="decode")

    groups: dict[tuple[int, ...], list[Any]] = {}
    for key, zt in tiles.items():
      groups.setdefault(zt.shape, []).append(key)
    out: dict[Any, Array] = {}
    for keys in groups.values():
      stacked = jax.lax.map(decode_one, jnp.stack([tiles[k] for k in keys]))
      out.update({k: stacked[n] for n, k in enumerate(keys)})
    return out

  # --- cost ----------------------------------------------------------------------------------

  def flops_per_example(self, height: int, width: int, part: str = "decode") -> int:
    """Matmul/conv FLOPs (2 per multiply-add) for one image of `height` x `width` pixels.

    `part` is "encode", "decode" or "both" (reconstruction). Norms, activations and softmax are
    left out (a few percent of the total).
    """
    return flops_by_part(_FlopCounter(self), self.downscale, height, width, part)


def flops_by_part(counter, downscale: int, height: int, width: int, part: str) -> int:
  """An autoencoder's FLOPs for `part` ("encode", "decode" or "both") of a `height` x `width`
  image, from a counter with `encoder(h, w)` (pixels) and `decoder(h, w)` (latent cells)."""
  if part not in ("encode", "decode", "both"):
    raise ValueError(f"part must be encode, decode or both, got {part!r}")
  total = 0
  if part in ("encode", "both"):
    total += counter.encoder(height, width)
  if part in ("decode", "both"):
    total += counter.decoder(height // downscale, width // downscale)
  return total


class _FlopCounter:
  """Counts conv/matmul FLOPs of an AutoencoderKL's encoder and decoder analytically."""

  def __init__(self, vae: AutoencoderKL):
    self.vae = vae
    self.chans = tuple(vae.block_out_channels)

  @staticmethod
  def conv(h: int, w: int, cin: int, cout: int, k: int) -> int:
    return 2 * h * w * cin * cout * k * k

  def resnet(self, h: int, w: int, cin: int, cout: int) -> int:
    f = self.conv(h, w, cin, cout, 3) + self.conv(h, w, cout, cout, 3)
    return f + (self.conv(h, w, cin, cout, 1) if cin != cout else 0)

  def mid(self, h: int, w: int, c: int) -> int:
    n = h * w
    attn = 4 * 2 * n * c * c + 2 * 2 * n * n * c if self.vae.mid_block_add_attention else 0
    return 2 * self.resnet(h, w, c, c) + attn

  def encoder(self, h: int, w: int) -> int:
    v, ch = self.vae, self.chans
    f = self.conv(h, w, v.in_channels, ch[0], 3)
    cin = ch[0]
    for i, c in enumerate(ch):
      for _ in range(v.layers_per_block):
        f += self.resnet(h, w, cin, c)
        cin = c
      if i < len(ch) - 1:
        h, w = (h + 1 - 3) // 2 + 1, (w + 1 - 3) // 2 + 1
        f += self.conv(h, w, c, c, 3)
    f += self.mid(h, w, ch[-1]) + self.conv(h, w, ch[-1], 2 * v.latent_channels, 3)
    if v.use_quant_conv:
      f += self.conv(h, w, 2 * v.latent_channels, 2 * v.latent_channels, 1)
    return f

  def decoder(self, h: int, w: int) -> int:
    v, ch = self.vae, tuple(reversed(self.chans))
    f = self.conv(h, w, v.latent_channels, v.latent_channels, 1) if v.use_post_quant_conv else 0
    f += self.conv(h, w, v.latent_channels, ch[0], 3) + self.mid(h, w, ch[0])
    cin = ch[0]
    for i, c in enumerate(ch):
      for _ in range(v.layers_per_block + 1):
        f += self.resnet(h, w, cin, c)
        cin = c
      if i < len(ch) - 1:
        h, w = 2 * h, 2 * w
        f += self.conv(h, w, c, c, 3)
    return f + self.conv(h, w, ch[-1], v.out_channels, 3)
