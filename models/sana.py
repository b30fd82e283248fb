"""SANA (Xie et al., 2024) as diffusers' `SanaTransformer2DModel`, in Flax Linen, NHWC.

    model = Sana(num_attention_heads=70, attention_head_dim=32, num_layers=20)   # SANA 1600M
    out = model.apply(variables, x, timestep, encoder_hidden_states)   # (B, H, W, C) -> same
    out = model.apply(variables, x, t, text, encoder_attention_mask=mask)   # mask (B, L) 1 = keep
    out, feats = model.apply(variables, x, t, text, return_features=(9, -1))  # feats[i]: (B, N, D)

Math (identical to diffusers for every supported config, checked by tests/test_sana.py), with
D = heads * head_dim and N = (H / p) * (W / p) tokens:
- patch embed: a p x p / stride p conv to D, flattened row-major; plus the fixed 2D sin-cos
  position embedding of `models.dit.sincos_pos_embed` (base `sample_size // p`, divided by
  `interpolation_scale`) iff `interpolation_scale` is set (diffusers: `None` = no position
  embedding, as in SANA's released configs);
- time (AdaLayerNormSingle): e = MLP(sinusoid(t, 256, flip_sin_to_cos, shift 0)), with
  MLP = Linear -> SiLU -> Linear; SANA-Sprint (`guidance_embeds=True`) adds
  MLP'(sinusoid(guidance)) to e (the last Linear of MLP' zero-initialised, so a fresh guidance
  embedding adds nothing: `params_from` gives a student a teacher's weights without one, and it
  starts as that teacher at every w). The six block modulations are Linear(SiLU(e)) (B, 6D);
- caption: `caption_projection` (Linear -> tanh-GELU -> Linear, caption_channels -> D), then
  `caption_norm`, an RMSNorm (eps 1e-5) with a learned scale;
- each block: (shift, scale, gate)_{msa, mlp} = table (6, D) + modulation;
    h += gate_msa * LinAttn(LN(h) * (1 + scale_msa) + shift_msa)
    h += CrossAttn(h, caption, mask)                       (no norm, no gate: as diffusers)
    h += gate_mlp * GLUMBConv(LN2(h) * (1 + scale_mlp) + shift_mlp)
  with LN a non-affine LayerNorm (eps `norm_eps`), LN2 the same with an affine iff
  `norm_elementwise_affine`;
  LinAttn is ReLU linear attention per head, in (at least) float32:
    out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + 1e-15),  q, k = ReLU(.)
  computed as (V K^T) Q, linear in N (`relu_linear_attention`);
  CrossAttn is softmax attention over the caption tokens (scale 1/sqrt(head_dim)); the mask
  becomes the additive bias (1 - mask) * -10000, as diffusers does;
  GLUMBConv on the (H/p, W/p) token grid: 1x1 conv to 2 * hidden (hidden = int(mlp_ratio * D)),
  SiLU, depthwise 3x3 conv, split into (a, g), a * SiLU(g), 1x1 conv back to D (no bias);
- QK-norm (`qk_norm`): "rms_norm_across_heads" (RMSNorm, eps 1e-5, learned scale over all heads
  at once, SANA 1.5) or "layer_norm_across_heads" (affine LayerNorm, eps 1e-5) on q and k of
  both attentions, before the head split (other diffusers values do not run in SANA's
  processors and raise);
- output: (shift, scale) = table (2, D) + e; LN(h, eps 1e-6) * (1 + scale) + shift; Linear to
  p * p * out_channels; unpatchify (token features ordered (p_row, p_col, c)).

Units, as diffusers' transformer (not its pipelines): `timestep` in the scheduler's units
(SANA's flow matching: sigma * 1000); `timestep_scale` and `guidance_embeds_scale` are kept in
the config for export but, as in diffusers, applied by the pipeline, not here. `guidance` is
required iff `guidance_embeds` (diffusers fails otherwise; we raise a ValueError). The mask is
(B, L) with 1 = keep (bool or float); diffusers' pre-made 3D biases are not accepted. `dropout`
is kept for export; the forward is diffusers' eval-mode forward (no dropout). The self-attention
mask of diffusers' forward is ignored there (linear attention takes none) and absent here.

Execution fields: `dtype` (compute; linear attention, softmax and norms run in at least
float32), `param_dtype`, `remat` (policy name in `models.dit.REMAT_POLICIES`, per block).
Every parameter carries logical axis names (embed, mlp, heads, norm, conv_in, conv_out; None
on small axes such as the 256 time frequencies).

Parameter tree = the torch module tree (`transformer_blocks.3.attn1.to_out.0` is
`transformer_blocks_3/attn1/to_out_0`; kernels/scales are torch's weights), so
`models.convert.sana` derives its key table from the tree: `patch_embed/proj`,
`time_embed/{emb/timestep_embedder | timestep_embedder, guidance_embedder}/{linear_1,linear_2}`
and `time_embed/linear`, `caption_projection/{linear_1,linear_2}`, `caption_norm`,
`transformer_blocks_{i}/{scale_shift_table, attn1, attn2/{to_q,to_k,to_v,to_out_0[,norm_q,
norm_k]}, [norm2], ff/{conv_inverted,conv_depth,conv_point}}`, `scale_shift_table`, `proj_out`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models import dit
from models.dit import (REMAT_POLICIES, AffineNorm, TimestepEmbedding, layer_norm, rms_norm,
                        sincos_pos_embed, unpatchify)
from models.registry import register_model

Array = jax.Array
Dtype = Any

TIME_FREQ_DIM = 256  # diffusers' Timesteps(num_channels=256, downscale_freq_shift=0)
BLOCK_PREFIX = "transformer_blocks"
QK_NORMS = ("rms_norm_across_heads", "layer_norm_across_heads")
LINEAR_ATTENTION_EPS = 1e-15
MASK_BIAS = -10000.0  # diffusers' additive bias for a masked caption token


def _upcast_dtype(dtype) -> Any:
  return jnp.promote_types(dtype, jnp.float32)


def _init(kind: str, scale: float = 0.02):
  return {
      "xavier": nn.initializers.xavier_uniform(),
      "lecun": nn.initializers.lecun_normal(),
      "normal": nn.initializers.normal(scale),
      "zeros": nn.initializers.zeros_init(),
      "ones": nn.initializers.ones_init(),
  }[kind]


def dense(features: int, axes: tuple, name: str, dtype: Dtype, param_dtype: Dtype, *,
          use_bias: bool = True, init: str = "xavier") -> nn.Dense:
  """A Linear layer with logical axes `axes` on the kernel and `axes[-1:]` on the bias."""
  return nn.Dense(
      features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_init(init), axes),
      bias_init=nn.with_logical_partitioning(_init("zeros"), axes[-1:]))


def conv2d(features: int, kernel: int, axes: tuple, name: str, dtype: Dtype, param_dtype: Dtype,
           *, groups: int = 1, use_bias: bool = True, strides: int = 1) -> nn.Conv:
  """A torch-style Conv2d (padding kernel // 2, `groups` = feature_group_count), NHWC."""
  pad = kernel // 2
  return nn.Conv(
      features, (kernel, kernel), strides=(strides, strides), padding=((pad, pad), (pad, pad)),
      feature_group_count=groups, use_bias=use_bias, name=name, dtype=dtype,
      param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_init("lecun"), (None, None) + tuple(axes)),
      bias_init=nn.with_logical_partitioning(_init("zeros"), tuple(axes)[-1:]))


