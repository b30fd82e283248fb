"""The Stable Diffusion UNet (SD1.5, SD2.1, SDXL, LCM) as diffusers' `UNet2DConditionModel`.

    model = UNet(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)   # SD1.5
    eps = model.apply(variables, x, t, text_states)                # x (B, H, W, 4) -> (B, H, W, 4)
    eps = model.apply(variables, x, t, text_states,
                      {"text_embeds": pooled, "time_ids": ids})    # SDXL's added conditioning
    eps = model.apply(variables, x, t, text_states, timestep_cond=w_emb)    # LCM's w embedding
    eps, feats = model.apply(variables, x, t, text_states, return_features=("mid",))

Layer for layer the math of diffusers' UNet2DConditionModel (unets/unet_2d_condition.py and
unets/unet_2d_blocks.py) for the configurations the SD family uses, NHWC in and out:
- time: `Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)` sinusoids ->
  `time_embedding` = linear_1 -> act -> linear_2 [-> post act], with LCM's `cond_proj` (no bias,
  zero-initialised here) adding `timestep_cond` to the sinusoids first; optional class
  embedding (a table for `num_class_embeds`, or "timestep" / "projection" MLPs) and SDXL's
  `text_time` added conditioning: sinusoids of the 6 `time_ids` (`addition_time_embed_dim`
  each) concatenated after the pooled `text_embeds` -> `add_embedding` MLP, added to the time
  embedding;
- `conv_in`; down blocks (`CrossAttnDownBlock2D` / `DownBlock2D`): per layer a ResnetBlock2D
  (GroupNorm -> act -> conv3x3, + Linear(act(temb)) per channel ["default"] or a scale/shift
  after norm2 ["scale_shift"], GroupNorm -> act -> conv3x3, 1x1 conv shortcut when channels
  change) then a Transformer2DModel; a stride-2 conv downsampler on all but the last block;
- mid block `UNetMidBlock2DCrossAttn`: resnet, (transformer, resnet) x 1;
- `guidance_adapter=H` (> 0, ours): AGD's adapter (models/adapters.py) of the time embedding
  added to every resnet's output, so a student with `time_cond_proj_dim` learns CFG in its
  adapters while the base stays frozen (`objective.name=agd`); it does not export to diffusers;
- up blocks (`CrossAttnUpBlock2D` / `UpBlock2D`): `layers + 1` resnets, each on the channel
  concatenation [h, skip] of the matching down-path output, a transformer after each in the
  cross-attention blocks, nearest x2 upsampling + conv3x3 on all but the last block;
- GroupNorm -> act -> `conv_out`.
Transformer2DModel: GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or Linear with
`use_linear_projection` as SD2.1/SDXL) -> `transformer_layers_per_block` BasicTransformerBlocks
(LayerNorm -> self attention, LayerNorm -> cross attention to `encoder_hidden_states`,
LayerNorm -> GEGLU feed-forward (x 4, exact GELU), each residual) -> proj_out + residual.
Attention heads: diffusers' config field `attention_head_dim` is really the number of heads
(its own comment says so); our field is named for what it is, `num_attention_heads`, and the
head dim is `channels // heads`. q/k/v have no bias; the softmax is float32 (no upcast flag).
`encoder_attention_mask` (B, L) with 1 = keep becomes the logits bias (1 - mask) * -10000 of
every cross attention, as diffusers does.

Not covered (the converter raises one ValueError naming the config key): dual / only cross
attention, `attention_type` other than "default", Fourier time embedding, addition embeddings
other than "text_time", nested per-layer transformer depths, class-embedding concatenation,
sizes not divisible by the total downsampling (diffusers' odd-size upsampling).

Execution fields: `dtype` (compute), `param_dtype`, `attention` (implementation name, see
`models.dit.attend_heads`), `remat` (policy name in `models.dit.REMAT_POLICIES`, applied to every
ResnetBlock and Transformer2D). Parameters carry logical axis names (conv kernels
`(None, None, "conv_in", "conv_out")`, q/k/v `("embed", "heads")`, out `("heads", "embed")`,
feed-forward `("embed", "mlp")` / `("mlp", "embed")`, norms `("norm",)`).

Parameter tree = the torch module tree with list indices as suffixes (`down_blocks.1.attentions.0.
transformer_blocks.0.attn2.to_out.0` -> `down_blocks_1/attentions_0/transformer_blocks_0/attn2/
to_out_0`), so LoRA patterns such as r"attn[12]/to_(q|k|v|out)" select the same layers as in
diffusers' LoRA recipes and conversion is a rename plus transposes (models/convert/unet.py).

`return_features` names block outputs returned beside the output: "down_{i}", "mid", "up_{i}"
(DMD2's GAN head sits on "mid"), or indexes `feature_names` (the forward order: downs, mid,
ups), so integer-keyed objective settings (`gan_feature_block`) work for UNets too. `flops_per_example(height, width)` counts the matmuls and
convolutions of one forward (2 FLOPs per multiply-add) by tracing the module abstractly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.adapters import GuidanceAdapter
from models.dit import attend_heads, timestep_embedding
from models.registry import register_model
from models.vae import activation, conv, dense, group_norm, rematted

Array = jax.Array
Dtype = Any
PerBlock = Union[int, Sequence[int]]

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
CROSS_MID = "UNetMidBlock2DCrossAttn"
TIME_IDS = 6  # SDXL's (original h, w, crop top, left, target h, w)


def per_block(value: PerBlock, n: int, name: str) -> tuple:
  """An int (or None) repeated per block, or a per-block sequence of length n."""
  if value is None or isinstance(value, (int, np.integer)):
    return (value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f"UNet: {name} has {len(value)} entries for {n} blocks: {value}")
  return value


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """What every block shares (hashable): norms, activation, attention, remat, dtypes."""
  groups: int
  eps: float
  act_fn: str
  time_scale_shift: str
  mid_scale: float
  linear_projection: bool
  downsample_padding: int
  attention: str
  remat: str
  scan: bool
  dtype: Dtype
  param_dtype: Dtype
  guidance_adapter: int = 0

  @property
  def kw(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def resnet(self, channels: int, name: str, output_scale_factor: float = 1.0):
    return rematted(ResnetBlock, self.remat)(
        channels, self.groups, self.eps, self.act_fn, self.time_scale_shift,
        output_scale_factor, self.guidance_adapter, name=name, **self.kw)

  def transformer(self, heads: int, depth: int, name: str):
    return rematted(Transformer2D, self.remat)(
        heads, depth, self.groups, self.linear_projection, self.attention, self.scan, name=name,
        **self.kw)


# ----------------------------------------------------------------------------------------------
# Layers.

class ResnetBlock(nn.Module):
  """diffusers' ResnetBlock2D with its time-embedding projection; with `guidance_adapter` = H
  AGD's adapter of the time embedding (which carries w through `time_cond_proj_dim`) added to
  its output (`guidance_adapter`, zero-initialised: not part of diffusers)."""
  out_channels: int
  groups: int
  eps: float
  act_fn: str
  time_scale_shift: str
  output_scale_factor: float
  guidance_adapter: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    act = activation(self.act_fn)
    h = act(group_norm(self.groups, name="norm1", eps=self.eps, **kw)(x))
    h = conv(self.out_channels, 3, name="conv1", **kw)(h)
    scale_shift = self.time_scale_shift == "scale_shift"
    t = dense(self.out_channels * (2 if scale_shift else 1), name="time_emb_proj",
              **kw)(act(temb))[:, None, None, :]
    if scale_shift:
      scale, shift = jnp.split(t, 2, axis=-1)
      h = group_norm(self.groups, name="norm2", eps=self.eps, **kw)(h) * (1 + scale) + shift
    else:
      h = group_norm(self.groups, name="norm2", eps=self.eps, **kw)(h + t)
    h = conv(self.out_channels, 3, name="conv2", **kw)(act(h))
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name="conv_shortcut", **kw)(x)
    out = x + h
    out = out if self.output_scale_factor == 1 else out / self.output_scale_factor
    if self.guidance_adapter:
      out = out + GuidanceAdapter(self.out_channels, self.guidance_adapter, name="guidance_adapter",
                                  **kw)(temb)[:, None, None, :].astype(out.dtype)
    return out


class Attention(nn.Module):
  """diffusers' Attention (self, or cross to `context`): bias-free q/k/v, `to_out.0` Linear."""
  heads: int
  head_dim: int
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               bias: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.heads * self.head_dim
    context = x if context is None else context
    split = lambda a: a.reshape(a.shape[:2] + (self.heads, self.head_dim))  # noqa: E731
    q = split(dense(inner, name="to_q", use_bias=False, axes=("embed", "heads"), **kw)(x))
    k = split(dense(inner, name="to_k", use_bias=False, axes=("embed", "heads"), **kw)(context))
    v = split(dense(inner, name="to_v", use_bias=False, axes=("embed", "heads"), **kw)(context))
    o = attend_heads(q, k, v, self.attention, bias=bias).reshape(x.shape[:2] + (inner,))
    return dense(x.shape[-1], name="to_out_0", axes=("heads", "embed"), **kw)(o)


