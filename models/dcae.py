"""DC-AE (Chen et al., 2024), diffusers' `AutoencoderDC` (SANA's autoencoder), in Flax, NHWC.

    vae = AutoencoderDC(...)                          # fields = diffusers' config keys
    z = vae.apply(variables, x, method="encode")      # (B, H, W, 3) -> (B, H/f, W/f, latent)
    x = vae.apply(variables, z, method="decode")      # f = 2 ** (number of blocks - 1)
    z = vae.apply(variables, x, method="encode_latents")   # * scaling_factor: what SANA sees

Layer for layer as diffusers (models/autoencoders/autoencoder_dc.py), parameter names following
the torch module tree (`decoder.up_blocks.3.1.attn.to_qkv_multiscale.0.proj_in` is
`decoder/up_blocks_3_1/attn/to_qkv_multiscale_0/proj_in`: the index of diffusers'
`nn.Sequential` inside each stage is folded into the name), so `models.convert.dcae` derives
the key table from the tree. The pieces:
- ResBlock: conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input;
- EfficientViTBlock: multi-scale ReLU linear attention ("LiteMLA") then GLUMBConv, each with a
  residual. LiteMLA: q, k, v = 1x1 projections (no bias) to `heads * head_dim` channels, heads =
  channels // attention_head_dim; the concatenation [q, k, v] (3 * inner channels) is also
  aggregated per scale s in `qkv_multiscales` by a depthwise s x s conv then a 1x1 conv with
  3 * heads groups; all of it, cut into consecutive chunks of 3 * head_dim channels, gives the
  attention heads (q, k, v = the chunk's thirds; this mixes the projections' channels exactly as
  the original EfficientViT's qkv conv does). Per head, with q, k = ReLU(.):
      out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15)
  in float32, as (V K^T) Q when there are more pixels than head_dim (`relu_linear_attention`),
  else as the explicit N x N matrix (diffusers' quadratic branch: same value, eps placed alike);
  then a 1x1 projection (no bias), the norm, the residual;
- GLUMBConv (models.sana): 1x1 conv to 8C, SiLU, depthwise 3x3, SiLU gate, 1x1 conv (no bias),
  RMSNorm with bias, residual;
- down: a stride-2 3x3 conv, or (`downsample_block_type="pixel_unshuffle"`) a 3x3 conv to C/4
  then pixel-unshuffle; plus the shortcut: pixel-unshuffle the input and average consecutive
  channel groups down to the output width;
- up: nearest x2 then a 3x3 conv (`upsample_block_type="interpolate"`), or a 3x3 conv to 4C
  then pixel-shuffle; plus the shortcut: repeat every channel (repeat_interleave) up to 4C and
  pixel-shuffle;
- encoder: conv_in, the stages (blocks, then the down block), conv_out to `latent_channels`
  plus (`encoder_out_shortcut`) the channel-group average of its input;
- decoder: conv_in from the latent plus (`decoder_in_shortcut`) the repeated latent, the stages
  deepest first (up block, then blocks), RMSNorm (eps 1e-5, scale and bias), the activation
  `decoder_conv_act_fn`, conv_out. A first stage with 0 layers makes conv_in / conv_out a
  shortcut-free down / up block, as in diffusers.
Norms: "rms_norm" (RMSNorm over channels, eps 1e-5, scale and bias, in >= float32) or
"batch_norm" (inference BatchNorm, eps 1e-5: running statistics in the "batch_stats"
collection, which `apply` then needs). The encoder always uses rms_norm and SiLU, as diffusers.
Activations: diffusers' names (silu, relu, gelu, mish, swish). Unsupported config values (a
norm type other than these two, an unknown block type, mismatched tuple lengths) raise one
ValueError naming the key. Tiling (diffusers' `enable_tiling`) is not implemented.

Units: images NHWC in [-1, 1]; `encode` / `decode` work on unscaled latents, like diffusers;
`encode_latents` / `decode_latents` on the latents a denoiser sees (`z * scaling_factor`).
Execution fields: `dtype` (compute; norms and linear attention in >= float32, outputs float32),
`param_dtype`, `remat` (policy name in `models.dit.REMAT_POLICIES`, per ResBlock /
EfficientViTBlock). `flops_per_example(height, width, part)` counts the convs and matmuls. Parameters carry logical axis names (conv kernels
`(None, None, "conv_in", "conv_out")`, attention projections embed/heads, GLUMBConv embed/mlp,
norms "norm").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.registry import register_model
from models.sana import GLUMBConv, RMSNorm, dense, relu_linear_attention
from models.vae import activation, flops_by_part, rematted

Array = jax.Array
Dtype = Any

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
NORM_EPS = 1e-5
ATTENTION_EPS = 1e-15
_CONV_AXES = (None, None, "conv_in", "conv_out")


@dataclasses.dataclass(frozen=True)
class DCSettings:
  """What every block shares: remat policy name and dtypes."""
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def kw(self) -> dict[str, Any]:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def conv(features: int, kernel: int, name: str, cfg: DCSettings, *, strides: int = 1,
         groups: int = 1, use_bias: bool = True, axes=_CONV_AXES) -> nn.Conv:
  """torch's Conv2d(kernel, stride, padding=kernel // 2, groups) on NHWC."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
      feature_group_count=groups, use_bias=use_bias, name=name, **cfg.kw,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))