def timestep_embedding(t: Array, dim: int = TIME_FREQ_DIM) -> Array:
  """diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: (B,) -> (B, dim).

  [cos(t f_i), sin(t f_i)] with f_i = 10000^(-i / (dim/2)) (`models.dit.timestep_embedding` with
  shift 0), in at least float32 (float64 under x64, so finite differences in t are exact).
  """
  return dit.timestep_embedding(t, dim, downscale_freq_shift=0.0)


def relu_linear_attention(q: Array, k: Array, v: Array, eps: float = LINEAR_ATTENTION_EPS) -> Array:
  """ReLU linear attention over (B, N, H, D) arrays (q, k already non-negative): (B, N, H, D).

      out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps)

  computed as diffusers does, (V' K^T) Q with V' = V plus a row of ones (its last row is the
  denominator), so cost and memory are linear in N. Runs in at least float32.
  """
  dt = _upcast_dtype(q.dtype)
  q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
  v1 = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), dt)], axis=-1)
  kv = jnp.einsum("bmhe,bmhd->bhed", v1, k)          # (B, H, D + 1, D)
  out = jnp.einsum("bhed,bnhd->bnhe", kv, q)         # (B, N, H, D + 1)
  return out[..., :-1] / (out[..., -1:] + eps)


class RMSNorm(nn.Module):
  """diffusers' RMSNorm over the last axis (learned scale, optional bias), in >= float32."""
  eps: float = 1e-5
  use_bias: bool = False
  axis_name: Optional[str] = "norm"
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(_init("ones"), (self.axis_name,)),
                       (d,), self.param_dtype)
    y = rms_norm(x.astype(_upcast_dtype(x.dtype)), self.eps) * jnp.asarray(scale)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(_init("zeros"), (self.axis_name,)),
                        (d,), self.param_dtype)
      y = y + jnp.asarray(bias)
    return y.astype(x.dtype)