class GEGLU(nn.Module):
  """diffusers' GEGLU: `proj` to 2 x inner, then h * GELU(gate) (exact GELU)."""
  inner: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h, gate = jnp.split(dense(2 * self.inner, name="proj", dtype=self.dtype,
                              param_dtype=self.param_dtype)(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class GEGLUFeedForward(nn.Module):
  """diffusers' FeedForward(activation_fn="geglu"): net.0 (GEGLU, x mult) -> net.2 (Linear)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(x.shape[-1] * self.mult, name="net_0", **kw)(x)
    return dense(x.shape[-1], name="net_2", axes=("mlp", "embed"), **kw)(h)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """torch.nn.LayerNorm(dim) (eps 1e-5, affine) with exact variance."""
  return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name=name, dtype=dtype,
                      param_dtype=param_dtype,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                              ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             ("norm",)))


class BasicTransformerBlock(nn.Module):
  """Self attention, cross attention, GEGLU feed-forward; pre-LayerNorm, residual each."""
  heads: int
  head_dim: int
  attention: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, context: Array, bias: Optional[Array]) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = functools.partial(Attention, self.heads, self.head_dim, self.attention, **kw)
    h = h + attn(name="attn1")(layer_norm("norm1", **kw)(h))
    h = h + attn(name="attn2")(layer_norm("norm2", **kw)(h), context, bias)
    return h + GEGLUFeedForward(name="ff", **kw)(layer_norm("norm3", **kw)(h))


class ScannedBlock(BasicTransformerBlock):
  """A BasicTransformerBlock in `nn.scan`'s carry form: (h, context, bias) -> (h, None)."""

  def __call__(self, h, context, bias):  # pylint: disable=arguments-renamed
    return super().__call__(h, context, bias), None


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel on continuous NHWC input (GroupNorm, proj_in, blocks, out).

  `scan`: the blocks run under `nn.scan` (parameters stacked on a leading "layers" axis under
  `transformer_blocks`), so a deep stack (SDXL: 10) compiles once."""
  heads: int
  depth: int
  groups: int
  linear_projection: bool
  attention: str = "xla"
  scan: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, bias: Optional[Array]) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    def project(name, axes):
      if self.linear_projection:
        return dense(c, name=name, axes=axes, **kw)
      return conv(c, 1, name=name, **kw)

    h = group_norm(self.groups, name="norm", eps=1e-6, **kw)(x)
    h = project("proj_in", ("embed", "mlp"))(h).reshape(b, hgt * wid, c)
    if self.scan:
      blocks = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      h, _ = blocks(self.heads, c // self.heads, self.attention, name="transformer_blocks",
                    **kw)(h, context, bias)
    for i in range(0 if self.scan else self.depth):
      h = BasicTransformerBlock(self.heads, c // self.heads, self.attention,
                                name=f"transformer_blocks_{i}", **kw)(h, context, bias)
    return x + project("proj_out", ("mlp", "embed"))(h.reshape(b, hgt, wid, c))


class Downsample(nn.Module):
  """diffusers' Downsample2D(use_conv=True): a stride-2 conv3x3 (padding 0 pads right/bottom)."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding,) * 2,) * 2
    return conv(self.channels, 3, strides=2, padding=pad, name="conv", dtype=self.dtype,
                param_dtype=self.param_dtype)(x)


class Upsample(nn.Module):
  """diffusers' Upsample2D(use_conv=True): nearest-neighbour x2, then a conv3x3."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x)


class TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: [+ cond_proj(cond)] -> linear_1 -> act -> linear_2 [-> act]."""
  features: int
  act_fn: str = "silu"
  post_act_fn: Optional[str] = None
  cond_proj_dim: Optional[int] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sample: Array, condition: Optional[Array] = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cond_proj_dim is not None:
      if condition is None:
        condition = jnp.zeros(sample.shape[:-1] + (self.cond_proj_dim,), sample.dtype)
      # Zero-initialised (a w input added to a trained UNet starts without effect); converted
      # checkpoints bring their own weights.
      sample = sample + nn.Dense(
          sample.shape[-1], name="cond_proj", use_bias=False, **kw,
          kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None)))(
              condition)
    h = dense(self.features, name="linear_1", axes=(None, "mlp"), **kw)(sample)
    h = dense(self.features, name="linear_2", axes=("mlp", "embed"),
              **kw)(activation(self.act_fn)(h))
    return h if self.post_act_fn is None else activation(self.post_act_fn)(h)