def norm(norm_type: str, name: str, cfg: DCSettings) -> nn.Module:
  """diffusers' get_normalization(norm_type, C) (eps 1e-5, affine) on NHWC channels."""
  if norm_type == "rms_norm":
    return RMSNorm(NORM_EPS, use_bias=True, param_dtype=cfg.param_dtype, name=name)
  if norm_type == "batch_norm":
    return nn.BatchNorm(
        use_running_average=True, epsilon=NORM_EPS, name=name, **cfg.kw,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))
  raise ValueError(f"DC-AE norm type {norm_type!r} is not supported (supported: "
                   f"{', '.join(NORM_TYPES)})")


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
  """torch's pixel_unshuffle on NHWC: (B, H r, W r, C) -> (B, H, W, C r r), channel c*r*r+i*r+j."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: Array, r: int = 2) -> Array:
  """torch's pixel_shuffle on NHWC: (B, H, W, C r r) -> (B, H r, W r, C) (inverse of unshuffle)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * r, w * r, c // (r * r))


def channel_group_mean(x: Array, groups_of: int) -> Array:
  """Averages consecutive groups of `groups_of` channels (torch: unflatten(1, (-1, g)).mean(2))."""
  return x.reshape(x.shape[:-1] + (x.shape[-1] // groups_of, groups_of)).mean(-1)


class ResBlock(nn.Module):
  """conv3x3 -> act -> conv3x3 (no bias) -> norm, plus the input."""
  channels: int
  norm_type: str
  act_fn: str
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = activation(self.act_fn)(conv(x.shape[-1], 3, "conv1", self.cfg)(x))
    h = conv(self.channels, 3, "conv2", self.cfg, use_bias=False)(h)
    return norm(self.norm_type, "norm", self.cfg)(h) + x


class MultiscaleProjection(nn.Module):
  """Depthwise s x s conv then a grouped 1x1 conv (3 * heads groups), no biases."""
  heads: int
  kernel: int
  cfg: DCSettings

  @nn.compact
  def __call__(self, qkv: Array) -> Array:
    c = qkv.shape[-1]
    h = conv(c, self.kernel, "proj_in", self.cfg, groups=c, use_bias=False,
             axes=(None, None, None, "conv_out"))(qkv)
    return conv(c, 1, "proj_out", self.cfg, groups=3 * self.heads, use_bias=False)(h)


def quadratic_relu_attention(q: Array, k: Array, v: Array, eps: float = ATTENTION_EPS) -> Array:
  """diffusers' small-image branch: the N x N matrix s = k^T q normalised over keys, then v s."""
  dt = jnp.promote_types(q.dtype, jnp.float32)
  s = jnp.einsum("bmgd,bngd->bgmn", k, q).astype(dt)
  s = s / (s.sum(axis=2, keepdims=True) + eps)
  return jnp.einsum("bmgd,bgmn->bngd", v, s.astype(v.dtype))


class MultiscaleLinearAttention(nn.Module):
  """diffusers' SanaMultiscaleLinearAttention ("LiteMLA", mult 1) with its residual."""
  head_dim: int
  scales: tuple[int, ...]
  norm_type: str
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, hgt, wid, c = x.shape
    heads = int(c // self.head_dim)
    inner = heads * self.head_dim
    proj = lambda name: dense(inner, ("embed", "heads"), name, use_bias=False,  # noqa: E731
                              **self.cfg.kw)
    qkv = jnp.concatenate([proj("to_q")(x), proj("to_k")(x), proj("to_v")(x)], axis=-1)
    scaled = [MultiscaleProjection(heads, s, self.cfg, name=f"to_qkv_multiscale_{i}")(qkv)
              for i, s in enumerate(self.scales)]
    h = jnp.concatenate([qkv] + scaled, axis=-1)
    n = hgt * wid
    h = h.reshape(b, n, -1, 3 * self.head_dim)
    q, k, v = jnp.split(h, 3, axis=-1)
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    if n > self.head_dim:
      out = relu_linear_attention(q, k, v, ATTENTION_EPS).astype(x.dtype)
    else:
      out = quadratic_relu_attention(q, k, v)
    out = dense(c, ("heads", "embed"), "to_out", use_bias=False, **self.cfg.kw)(
        out.reshape(b, hgt, wid, -1))
    return norm(self.norm_type, "norm_out", self.cfg)(out) + x


class EfficientViTBlock(nn.Module):
  """LiteMLA (`attn`) then GLUMBConv (`conv_out`, expand 4, RMSNorm, residual)."""
  head_dim: int
  scales: tuple[int, ...]
  norm_type: str
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = MultiscaleLinearAttention(self.head_dim, self.scales, self.norm_type, self.cfg,
                                  name="attn")(x)
    return GLUMBConv(4 * c, c, norm=True, residual=True, name="conv_out", **self.cfg.kw)(x)


class DownBlock(nn.Module):
  """diffusers' DCDownBlock2d: stride-2 conv or conv + pixel-unshuffle, optional shortcut."""
  out_channels: int
  pixel_unshuffle: bool
  shortcut: bool
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.pixel_unshuffle:
      y = pixel_unshuffle(conv(self.out_channels // 4, 3, "conv", self.cfg)(x))
    else:
      y = conv(self.out_channels, 3, "conv", self.cfg, strides=2)(x)
    if self.shortcut:
      y = y + channel_group_mean(pixel_unshuffle(x), x.shape[-1] * 4 // self.out_channels)
    return y


class UpBlock(nn.Module):
  """diffusers' DCUpBlock2d: nearest x2 + conv, or conv + pixel-shuffle, optional shortcut."""
  out_channels: int
  interpolate: bool
  shortcut: bool
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.interpolate:
      up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = conv(self.out_channels, 3, "conv", self.cfg)(up)
    else:
      y = pixel_shuffle(conv(4 * self.out_channels, 3, "conv", self.cfg)(x))
    if self.shortcut:
      repeats = self.out_channels * 4 // x.shape[-1]
      y = y + pixel_shuffle(jnp.repeat(x, repeats, axis=-1))
    return y


def _block(block_type: str, channels: int, head_dim: int, norm_type: str, act_fn: str,
           scales: tuple[int, ...], cfg: DCSettings, name: str) -> nn.Module:
  if block_type == "ResBlock":
    return rematted(ResBlock, cfg.remat)(channels, norm_type, act_fn, cfg, name=name)
  if block_type == "EfficientViTBlock":
    return rematted(EfficientViTBlock, cfg.remat)(head_dim, tuple(scales), norm_type, cfg,
                                                  name=name)
  raise ValueError(f"DC-AE block type {block_type!r} is not supported (supported: "
                   f"{', '.join(BLOCK_TYPES)})")


class Encoder(nn.Module):
  """diffusers' autoencoder_dc.Encoder (rms_norm and SiLU in every block, as diffusers)."""
  latent_channels: int
  head_dim: int
  block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  qkv_multiscales: tuple[tuple[int, ...], ...]
  pixel_unshuffle: bool
  out_shortcut: bool
  cfg: DCSettings

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg, chans, layers = self.cfg, self.block_out_channels, self.layers_per_block
    n = len(chans)
    if layers[0] > 0:
      x = conv(chans[0], 3, "conv_in", cfg)(x)
    else:
      x = DownBlock(chans[1], self.pixel_unshuffle, False, cfg, name="conv_in")(x)
    for i, (ch, num) in enumerate(zip(chans, layers)):
      for j in range(num):
        x = _block(self.block_types[i], ch, self.head_dim, "rms_norm", "silu",
                   self.qkv_multiscales[i], cfg, f"down_blocks_{i}_{j}")(x)
      if i < n - 1 and num > 0:
        x = DownBlock(chans[i + 1], self.pixel_unshuffle, True, cfg,
                      name=f"down_blocks_{i}_{num}")(x)
    y = conv(self.latent_channels, 3, "conv_out", cfg)(x)
    if self.out_shortcut:
      y = y + channel_group_mean(x, chans[-1] // self.latent_channels)
    return y


class Decoder(nn.Module):
  """diffusers' autoencoder_dc.Decoder."""
  out_channels: int
  head_dim: int
  block_types: tuple[str, ...]
  block_out_channels: tuple[int, ...]
  layers_per_block: tuple[int, ...]
  qkv_multiscales: tuple[tuple[int, ...], ...]
  norm_types: tuple[str, ...]
  act_fns: tuple[str, ...]
  interpolate: bool
  in_shortcut: bool
  conv_act_fn: str
  cfg: DCSettings

  @nn.compact
  def __call__(self, z: Array) -> Array:
    cfg, chans, layers = self.cfg, self.block_out_channels, self.layers_per_block
    n = len(chans)
    x = conv(chans[-1], 3, "conv_in", cfg)(z)
    if self.in_shortcut:
      x = x + jnp.repeat(z, chans[-1] // z.shape[-1], axis=-1)
    for i in reversed(range(n)):
      j = 0
      if i < n - 1 and layers[i] > 0:
        x = UpBlock(chans[i], self.interpolate, True, cfg, name=f"up_blocks_{i}_0")(x)
        j = 1
      for k in range(layers[i]):
        x = _block(self.block_types[i], chans[i], self.head_dim, self.norm_types[i],
                   self.act_fns[i], self.qkv_multiscales[i], cfg, f"up_blocks_{i}_{j + k}")(x)
    x = RMSNorm(NORM_EPS, use_bias=True, param_dtype=cfg.param_dtype, name="norm_out")(x)
    x = activation(self.conv_act_fn)(x)
    if layers[0] > 0:
      return conv(self.out_channels, 3, "conv_out", cfg)(x)
    return UpBlock(self.out_channels, self.interpolate, False, cfg, name="conv_out")(x)


StrOrTuple = Union[str, Sequence[str]]


def per_block(value, n: int, key: str) -> tuple:
  """A config value given once (str) or per block (sequence of length n) -> a tuple of n."""
  if isinstance(value, str):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"DC-AE {key}={list(value)!r} needs one entry per block ({n})")
  return value


@register_model("dcae")
class AutoencoderDC(nn.Module):
  """diffusers' AutoencoderDC (field names and defaults follow its config), NHWC.

  Sequence fields are tuples (`qkv_multiscales` a tuple of tuples); the `*_types` / `*_fns`
  fields take a string for all blocks or one entry per block, as diffusers. `__call__(x)` is
  diffusers' forward (decode(encode(x))); use `method=` for the other entry points.
  """
  in_channels: int = 3
  latent_channels: int = 32
  attention_head_dim: int = 32
  encoder_block_types: StrOrTuple = "ResBlock"
  decoder_block_types: StrOrTuple = "ResBlock"
  encoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  decoder_block_out_channels: Sequence[int] = (128, 256, 512, 512, 1024, 1024)
  encoder_layers_per_block: Sequence[int] = (2, 2, 2, 3, 3, 3)
  decoder_layers_per_block: Sequence[int] = (3, 3, 3, 3, 3, 3)
  encoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  decoder_qkv_multiscales: Sequence[Sequence[int]] = ((), (), (), (5,), (5,), (5,))
  upsample_block_type: str = "pixel_shuffle"
  downsample_block_type: str = "pixel_unshuffle"
  decoder_norm_types: StrOrTuple = "rms_norm"
  decoder_act_fns: StrOrTuple = "silu"
  encoder_out_shortcut: bool = True
  decoder_in_shortcut: bool = True
  decoder_conv_act_fn: str = "relu"
  scaling_factor: float = 1.0
  # Execution.
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  diffusers_class = "AutoencoderDC"

  def check_config(self) -> None:
    """Raises one ValueError naming the first unsupported config key and value."""
    for side in ("encoder", "decoder"):
      n = len(getattr(self, f"{side}_block_out_channels"))
      for key in (f"{side}_layers_per_block", f"{side}_qkv_multiscales"):
        if len(getattr(self, key)) != n:
          raise ValueError(f"DC-AE {key} needs one entry per block ({n}), got "
                           f"{getattr(self, key)!r}")
      for t in per_block(getattr(self, f"{side}_block_types"), n, f"{side}_block_types"):
        if t not in BLOCK_TYPES:
          raise ValueError(f"DC-AE {side}_block_types entry {t!r} is not supported (supported: "
                           f"{', '.join(BLOCK_TYPES)})")
    n = len(self.decoder_block_out_channels)
    for t in per_block(self.decoder_norm_types, n, "decoder_norm_types"):
      if t not in NORM_TYPES:
        raise ValueError(f"DC-AE decoder_norm_types entry {t!r} is not supported (supported: "
                         f"{', '.join(NORM_TYPES)})")
    for a in per_block(self.decoder_act_fns, n, "decoder_act_fns") + (self.decoder_conv_act_fn,):
      activation(a)

  def setup(self):
    self.check_config()
    cfg = DCSettings(self.remat, self.dtype, self.param_dtype)
    ne, nd = len(self.encoder_block_out_channels), len(self.decoder_block_out_channels)
    self.encoder = Encoder(
        latent_channels=self.latent_channels, head_dim=self.attention_head_dim,
        block_types=per_block(self.encoder_block_types, ne, "encoder_block_types"),
        block_out_channels=tuple(self.encoder_block_out_channels),
        layers_per_block=tuple(self.encoder_layers_per_block),
        qkv_multiscales=tuple(tuple(s) for s in self.encoder_qkv_multiscales),
        pixel_unshuffle=self.downsample_block_type == "pixel_unshuffle",
        out_shortcut=self.encoder_out_shortcut, cfg=cfg)
    self.decoder = Decoder(
        out_channels=self.in_channels, head_dim=self.attention_head_dim,
        block_types=per_block(self.decoder_block_types, nd, "decoder_block_types"),
        block_out_channels=tuple(self.decoder_block_out_channels),
        layers_per_block=tuple(self.decoder_layers_per_block),
        qkv_multiscales=tuple(tuple(s) for s in self.decoder_qkv_multiscales),
        norm_types=per_block(self.decoder_norm_types, nd, "decoder_norm_types"),
        act_fns=per_block(self.decoder_act_fns, nd, "decoder_act_fns"),
        interpolate=self.upsample_block_type == "interpolate",
        in_shortcut=self.decoder_in_shortcut, conv_act_fn=self.decoder_conv_act_fn, cfg=cfg)

  @property
  def downscale(self) -> int:
    """Pixels per latent along each side: 2 ** (number of encoder blocks - 1)."""
    return 2 ** (len(self.encoder_block_out_channels) - 1)

  # --- the diffusers entry points -------------------------------------------------------------

  def encode(self, x: Array) -> Array:
    """Image NHWC in [-1, 1] -> unscaled latent NHWC (float32), no tiling."""
    return self.encoder(x.astype(self.dtype)).astype(jnp.float32)

  def decode(self, z: Array) -> Array:
    """Unscaled latent NHWC -> image NHWC (float32), no tiling."""
    return self.decoder(z.astype(self.dtype)).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction decode(encode(x)) (diffusers' forward)."""
    return self.decode(self.encode(x))

  # --- helpers for denoisers ------------------------------------------------------------------

  def scale_latents(self, z: Array) -> Array:
    """Unscaled latent -> the latent a denoiser sees (z * scaling_factor)."""
    return z * self.scaling_factor

  def unscale_latents(self, z_scaled: Array) -> Array:
    return z_scaled / self.scaling_factor

  def encode_latents(self, x: Array) -> Array:
    """Image -> denoiser latent."""
    return self.scale_latents(self.encode(x))

  def decode_latents(self, z_scaled: Array) -> Array:
    """Denoiser latent -> image NHWC in about [-1, 1]."""
    return self.decode(self.unscale_latents(z_scaled))

  # --- cost ----------------------------------------------------------------------------------

  def flops_per_example(self, height: int, width: int, part: str = "decode") -> int:
    """Conv/matmul FLOPs (2 per multiply-add) for one image of `height` x `width` pixels, as
    AutoencoderKL's: `part` is "encode", "decode" or "both". Counts every conv (grouped and
    depthwise ones by their groups), the attention projections and the ReLU linear attention's
    products (its N x N branch on small maps); norms, activations and the shortcuts' channel
    means are left out (a few percent)."""
    return flops_by_part(_DCFlopCounter(self), self.downscale, height, width, part)


class _DCFlopCounter:
  """Counts an AutoencoderDC's conv/matmul FLOPs analytically, block by block as it runs."""

  def __init__(self, ae: AutoencoderDC):
    self.ae = ae

  @staticmethod
  def conv(n: int, cin: int, cout: int, k: int, groups: int = 1) -> int:
    """n output pixels of a k x k conv."""
    return 2 * n * cout * (cin // groups) * k * k

  def attention(self, n: int, c: int, scales: tuple[int, ...]) -> int:
    hd = self.ae.attention_head_dim
    heads = c // hd
    inner = heads * hd
    f = 3 * self.conv(n, c, inner, 1)                              # to_q, to_k, to_v
    for s in scales:                                               # depthwise, grouped 1x1
      f += self.conv(n, 3 * inner, 3 * inner, s, 3 * inner)
      f += self.conv(n, 3 * inner, 3 * inner, 1, 3 * heads)
    all_heads = heads * (1 + len(scales))
    if n > hd:   # (V' K^T) Q with V' = V plus a row of ones
      f += all_heads * 2 * 2 * n * hd * (hd + 1)
    else:        # the N x N matrix, then V times it
      f += all_heads * 2 * 2 * n * n * hd
    return f + self.conv(n, all_heads * hd, c, 1)                  # to_out

  def block(self, kind: str, n: int, c: int, scales: tuple[int, ...]) -> int:
    if kind == "ResBlock":
      return 2 * self.conv(n, c, c, 3)
    glumb = self.conv(n, c, 8 * c, 1) + self.conv(n, 8 * c, 8 * c, 3, 8 * c) + self.conv(
        n, 4 * c, c, 1)
    return self.attention(n, c, scales) + glumb

  def down(self, h: int, w: int, cin: int, cout: int) -> int:
    """The down block from an h x w map."""
    if self.ae.downsample_block_type == "pixel_unshuffle":
      return self.conv(h * w, cin, cout // 4, 3)
    return self.conv((h // 2) * (w // 2), cin, cout, 3)

  def up(self, h: int, w: int, cin: int, cout: int) -> int:
    """The up block from an h x w map."""
    if self.ae.upsample_block_type == "interpolate":
      return self.conv(4 * h * w, cin, cout, 3)
    return self.conv(h * w, cin, 4 * cout, 3)

  def encoder(self, h: int, w: int) -> int:
    ae = self.ae
    chans, layers = tuple(ae.encoder_block_out_channels), tuple(ae.encoder_layers_per_block)
    kinds = per_block(ae.encoder_block_types, len(chans), "encoder_block_types")
    if layers[0] > 0:
      f = self.conv(h * w, ae.in_channels, chans[0], 3)
    else:
      f = self.down(h, w, ae.in_channels, chans[1])
      h, w = h // 2, w // 2
    for i, (c, num) in enumerate(zip(chans, layers)):
      f += num * self.block(kinds[i], h * w, c, tuple(ae.encoder_qkv_multiscales[i]))
      if i < len(chans) - 1 and num > 0:
        f += self.down(h, w, c, chans[i + 1])
        h, w = h // 2, w // 2
    return f + self.conv(h * w, chans[-1], ae.latent_channels, 3)

  def decoder(self, h: int, w: int) -> int:
    ae = self.ae
    chans, layers = tuple(ae.decoder_block_out_channels), tuple(ae.decoder_layers_per_block)
    kinds = per_block(ae.decoder_block_types, len(chans), "decoder_block_types")
    f = self.conv(h * w, ae.latent_channels, chans[-1], 3)
    for i in reversed(range(len(chans))):
      if i < len(chans) - 1 and layers[i] > 0:
        f += self.up(h, w, chans[i + 1], chans[i])
        h, w = 2 * h, 2 * w
      f += layers[i] * self.block(kinds[i], h * w, chans[i], tuple(ae.decoder_qkv_multiscales[i]))
    if layers[0] > 0:
      return f + self.conv(h * w, chans[0], ae.in_channels, 3)
    return f + self.up(h, w, chans[0], ae.in_channels)