def _qk_norm(kind: Optional[str], name: str, param_dtype: Dtype):
  """A callable applying the q/k norm `kind`, registered under `name` (None: identity)."""
  if kind is None:
    return lambda x: x
  return QKNorm(kind, param_dtype, name=name)


class QKNorm(nn.Module):
  """The norm of q or k across all heads (diffusers' `*_norm_across_heads`, eps 1e-5)."""
  kind: str
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    dt = _upcast_dtype(x.dtype)
    scale = self.param("scale", nn.with_logical_partitioning(_init("ones"), ("heads",)), (d,),
                       self.param_dtype)
    if self.kind == "rms_norm_across_heads":
      return (rms_norm(x.astype(dt), 1e-5) * jnp.asarray(scale)).astype(x.dtype)
    bias = self.param("bias", nn.with_logical_partitioning(_init("zeros"), ("heads",)), (d,),
                      self.param_dtype)
    return (layer_norm(x.astype(dt), 1e-5) * jnp.asarray(scale) + jnp.asarray(bias)).astype(
        x.dtype)


class LinearSelfAttention(nn.Module):
  """attn1: q, k, v projections, optional QK-norm, ReLU linear attention, to_out."""
  dim: int
  heads: int
  head_dim: int
  use_bias: bool = False
  qk_norm: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, ("embed", "heads"), "to_q", use_bias=self.use_bias, **kw)(x)
    k = dense(inner, ("embed", "heads"), "to_k", use_bias=self.use_bias, **kw)(x)
    v = dense(inner, ("embed", "heads"), "to_v", use_bias=self.use_bias, **kw)(x)
    q = _qk_norm(self.qk_norm, "norm_q", self.param_dtype)(q)
    k = _qk_norm(self.qk_norm, "norm_k", self.param_dtype)(k)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    o = relu_linear_attention(jax.nn.relu(split(q)), jax.nn.relu(split(k)), split(v))
    o = o.astype(self.dtype).reshape(x.shape[:2] + (inner,))
    return dense(self.dim, ("heads", "embed"), "to_out_0", **kw)(o)