# ----------------------------------------------------------------------------------------------
# Blocks: the resnet / transformer interleaving of diffusers' down, mid and up blocks.

class DownBlock(nn.Module):
  """CrossAttnDownBlock2D (`cross=True`) or DownBlock2D; returns (h, skip outputs)."""
  out_channels: int
  layers: int
  cross: bool
  heads: int
  depth: int
  downsample: bool
  cfg: BlockSettings

  @nn.compact
  def __call__(self, h, temb, context, bias):
    u = self.cfg
    skips = []
    for i in range(self.layers):
      h = u.resnet(self.out_channels, f"resnets_{i}")(h, temb)
      if self.cross:
        h = u.transformer(self.heads, self.depth, f"attentions_{i}")(h, context, bias)
      skips.append(h)
    if self.downsample:
      h = Downsample(self.out_channels, u.downsample_padding, name="downsamplers_0", **u.kw)(h)
      skips.append(h)
    return h, skips


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""
  channels: int
  heads: int
  depth: int
  cfg: BlockSettings

  @nn.compact
  def __call__(self, h, temb, context, bias):
    u = self.cfg
    h = u.resnet(self.channels, "resnets_0", u.mid_scale)(h, temb)
    h = u.transformer(self.heads, self.depth, "attentions_0")(h, context, bias)
    return u.resnet(self.channels, "resnets_1", u.mid_scale)(h, temb)