class CrossAttention(nn.Module):
  """attn2: softmax attention of the image tokens to the caption tokens (additive mask bias)."""
  dim: int
  heads: int
  head_dim: int
  qk_norm: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, bias: Optional[Array]) -> Array:
    inner = self.heads * self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = dense(inner, ("embed", "heads"), "to_q", **kw)(x)
    k = dense(inner, ("embed", "heads"), "to_k", **kw)(context)
    v = dense(inner, ("embed", "heads"), "to_v", **kw)(context)
    q = _qk_norm(self.qk_norm, "norm_q", self.param_dtype)(q)
    k = _qk_norm(self.qk_norm, "norm_k", self.param_dtype)(k)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    o = dit.attend_heads(split(q), split(k), split(v), "xla",
                         bias=None if bias is None else bias[:, None, None, :])
    o = o.reshape(x.shape[:2] + (inner,))
    return dense(self.dim, ("heads", "embed"), "to_out_0", **kw)(o)


class GLUMBConv(nn.Module):
  """diffusers' GLUMBConv on NHWC: 1x1 conv, SiLU, depthwise 3x3, SiLU gate, 1x1 conv.

  `norm=True` adds diffusers' RMSNorm (eps 1e-5, scale and bias) after the last conv (DC-AE);
  `residual=True` adds the input back (DC-AE; SANA's blocks add it themselves, gated).
  """
  hidden: int
  out_channels: int
  norm: bool = False
  residual: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h2 = 2 * self.hidden
    h = nn.silu(conv2d(h2, 1, ("embed", "mlp"), "conv_inverted", **kw)(x))
    h = conv2d(h2, 3, (None, "mlp"), "conv_depth", groups=h2, **kw)(h)
    h, gate = jnp.split(h, 2, axis=-1)
    h = conv2d(self.out_channels, 1, ("mlp", "embed"), "conv_point", use_bias=False, **kw)(
        h * nn.silu(gate))
    if self.norm:
      h = RMSNorm(1e-5, use_bias=True, param_dtype=self.param_dtype, name="norm")(h)
    return h + x if self.residual else h


class SanaBlock(nn.Module):
  """One SANA block: `(h, mods, caption, bias) -> h` on (B, N, D) tokens of a (gh, gw) grid."""
  dim: int
  heads: int
  head_dim: int
  cross_heads: int
  cross_head_dim: int
  grid: tuple[int, int]
  mlp_hidden: int
  attention_bias: bool = False
  norm_eps: float = 1e-6
  norm_elementwise_affine: bool = False
  qk_norm: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mods: Array, caption: Array, bias: Optional[Array]) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    table = self.param(
        "scale_shift_table",
        nn.with_logical_partitioning(_init("normal", self.dim**-0.5), (None, "embed")),
        (6, self.dim), self.param_dtype)
    m = jnp.asarray(table, mods.dtype)[None] + mods.reshape(mods.shape[0], 6, self.dim)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        m[:, i:i + 1].astype(h.dtype) for i in range(6))

    x = layer_norm(h, self.norm_eps) * (1 + scale_msa) + shift_msa
    h = h + gate_msa * LinearSelfAttention(self.dim, self.heads, self.head_dim,
                                           self.attention_bias, self.qk_norm, name="attn1",
                                           **kw)(x)
    h = h + CrossAttention(self.dim, self.cross_heads, self.cross_head_dim, self.qk_norm,
                           name="attn2", **kw)(h, caption, bias)
    x = AffineNorm("layer", self.norm_eps, self.norm_elementwise_affine, self.param_dtype,
                   name="norm2")(h)
    x = x * (1 + scale_mlp) + shift_mlp
    gh, gw = self.grid
    ff = GLUMBConv(self.mlp_hidden, self.dim, name="ff", **kw)(
        x.reshape(x.shape[0], gh, gw, self.dim))
    return h + gate_mlp * ff.reshape(h.shape)


class TimestepGuidanceEmbedding(nn.Module):
  """`time_embed`: AdaLayerNormSingle, or SANA-Sprint's combined timestep + guidance embedding.

  Returns (modulations (B, 6D), embedded timestep e (B, D)).
  """
  dim: int
  guidance_embeds: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, guidance: Optional[Array]) -> tuple[Array, Array]:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    t_freq = timestep_embedding(t).astype(self.dtype)
    if self.guidance_embeds:
      e = TimestepEmbedding(self.dim, name="timestep_embedder", **kw)(t_freq)
      g_freq = timestep_embedding(guidance).astype(self.dtype)
      e = e + TimestepEmbedding(self.dim, zero_init_out=True, name="guidance_embedder",
                                **kw)(g_freq)
    else:
      e = _SizeFreeEmbedding(self.dim, name="emb", **kw)(t_freq)
    mods = dense(6 * self.dim, ("embed", "mlp"), "linear", **kw)(nn.silu(e))
    return mods, e


class _SizeFreeEmbedding(nn.Module):
  """PixArt-alpha's combined timestep/size embedding without size conditions (SANA's case)."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_freq: Array) -> Array:
    return TimestepEmbedding(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                             name="timestep_embedder")(t_freq)


class CaptionProjection(nn.Module):
  """PixArt-alpha's text projection: Linear -> tanh-GELU -> Linear."""
  dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.gelu(dense(self.dim, (None, "mlp"), "linear_1", **kw)(c), approximate=True)
    return dense(self.dim, ("mlp", "embed"), "linear_2", **kw)(h)


class PatchEmbed(nn.Module):
  """p x p / stride p conv to D, flattened; plus the sin-cos position embedding if configured."""
  dim: int
  patch_size: int
  base_size: int
  interpolation_scale: Optional[float] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    p = self.patch_size
    h = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj",
                kernel_init=nn.with_logical_partitioning(
                    _init("xavier"), (None, None, "conv_in", "embed")),
                bias_init=nn.with_logical_partitioning(_init("zeros"), ("embed",)))(x)
    b, gh, gw, _ = h.shape
    h = h.reshape(b, gh * gw, self.dim)
    if self.interpolation_scale is not None:
      pe = sincos_pos_embed(self.dim, gh, gw, self.base_size, self.interpolation_scale)
      h = (h.astype(_upcast_dtype(h.dtype)) + pe[None]).astype(h.dtype)
    return h


def _block_class(remat: str):
  if remat == "none":
    return SanaBlock
  return nn.remat(SanaBlock, policy=REMAT_POLICIES.get(remat)())