class UpBlock(nn.Module):
  """CrossAttnUpBlock2D (`cross=True`) or UpBlock2D over the concatenated skip outputs."""
  out_channels: int
  layers: int
  cross: bool
  heads: int
  depth: int
  upsample: bool
  cfg: BlockSettings

  @nn.compact
  def __call__(self, h, skips, temb, context, bias):
    u = self.cfg
    for i in range(self.layers):
      h = jnp.concatenate([h, skips[-1 - i]], axis=-1)
      h = u.resnet(self.out_channels, f"resnets_{i}")(h, temb)
      if self.cross:
        h = u.transformer(self.heads, self.depth, f"attentions_{i}")(h, context, bias)
    if self.upsample:
      h = Upsample(self.out_channels, name="upsamplers_0", **u.kw)(h)
    return h


# ----------------------------------------------------------------------------------------------
# The model.

@register_model("unet")
class UNet(nn.Module):
  """diffusers' UNet2DConditionModel (see the module docstring); fields mirror its config."""
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  down_block_types: Sequence[str] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  mid_block_type: Optional[str] = CROSS_MID
  up_block_types: Sequence[str] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: PerBlock = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = "silu"
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: PerBlock = 768
  transformer_layers_per_block: PerBlock = 1
  num_attention_heads: PerBlock = 8   # diffusers' `attention_head_dim` (see the module doc)
  use_linear_projection: bool = False
  upcast_attention: bool = False      # kept for export; our softmax is always float32
  class_embed_type: Optional[str] = None   # None (a table if num_class_embeds), timestep, projection
  num_class_embeds: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  addition_embed_type: Optional[str] = None   # None or "text_time" (SDXL)
  addition_time_embed_dim: Optional[int] = None
  encoder_hid_dim: Optional[int] = None   # a Linear from the text encoder's width
  resnet_time_scale_shift: str = "default"
  time_embedding_dim: Optional[int] = None
  time_embedding_act_fn: Optional[str] = None
  timestep_post_act: Optional[str] = None
  time_cond_proj_dim: Optional[int] = None
  # AGD: an adapter of the time embedding added to every resnet's output, this hidden width
  # (0: none; not part of diffusers, so a UNet with adapters does not export).
  guidance_adapter: int = 0
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  # Execution.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"
  remat: str = "none"
  scan_blocks: bool = False   # nn.scan over each Transformer2D's blocks (stack_transformer_blocks)

  diffusers_class = "UNet2DConditionModel"
  # An int or one value per block (configs may give either).
  any_type_fields = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                     "num_attention_heads")

  # --- static plan ------------------------------------------------------------------------------

  @property
  def num_blocks(self) -> int:
    return len(self.block_out_channels)

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def downscale(self) -> int:
    return 2 ** (self.num_blocks - 1)

  @property
  def execution_kw(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def plan(self, name: str) -> tuple:
    """Per-block values of a per-block field (`layers_per_block`, `num_attention_heads`, ...)."""
    return per_block(getattr(self, name), self.num_blocks, name)

  def validate(self):
    """Raises one ValueError naming the first unsupported or inconsistent field."""
    n = self.num_blocks
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"UNet: {n} block_out_channels but {len(self.down_block_types)} down and "
                       f"{len(self.up_block_types)} up block types")
    bad = [t for t in self.down_block_types if t not in (CROSS_DOWN, PLAIN_DOWN)] + [
        t for t in self.up_block_types if t not in (CROSS_UP, PLAIN_UP)]
    if bad:
      raise ValueError(f"UNet: unsupported block type {bad[0]!r} (supported: {CROSS_DOWN}, "
                       f"{PLAIN_DOWN}, {CROSS_UP}, {PLAIN_UP})")
    if self.mid_block_type not in (CROSS_MID, None):
      raise ValueError(f"UNet: unsupported mid_block_type {self.mid_block_type!r} "
                       f"(supported: {CROSS_MID} or None)")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                 "num_attention_heads"):
      self.plan(name)
    if self.resnet_time_scale_shift not in ("default", "scale_shift"):
      raise ValueError("UNet: resnet_time_scale_shift must be 'default' or 'scale_shift', got "
                       f"{self.resnet_time_scale_shift!r}")
    if self.class_embed_type not in (None, "timestep", "projection"):
      raise ValueError(f"UNet: unsupported class_embed_type {self.class_embed_type!r}")
    if self.addition_embed_type not in (None, "text_time"):
      raise ValueError(f"UNet: unsupported addition_embed_type {self.addition_embed_type!r} "
                       "(supported: None, 'text_time')")

  @property
  def block_settings(self) -> BlockSettings:
    return BlockSettings(self.norm_num_groups, self.norm_eps, self.act_fn,
                         self.resnet_time_scale_shift, self.mid_block_scale_factor,
                         self.use_linear_projection, self.downsample_padding, self.attention,
                         self.remat, self.scan_blocks, self.dtype, self.param_dtype,
                         self.guidance_adapter)

  @property
  def feature_names(self) -> list[str]:
    """The block outputs `return_features` can name, in forward order."""
    n = self.num_blocks
    return [f"down_{i}" for i in range(n)] + ["mid"] + [f"up_{i}" for i in range(n)]

  def _feature_name(self, f) -> Optional[str]:
    names = self.feature_names
    if isinstance(f, (int, np.integer)):
      return names[int(f)] if -len(names) <= int(f) < len(names) else None
    return f

  @property
  def text_width(self) -> Optional[int]:
    """The width of the prompt embeddings (`text_embeds`) the network reads; None without
    cross-attention blocks."""
    blocks = (*self.down_block_types, *self.up_block_types, self.mid_block_type or "")
    if not any("CrossAttn" in b for b in blocks):
      return None
    return self.encoder_hid_dim or self.plan("cross_attention_dim")[0]

  def dummy_inputs(self, batch: int = 1, height: Optional[int] = None,
                   width: Optional[int] = None, text_length: int = 77):
    """(args, kwargs) of a forward on zeros at the given (or the config's) latent size."""
    height = height or self.sample_size
    width = width or height
    ctx_dim = self.encoder_hid_dim or self.plan("cross_attention_dim")[0]
    args = [jnp.zeros((batch, height, width, self.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.float32),
            jnp.zeros((batch, text_length, ctx_dim), jnp.float32)]
    kwargs = {}
    if self.addition_embed_type == "text_time":
      pooled = self.projection_class_embeddings_input_dim - TIME_IDS * self.addition_time_embed_dim
      kwargs["added_cond"] = {"text_embeds": jnp.zeros((batch, pooled), jnp.float32),
                              "time_ids": jnp.zeros((batch, TIME_IDS), jnp.float32)}
    if self.time_cond_proj_dim is not None:
      kwargs["timestep_cond"] = jnp.zeros((batch, self.time_cond_proj_dim), jnp.float32)
    if self.num_class_embeds or self.class_embed_type:
      kwargs["class_labels"] = (
          jnp.zeros((batch, self.projection_class_embeddings_input_dim), jnp.float32)
          if self.class_embed_type == "projection" else jnp.zeros((batch,), jnp.int32))
    return tuple(args), kwargs

  # How a student of this model embeds the CFG scale w (the objectives' `guidance_embed`):
  # LCM's `time_cond_proj` (a new 256-d input, randomly initialised as LCM does).
  GUIDANCE_EMBED = {"time_cond_proj_dim": 256}

  def guidance_inputs(self, w) -> dict:
    """The call keywords for CFG scale w: LCM's `timestep_cond`, the 1000 (w - 1) sinusoid of
    diffusers' `get_guidance_scale_embedding` (LCM writes eps_c + w' (eps_c - eps_null) with
    w' = w - 1, and diffusers' LCM pipeline embeds guidance_scale - 1 the same way)."""
    if not self.time_cond_proj_dim:
      raise ValueError("guidance given but the UNet has no time_cond_proj_dim (no w input)")
    w = jnp.asarray(w, jnp.float32).reshape(-1)
    return {"timestep_cond": timestep_embedding(1000.0 * (w - 1.0), self.time_cond_proj_dim,
                                                flip_sin_to_cos=False, downscale_freq_shift=1.0)}

  def scan_layout(self, params: dict, scan: bool) -> dict:
    """`params` of this module in the layout of `scan_blocks=scan` (stacked or per block)."""
    if scan == self.scan_blocks:
      return params
    return stack_transformer_blocks(params) if scan else unstack_transformer_blocks(params)

  def flops_per_example(self, height: Optional[int] = None, width: Optional[int] = None,
                        text_length: int = 77) -> int:
    return flops_per_example(self, height, width, text_length)

  # --- forward ----------------------------------------------------------------------------------

  def _embedding(self, timestep, batch, timestep_cond, class_labels, added_cond) -> Array:
    kw = self.execution_kw
    c0 = self.block_out_channels[0]
    t = jnp.asarray(timestep)
    t = jnp.broadcast_to(t.astype(jnp.promote_types(t.dtype, jnp.float32)).reshape(-1), (batch,))
    sinus = functools.partial(timestep_embedding, flip_sin_to_cos=self.flip_sin_to_cos,
                              downscale_freq_shift=self.freq_shift)
    emb = TimestepEmbedding(self.time_embed_dim, self.act_fn, self.timestep_post_act,
                            self.time_cond_proj_dim, name="time_embedding", **kw)(
                                sinus(t, c0).astype(self.dtype),
                                None if timestep_cond is None else timestep_cond.astype(self.dtype))
    if self.class_embed_type is not None or self.num_class_embeds is not None:
      if class_labels is None:
        raise ValueError("UNet: this model has a class embedding; pass class_labels")
      if self.class_embed_type is None:
        emb = emb + nn.Embed(self.num_class_embeds, self.time_embed_dim, name="class_embedding",
                             embedding_init=nn.with_logical_partitioning(
                                 nn.initializers.normal(1.0), (None, "embed")),
                             **kw)(class_labels)
      else:
        feats = (sinus(jnp.asarray(class_labels, jnp.float32), c0)
                 if self.class_embed_type == "timestep" else class_labels)
        emb = emb + TimestepEmbedding(self.time_embed_dim, self.act_fn, name="class_embedding",
                                      **kw)(feats.astype(self.dtype))
    if self.addition_embed_type == "text_time":
      if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
        raise ValueError("UNet: addition_embed_type='text_time' needs added_cond with "
                         "'text_embeds' and 'time_ids' (diffusers' added_cond_kwargs)")
      ids = jnp.asarray(added_cond["time_ids"])
      time_embeds = sinus(ids.reshape(-1), self.addition_time_embed_dim).reshape(batch, -1)
      add = jnp.concatenate([added_cond["text_embeds"].astype(time_embeds.dtype), time_embeds],
                            -1)
      emb = emb + TimestepEmbedding(self.time_embed_dim, self.act_fn, name="add_embedding",
                                    **kw)(add.astype(self.dtype))
    if self.time_embedding_act_fn is not None:
      emb = activation(self.time_embedding_act_fn)(emb)
    return emb

  @nn.compact
  def __call__(self, x: Array, timestep, encoder_hidden_states: Array,
               added_cond: Optional[Mapping[str, Array]] = None,
               timestep_cond: Optional[Array] = None, *, class_labels: Optional[Array] = None,
               encoder_attention_mask: Optional[Array] = None,
               return_features: Sequence[str] = (), train: bool = False):
    del train  # no dropout in the SD UNets
    self.validate()
    known = self.feature_names
    missing = [f for f in return_features if self._feature_name(f) not in known]
    if missing:
      raise ValueError(f"UNet: unknown feature {missing[0]!r} (known: {', '.join(known)}, or "
                       f"an index into that list)")
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNet expects (B, H, W, {self.in_channels}) inputs, got {x.shape}")
    b, hgt, wid, _ = x.shape
    if hgt % self.downscale or wid % self.downscale:
      raise ValueError(f"UNet: input {hgt}x{wid} is not divisible by the total downsampling "
                       f"{self.downscale}")
    kw = self.execution_kw
    x = x.astype(self.dtype)
    if self.center_input_sample:
      x = 2 * x - 1.0
    temb = self._embedding(timestep, b, timestep_cond, class_labels, added_cond)
    context = encoder_hidden_states.astype(self.dtype)
    if self.encoder_hid_dim is not None:
      context = dense(self.plan("cross_attention_dim")[0], name="encoder_hid_proj",
                      **kw)(context)
    bias = None
    if encoder_attention_mask is not None:
      bias = ((1.0 - encoder_attention_mask.astype(jnp.float32)) * -10000.0)[:, None, None, :]
    feats = {}
    cfg = self.block_settings

    h = conv(self.block_out_channels[0], self.conv_in_kernel, name="conv_in", **kw)(x)
    skips = [h]
    layers, heads = self.plan("layers_per_block"), self.plan("num_attention_heads")
    depth = self.plan("transformer_layers_per_block")
    for i, kind in enumerate(self.down_block_types):
      h, out = DownBlock(self.block_out_channels[i], layers[i], kind == CROSS_DOWN, heads[i],
                         depth[i], i < self.num_blocks - 1, cfg, name=f"down_blocks_{i}")(
                             h, temb, context, bias)
      skips.extend(out)
      feats[f"down_{i}"] = h
    if self.mid_block_type is not None:
      h = MidBlock(self.block_out_channels[-1], heads[-1], depth[-1], cfg, name="mid_block")(
          h, temb, context, bias)
    feats["mid"] = h
    for i, kind in enumerate(self.up_block_types):
      j = self.num_blocks - 1 - i   # the down block this up block mirrors
      n = layers[j] + 1
      h = UpBlock(self.block_out_channels[j], n, kind == CROSS_UP, heads[j], depth[j],
                  i < self.num_blocks - 1, cfg, name=f"up_blocks_{i}")(
                      h, skips[-n:], temb, context, bias)
      skips = skips[:-n]
      feats[f"up_{i}"] = h
    h = activation(self.act_fn)(group_norm(self.norm_num_groups, name="conv_norm_out",
                                           eps=self.norm_eps, **kw)(h))
    out = conv(self.out_channels, self.conv_out_kernel, name="conv_out", **kw)(h)
    if not return_features:
      return out
    return out, {f: feats[self._feature_name(f)] for f in return_features}


# ----------------------------------------------------------------------------------------------
# Scanned <-> unscanned parameter layouts.

_BLOCK = re.compile(r"^transformer_blocks_(\d+)$")


def stack_transformer_blocks(tree: Mapping) -> dict:
  """Unscanned params (`transformer_blocks_i` under each attention) -> scanned
  (`transformer_blocks` with a leading layer axis), the layout of `scan_blocks=True`."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: stack_transformer_blocks(v) for k, v in tree.items() if not _BLOCK.match(k)}
  idx = sorted(int(_BLOCK.match(k).group(1)) for k in tree if _BLOCK.match(k))
  if idx:
    out["transformer_blocks"] = jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *[tree[f"transformer_blocks_{i}"] for i in idx])
  return out


def unstack_transformer_blocks(tree: Mapping) -> dict:
  """The inverse of `stack_transformer_blocks`."""
  if not isinstance(tree, Mapping):
    return tree
  out = {k: unstack_transformer_blocks(v) for k, v in tree.items() if k != "transformer_blocks"}
  if "transformer_blocks" in tree:
    stacked = tree["transformer_blocks"]
    depth = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(depth):
      out[f"transformer_blocks_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  return out


# ----------------------------------------------------------------------------------------------
# FLOPs.

def _valid_taps(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
  """Kernel taps that land inside the input, summed over the output positions of one axis."""
  out = (size + pad[0] + pad[1] - kernel) // stride + 1
  return sum(sum(0 <= o * stride - pad[0] + j < size for j in range(kernel)) for o in range(out))


@functools.lru_cache(maxsize=64)
def flops_per_example(model: UNet, height: Optional[int] = None, width: Optional[int] = None,
                      text_length: int = 77) -> int:
  """FLOPs of one forward (2 per multiply-add of every Dense, Conv and attention product).

  Counted by tracing the module abstractly (`jax.eval_shape`, nothing is computed) with a method
  interceptor that reads each layer's operand shapes, so the count follows the architecture
  exactly. Convolutions count the taps that land inside the input (zero padding excluded, as
  XLA counts them: at 64x64 latents that is 3% under the padded k*k count). Norms, activations
  and the softmax are not counted (XLA's cost analysis of the CPU forward is within a few
  percent above ours for realistic widths; tested).
  """
  plain = model.clone(remat="none", scan_blocks=False)
  args, kwargs = plain.dummy_inputs(1, height, width, text_length)
  total = [0]

  def count(next_fun, fargs, fkwargs, context):
    out = next_fun(*fargs, **fkwargs)
    mod = context.module
    if context.method_name != "__call__":
      return out
    if isinstance(mod, nn.Dense):
      total[0] += 2 * math.prod(out.shape[:-1]) * fargs[0].shape[-1] * mod.features
    elif isinstance(mod, nn.Conv):
      taps = math.prod(_valid_taps(n, k, s, pad) for n, k, s, pad in zip(
          fargs[0].shape[1:3], mod.kernel_size, mod.strides or (1, 1), mod.padding))
      total[0] += 2 * math.prod(out.shape[:-3]) * taps * fargs[0].shape[-1] * mod.features
    elif isinstance(mod, Attention):
      lq = fargs[0].shape[1]
      ctx = fargs[1] if len(fargs) > 1 and fargs[1] is not None else fargs[0]
      total[0] += 4 * lq * ctx.shape[1] * mod.heads * mod.head_dim
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(functools.partial(plain.init, **kwargs), jax.random.PRNGKey(0), *args)
  return int(total[0])