@register_model("sana")
class Sana(nn.Module):
  """diffusers' SanaTransformer2DModel (field names and defaults follow its config), NHWC."""

  in_channels: int = 32
  out_channels: Optional[int] = 32
  num_attention_heads: int = 70
  attention_head_dim: int = 32
  num_layers: int = 20
  num_cross_attention_heads: int = 20
  cross_attention_head_dim: int = 112
  cross_attention_dim: int = 2240
  caption_channels: int = 2304
  mlp_ratio: float = 2.5
  dropout: float = 0.0
  attention_bias: bool = False
  sample_size: int = 32
  patch_size: int = 1
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-6
  interpolation_scale: Optional[float] = None
  guidance_embeds: bool = False
  guidance_embeds_scale: float = 0.1
  qk_norm: Optional[str] = None
  timestep_scale: float = 1.0
  # Execution.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"

  diffusers_class = "SanaTransformer2DModel"
  # How a student of this model embeds the CFG scale w (the objectives' `guidance_embed`).
  GUIDANCE_EMBED = {"guidance_embeds": True}

  def guidance_inputs(self, w) -> dict:
    """The call keywords for CFG scale w: `guidance = w * guidance_embeds_scale`, as diffusers'
    SANA-Sprint pipeline scales it before the transformer (cfg_embed_scale 0.1)."""
    return {"guidance": jnp.asarray(w, jnp.float32) * self.guidance_embeds_scale}

  def params_from(self, params: Mapping[str, Any], source_config: Mapping[str, Any]) -> dict:
    """The weights of a SANA of config `source_config` laid out for this one (a student
    initialised from a teacher): adding the guidance embedding moves the timestep MLP from
    AdaLayerNormSingle's `time_embed/emb/timestep_embedder` to `time_embed/timestep_embedder`
    (diffusers' SanaCombinedTimestepGuidanceEmbeddings, as SANA-Sprint's student); the new
    `guidance_embedder` is not in them (its fresh init adds nothing). Other layouts are
    returned as they are."""
    time_embed = params.get("time_embed", {})
    adds = self.guidance_embeds and not source_config.get("guidance_embeds")
    if not adds or "emb" not in time_embed:
      return dict(params)
    time_embed = dict(time_embed)
    emb = dict(time_embed.pop("emb"))
    time_embed["timestep_embedder"] = emb.pop("timestep_embedder")
    if emb:   # nothing else lives there in SANA; kept so that a strict overlay names it
      time_embed["emb"] = emb
    return {**params, "time_embed": time_embed}

  # -- derived sizes ---------------------------------------------------------------------------
  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    return self.out_channels or self.in_channels

  @property
  def text_width(self) -> int:
    """The width of the prompt embeddings (`text_embeds`) the network reads."""
    return self.caption_channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.mlp_ratio * self.hidden_size)

  @property
  def cross_inner(self) -> int:
    return self.num_cross_attention_heads * self.cross_attention_head_dim

  def check_config(self) -> None:
    """Raises one ValueError naming the first unsupported config key and value."""
    if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
      raise ValueError(f"SANA qk_norm={self.qk_norm!r} is not supported (supported: None, "
                       f"{', '.join(QK_NORMS)})")
    if self.cross_attention_dim != self.hidden_size:
      raise ValueError(
          f"SANA cross_attention_dim={self.cross_attention_dim!r} is not supported: the caption "
          f"is projected to the hidden size {self.hidden_size}, so it must equal that "
          "(diffusers fails in its forward otherwise)")

  def dummy_inputs(self, batch: int = 1, tokens: int = 1):
    """Positional inputs of the right shapes for `init` / `jax.eval_shape`."""
    s = self.sample_size
    return (jnp.zeros((batch, s, s, self.in_channels), self.dtype), jnp.zeros((batch,)),
            jnp.zeros((batch, tokens, self.caption_channels), self.dtype))

  def dummy_kwargs(self, batch: int = 1) -> dict:
    """Keyword inputs `init` needs besides `dummy_inputs` (the guidance, when embedded)."""
    return {"guidance": jnp.zeros((batch,))} if self.guidance_embeds else {}

  def flops_per_example(self, height: Optional[int] = None, width: Optional[int] = None,
                        tokens: int = 300) -> int:
    return flops_per_example(self, height, width, tokens)

  def _feature_indices(self, return_features: Sequence[int]) -> tuple[int, ...]:
    out = []
    for i in return_features:
      if not -self.num_layers <= int(i) < self.num_layers:
        raise ValueError(f"return_features index {i} out of range for {self.num_layers} blocks")
      out.append(int(i) % self.num_layers)
    return tuple(out)

  @nn.compact
  def __call__(self, x, timestep, encoder_hidden_states, *, encoder_attention_mask=None,
               guidance=None, return_features: Sequence[int] = ()):
    """x (B, H, W, in_channels) -> (B, H, W, out_channels) [, {block: (B, N, D)}]."""
    self.check_config()
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"SANA expects (B, H, W, {self.in_channels}) inputs, got {x.shape}")
    batch, height, width, _ = x.shape
    p, dim, out_ch = self.patch_size, self.hidden_size, self.output_channels
    if height % p or width % p:
      raise ValueError(f"image size {(height, width)} is not divisible by patch size {p}")
    gh, gw = height // p, width // p
    if self.guidance_embeds and guidance is None:
      raise ValueError("this SANA has guidance_embeds=True: pass guidance=")
    if guidance is not None and not self.guidance_embeds:
      raise ValueError("guidance given but the SANA has guidance_embeds=False")
    features = self._feature_indices(return_features)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    h = PatchEmbed(dim, p, self.sample_size // p, self.interpolation_scale, name="patch_embed",
                   **kw)(x.astype(self.dtype))
    t = jnp.broadcast_to(jnp.asarray(timestep).reshape(-1), (batch,))
    if guidance is not None:
      guidance = jnp.broadcast_to(jnp.asarray(guidance).reshape(-1), (batch,))
    mods, emb = TimestepGuidanceEmbedding(dim, self.guidance_embeds, name="time_embed", **kw)(
        t, guidance)

    caption = CaptionProjection(dim, name="caption_projection", **kw)(
        jnp.asarray(encoder_hidden_states, self.dtype))
    caption = RMSNorm(1e-5, param_dtype=self.param_dtype, name="caption_norm")(caption)
    bias = None
    if encoder_attention_mask is not None:
      mask = jnp.asarray(encoder_attention_mask)
      if mask.shape != caption.shape[:2]:
        raise ValueError(f"encoder_attention_mask must be (B, L) = {caption.shape[:2]}, got "
                         f"{mask.shape}")
      bias = (1 - mask.astype(_upcast_dtype(self.dtype))) * MASK_BIAS

    block_cls = _block_class(self.remat)
    feats = {}
    for i in range(self.num_layers):
      h = block_cls(dim, self.num_attention_heads, self.attention_head_dim,
                    self.num_cross_attention_heads, self.cross_attention_head_dim, (gh, gw),
                    self.mlp_hidden, self.attention_bias, self.norm_eps,
                    self.norm_elementwise_affine, self.qk_norm, name=f"{BLOCK_PREFIX}_{i}",
                    **kw)(h, mods, caption, bias)
      if i in features:
        feats[i] = h

    table = self.param("scale_shift_table",
                       nn.with_logical_partitioning(_init("normal", dim**-0.5), (None, "embed")),
                       (2, dim), self.param_dtype)
    ss = jnp.asarray(table, emb.dtype)[None] + emb[:, None]
    shift, scale = ss[:, 0:1].astype(h.dtype), ss[:, 1:2].astype(h.dtype)
    h = layer_norm(h, 1e-6) * (1 + scale) + shift
    h = dense(p * p * out_ch, ("embed", "conv_out"), "proj_out", **kw)(h)
    out = unpatchify(h, gh, gw, p, out_ch)
    if return_features:
      return out, {i: feats[j] for i, j in zip(return_features, features)}
    return out


# ----------------------------------------------------------------------------------------------
# FLOPs.

def flops_per_example(model: Sana, height: Optional[int] = None, width: Optional[int] = None,
                      tokens: int = 300) -> int:
  """Forward FLOPs per example (2 per multiply-add) for a `height` x `width` latent, `tokens`
  caption tokens (SANA's pipelines pad captions to 300).

  Counts the patch embed, the time (and guidance) MLPs and modulation, the caption projection,
  every block's q/k/v/out projections of both attentions, the linear attention's two (D+1) x D
  products per head and token, the cross attention's QK^T and PV, the GLUMBConv's three convs,
  and the output projection. Elementwise work (norms, activations, softmax, biases, the
  depthwise conv's adds aside) is left out: XLA's `cost_analysis()` is a few percent higher.
  """
  height = height or model.sample_size
  width = width or model.sample_size
  p, d = model.patch_size, model.hidden_size
  n = (height // p) * (width // p)
  hd, ci, hid = model.attention_head_dim, model.cross_inner, model.mlp_hidden
  time_mlp = 2 * (TIME_FREQ_DIM * d + d * d)
  embed = (2 * n * p * p * model.in_channels * d + time_mlp * (1 + int(model.guidance_embeds))
           + 2 * d * 6 * d + 2 * tokens * (model.caption_channels * d + d * d))
  self_attn = 4 * 2 * n * d * d + 2 * 2 * n * d * (hd + 1)
  cross = (2 * 2 * n * d * ci + 2 * 2 * tokens * model.cross_attention_dim * ci
           + 2 * 2 * n * tokens * ci)
  ff = 2 * n * d * 2 * hid + 2 * n * 2 * hid * 9 + 2 * n * hid * d
  final = 2 * n * d * p * p * model.output_channels
  return int(embed + model.num_layers * (self_attn + cross + ff) + final)
