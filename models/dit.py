"""DiT (Peebles & Xie, 2023) as diffusers' `DiTTransformer2DModel`, in Flax Linen, NHWC.

    model = DiT(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32,
                out_channels=8)                                    # DiT-XL/2 (learn_sigma)
    out = model.apply(variables, x, timestep, class_labels)        # x (B, H, W, C) -> (B, H, W, 2C)
    out, feats = model.apply(variables, x, t, y, return_features=(13, 27))   # feats[i]: (B, L, D)

Math (identical to diffusers with the default fields, checked by tests/test_dit_convert.py):
- patch embed: a p x p / stride p conv to D = heads * head_dim, flattened row-major, plus the
  fixed 2D sin-cos position embedding (first D/2 channels encode the column, the rest the row;
  grid scaled to `sample_size // patch_size` as in diffusers, so other resolutions interpolate);
- `num_layers` blocks. Each block has its *own* conditioning embedder (diffusers' layout:
  `norm1.emb` = sinusoid(t, 256, flip_sin_to_cos, shift 1) -> Linear -> SiLU -> Linear, plus a
  class table with `num_embeds_ada_norm + 1` rows, the last being the null class), then adaLN-Zero:
  `Linear(SiLU(c)) -> shift/scale/gate` for attention and MLP, LayerNorm(eps 1e-6, no affine)
  before attention, `norm3` (eps `norm_eps`, affine iff `norm_elementwise_affine`) before the
  tanh-GELU MLP (ratio 4);
- output: `proj_out_1(SiLU(c_0))` -> shift, scale (c_0 = block 0's conditioning, as diffusers),
  LayerNorm(eps 1e-6), `proj_out_2` to p*p*out_channels, unpatchify. `out_channels` defaults to
  `2 * in_channels` when `learn_sigma`, else `in_channels`.

Label dropout (`class_dropout_prob`, train only, rng "dropout") replaces labels by the null class
once per example for the whole network (diffusers draws independently inside every block).
`class_labels=None` means the null class everywhere.

Extras for newer DiTs and students (all off by default, so the default is diffusers' DiT):
- `norm="rms"`: RMSNorm instead of LayerNorm for the three non-affine norms;
- `qk_norm=True`: RMSNorm (learned scale over head_dim, eps 1e-6) on q and k per head;
- `rope=True`: 2D rotary embedding on q, k (first half of head_dim rotates with the row, second
  half with the column, rotate-half pairing, base `rope_theta`). It is independent of
  `pos_embed` ("sincos" | "none"): the recommended setting for new students is `rope=True,
  pos_embed="none"`; `rope=True` with sincos kept is allowed (e.g. fine-tuning a DiT teacher);
- `mlp="swiglu"`: SiLU-gated MLP (`gate`, `up`, `down`) with hidden `2/3 * mlp_ratio * D`
  rounded up to a multiple of 8 (same parameter count as the GELU MLP);
- `guidance_embed=True`: an embedding of the guidance scale `w * guidance_embed_scale`
  (sinusoid -> Linear -> SiLU -> Linear, last layer zero-initialised) added to the conditioning
  of every block (and so to the final layer's); `timestep2_embed=True`: the same for a second
  time input (same units as `timestep`). A missing `guidance` / `timestep2` counts as 0, so a
  fresh model computes exactly what the plain model does.
- `guidance_adapter=H` (> 0): AGD's additive adapter in every block (after its MLP residual):
  h += Dense(D)(silu(Dense(H)(silu(c)))) broadcast over the tokens, with c the block's
  conditioning (time + class + guidance embeddings) and the last layer zero-initialised, so a
  fresh adapter leaves the model unchanged (`transformer_blocks_i/guidance_adapter`; not part
  of diffusers' DiT, so a model with adapters does not export).
- `return_features`: block indices (negative ones count from the end) whose outputs (B, L, D)
  are returned beside the output in a dict keyed by the requested indices (for adversarial
  heads). With `scan_blocks` this stacks every block's output first (memory L x activations)
  and then picks the requested ones.

Execution fields: `dtype` (compute), `param_dtype`, `attention` (implementation name, see
`attend_heads`), `remat` (policy name in `REMAT_POLICIES`, applied per block), `scan_blocks`
(`nn.scan` over the blocks: parameters stacked on a leading "layers" axis under
`transformer_blocks`; `stack_block_params` / `unstack_block_params` convert between layouts) and
`scan_unroll` (blocks per iteration of that loop: 1 compiles one block; `num_layers` unrolls the
whole stack in the stacked layout; a remainder runs unrolled after the loop).
Every parameter carries logical axis names (embed, mlp, heads, norm, conv_in, conv_out, layers;
`None` on small axes such as the 256 time frequencies and the class rows).

Parameter tree: `patch_embed`, `transformer_blocks_{i}` (or stacked `transformer_blocks`) with
`norm1/{emb/{timestep_embedder/linear_1,linear_2; class_embedder/embedding_table}, linear}`,
`attn/{to_q,to_k,to_v,to_out[,norm_q,norm_k]}`, `[norm3]`, `mlp/{fc1,fc2 | gate,up,down}`; then
`[guidance_embedder]`, `[timestep2_embedder]`, `proj_out_1`, `proj_out_2` (so LoRA patterns such
as r"attn|mlp" work). Fresh init follows DiT: xavier-uniform linears, N(0, 0.02) embeddings and
time MLPs, zero adaLN modulations and final layer (a fresh model outputs zeros).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill.registry import Registry
from models.adapters import GuidanceAdapter
from models.registry import register_model

Dtype = Any
Array = jax.Array

TIME_FREQ_DIM = 256  # diffusers' Timesteps(num_channels=256) for DiT
BLOCK_PREFIX = "transformer_blocks"


# ----------------------------------------------------------------------------------------------
# Attention seam (the lead wires models.attention here).

def attend_heads(q: Array, k: Array, v: Array, impl: str, bias: Optional[Array] = None) -> Array:
  """Scaled dot-product attention, (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D), by name.

  Dispatches to `models.attention.sharded_attention(q, k, v, impl=impl)` when that module exists;
  otherwise only "xla" (`jax.nn.dot_product_attention`) is available. `bias` (additive logits,
  broadcastable to (B, H, Lq, Lk); e.g. a text padding mask) works with "xla" and "cudnn".
  """
  try:
    from models import attention as attention_lib  # pylint: disable=import-outside-toplevel
  except ImportError:
    attention_lib = None
  kw = {} if bias is None else {"bias": bias}
  if attention_lib is not None and hasattr(attention_lib, "attention"):
    # A kernel under a context mesh (the engine's steps set one) runs per shard in shard_map,
    # built for the mesh's platform (an AOT compile for a TPU topology gets the TPU kernel);
    # shapes the mesh does not divide, and calls outside any mesh, run it unsharded.
    mesh = jax.sharding.get_abstract_mesh()
    mesh = None if mesh.empty else mesh
    _check_heads_divide(q.shape[2], impl, mesh)
    return attention_lib.sharded_attention(q, k, v, impl=impl, mesh=mesh, strict=False, **kw)
  if impl != "xla":
    raise ValueError(f"attention implementation {impl!r} needs models.attention; only 'xla' "
                     "is available without it")
  return jax.nn.dot_product_attention(q, k, v, **kw)


def _check_heads_divide(heads: int, impl: str, mesh) -> None:
  """A kernel splits its heads over the mesh's tensor axis (shard_map needs whole heads per
  device): a head count that axis does not divide stops at the first trace with one line, where
  the kernel would run unsharded on gathered q, k, v (every device computing every head)."""
  if impl == "xla" or mesh is None or "tensor" not in mesh.axis_names:
    return
  n = dict(zip(mesh.axis_names, mesh.axis_sizes))["tensor"]
  if heads % n:
    raise ValueError(f"model.attention={impl!r} runs per shard with the heads split over "
                     f"mesh.tensor={n}, which does not divide {heads} attention heads: set "
                     f"mesh.tensor to a divisor of {heads}, or model.attention='xla'")


# ----------------------------------------------------------------------------------------------
# Registries: remat policies, norms, MLPs.

_NO_REMAT = "no-remat"


def _offload_policy():
  """Saves dots without batch dims, offloaded to pinned host memory where JAX supports it."""
  policies = jax.checkpoint_policies
  if hasattr(policies, "offload_dot_with_no_batch_dims"):
    return policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  return policies.dots_with_no_batch_dims_saveable


REMAT_POLICIES: Registry = Registry("remat policy")
REMAT_POLICIES.add("none", lambda: _NO_REMAT)
REMAT_POLICIES.add("full", lambda: None)  # save nothing: recompute the whole block
REMAT_POLICIES.add("dots_saveable", lambda: jax.checkpoint_policies.dots_saveable)
REMAT_POLICIES.add("dots_with_no_batch_dims_saveable",
                   lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
REMAT_POLICIES.add("offload", _offload_policy)


def _upcast(x: Array) -> Array:
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def layer_norm(x: Array, eps: float) -> Array:
  """Non-affine LayerNorm over the last axis, in at least float32 (torch's biased variance)."""
  x32 = _upcast(x)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: Array, eps: float) -> Array:
  """Non-affine RMSNorm over the last axis, in at least float32."""
  x32 = _upcast(x)
  return (x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)).astype(x.dtype)


NORMS: Registry = Registry("norm")
NORMS.add("layer", layer_norm)
NORMS.add("rms", rms_norm)


# ----------------------------------------------------------------------------------------------
# Fixed embeddings (pure functions).

def timestep_embedding(t: Array, dim: int = TIME_FREQ_DIM, max_period: float = 10_000.0,
                       downscale_freq_shift: float = 1.0, flip_sin_to_cos: bool = True) -> Array:
  """diffusers' `get_timestep_embedding`: (B,) -> (B, dim), [cos, sin] (flipped) or [sin, cos]."""
  half = dim // 2
  t = jnp.asarray(t)
  dtype = jnp.promote_types(t.dtype, jnp.float32)  # float32, or float64 under x64 tests
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32)
  freqs = jnp.exp(jnp.asarray(exponent / np.float32(half - downscale_freq_shift), dtype))
  args = t.astype(dtype)[:, None] * freqs[None, :]
  pair = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  emb = jnp.concatenate(pair, axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.outer(pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed(dim: int, height: int, width: int, base_size: int,
                     interpolation_scale: float = 1.0) -> np.ndarray:
  """diffusers' `get_2d_sincos_pos_embed` on a (height, width) patch grid: (height*width, dim).

  Channels [0, dim/2) encode the column coordinate, [dim/2, dim) the row; the grid is scaled so
  that `base_size` patches span the same range at any resolution.
  """
  if dim % 4:
    raise ValueError(f"sincos position embedding needs dim % 4 == 0, got {dim}")
  grid_h = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
  grid_w = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
  grid_h = grid_h / np.float32(interpolation_scale)
  grid_w = grid_w / np.float32(interpolation_scale)
  cols, rows = np.meshgrid(grid_w, grid_h, indexing="xy")  # (height, width) each
  emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
  return emb.astype(np.float32)


def rope_2d(height: int, width: int, head_dim: int, theta: float = 10_000.0):
  """2D RoPE tables (cos, sin), each (height*width, head_dim), for `apply_rope`.

  The first half of head_dim rotates with the row index, the second half with the column index;
  inside each half, channel i pairs with channel i + head_dim/4 (rotate-half convention).
  """
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got {head_dim}")
  quarter = head_dim // 4
  freqs = 1.0 / theta**(np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  ang_r = np.outer(rows.reshape(-1), freqs)
  ang_c = np.outer(cols.reshape(-1), freqs)
  angles = np.concatenate([ang_r, ang_r, ang_c, ang_c], axis=1)
  return (jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32))


def _rotate_half(u: Array) -> Array:
  a, b = jnp.split(u, 2, axis=-1)
  return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x: Array, rope) -> Array:
  """Rotates (B, L, H, D) queries or keys by the `rope_2d` tables."""
  cos, sin = rope
  xr, xc = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([_rotate_half(xr), _rotate_half(xc)], axis=-1)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------
# Layers.

def _init(kind: str):
  return {
      "xavier": nn.initializers.xavier_uniform(),
      "normal": nn.initializers.normal(0.02),
      "zeros": nn.initializers.zeros_init(),
      "ones": nn.initializers.ones_init(),
  }[kind]


def _dense(features: int, axes: tuple, name: str, dtype, param_dtype, *, init: str = "xavier",
           use_bias: bool = True) -> nn.Dense:
  """A Dense layer; kernel axes `axes`, bias axes `axes[-1:]` (logical names)."""
  return nn.Dense(
      features, use_bias=use_bias, name=name, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_init(init), axes),
      bias_init=nn.with_logical_partitioning(_init("zeros"), axes[-1:]))


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """The static description of one DiT block (hashable; built by `DiT.block_config`)."""
  dim: int
  heads: int
  head_dim: int
  num_classes: int
  attention_bias: bool = True
  dropout: float = 0.0
  gelu_approximate: bool = True
  norm: str = "layer"
  norm_eps: float = 1e-5
  norm_elementwise_affine: bool = False
  qk_norm: bool = False
  mlp: str = "gelu"
  mlp_hidden: int = 0
  attention: str = "xla"
  guidance_adapter: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class TimestepEmbedding(nn.Module):
  """diffusers' TimestepEmbedding: Linear(256 -> D) -> SiLU -> Linear(D -> D)."""
  features: int
  zero_init_out: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_freq: Array) -> Array:
    h = _dense(self.features, (None, "mlp"), "linear_1", self.dtype, self.param_dtype,
               init="normal")(t_freq.astype(self.dtype))
    return _dense(self.features, ("mlp", "embed"), "linear_2", self.dtype, self.param_dtype,
                  init="zeros" if self.zero_init_out else "normal")(nn.silu(h))


class LabelEmbedding(nn.Module):
  """A (num_classes + 1, D) table; row `num_classes` is the null class."""
  num_classes: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: Array) -> Array:
    table = self.param("embedding_table",
                       nn.with_logical_partitioning(_init("normal"), (None, "embed")),
                       (self.num_classes + 1, self.features), self.param_dtype)
    return jnp.take(jnp.asarray(table, self.dtype), labels, axis=0)


class CombinedEmbedding(nn.Module):
  """diffusers' CombinedTimestepLabelEmbeddings: timestep MLP(t_freq) + label table(labels)."""
  features: int
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t_freq: Array, labels: Array) -> Array:
    t_emb = TimestepEmbedding(self.features, dtype=self.dtype, param_dtype=self.param_dtype,
                              name="timestep_embedder")(t_freq)
    y_emb = LabelEmbedding(self.num_classes, self.features, self.dtype, self.param_dtype,
                           name="class_embedder")(labels)
    return t_emb + y_emb


class AdaLNZero(nn.Module):
  """Per-block conditioning and adaLN-Zero modulation: returns (6 chunks of (B, D), c)."""
  cfg: BlockConfig

  @nn.compact
  def __call__(self, t_freq, labels, extra):
    cfg = self.cfg
    c = CombinedEmbedding(cfg.dim, cfg.num_classes, cfg.dtype, cfg.param_dtype, name="emb")(
        t_freq, labels)
    if extra is not None:
      c = c + extra.astype(c.dtype)
    mods = _dense(6 * cfg.dim, ("embed", "mlp"), "linear", cfg.dtype, cfg.param_dtype,
                  init="zeros")(nn.silu(c))
    return jnp.split(mods, 6, axis=-1), c


class HeadRMSNorm(nn.Module):
  """RMSNorm over head_dim with a learned scale (qk-norm)."""
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(_init("ones"), ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    return rms_norm(x, self.eps) * jnp.asarray(scale, x.dtype)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections (diffusers' Attention)."""
  cfg: BlockConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array, rope) -> Array:
    cfg = self.cfg
    inner = cfg.heads * cfg.head_dim
    proj = lambda name: _dense(inner, ("embed", "heads"), name, cfg.dtype, cfg.param_dtype,
                               use_bias=cfg.attention_bias)
    split = lambda t: t.reshape(t.shape[:2] + (cfg.heads, cfg.head_dim))
    q, k, v = (split(proj(n)(x)) for n in ("to_q", "to_k", "to_v"))
    if cfg.qk_norm:
      q = HeadRMSNorm(param_dtype=cfg.param_dtype, name="norm_q")(q)
      k = HeadRMSNorm(param_dtype=cfg.param_dtype, name="norm_k")(k)
    if rope is not None:
      q, k = apply_rope(q, rope), apply_rope(k, rope)
    # Initialisation only needs shapes: plain XLA attention there, so a kernel that exists only
    # on the target platform (splash on TPU, cuDNN on GPU) does not block init on another host.
    impl = "xla" if self.is_initializing() else cfg.attention
    o = attend_heads(q, k, v, impl).reshape(x.shape[:2] + (inner,))
    o = _dense(cfg.dim, ("heads", "embed"), "to_out", cfg.dtype, cfg.param_dtype)(o)
    return nn.Dropout(cfg.dropout)(o, deterministic=self.deterministic)


class GeluMLP(nn.Module):
  """fc1 -> GELU (tanh-approximate unless `gelu_approximate=False`) -> dropout -> fc2."""
  cfg: BlockConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    h = _dense(cfg.mlp_hidden, ("embed", "mlp"), "fc1", cfg.dtype, cfg.param_dtype)(x)
    h = nn.gelu(h, approximate=cfg.gelu_approximate)
    h = nn.Dropout(cfg.dropout)(h, deterministic=self.deterministic)
    return _dense(cfg.dim, ("mlp", "embed"), "fc2", cfg.dtype, cfg.param_dtype)(h)


class SwiGLUMLP(nn.Module):
  """down(SiLU(gate(x)) * up(x))."""
  cfg: BlockConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.cfg
    gate = _dense(cfg.mlp_hidden, ("embed", "mlp"), "gate", cfg.dtype, cfg.param_dtype)(x)
    up = _dense(cfg.mlp_hidden, ("embed", "mlp"), "up", cfg.dtype, cfg.param_dtype)(x)
    h = nn.Dropout(cfg.dropout)(nn.silu(gate) * up, deterministic=self.deterministic)
    return _dense(cfg.dim, ("mlp", "embed"), "down", cfg.dtype, cfg.param_dtype)(h)


MLPS: Registry = Registry("dit mlp")
MLPS.add("gelu", GeluMLP)
MLPS.add("swiglu", SwiGLUMLP)

# Matmuls per token of each MLP kind, in units of dim * hidden (for FLOP counting).
_MLP_MATMULS = {"gelu": 2, "swiglu": 3}


class AffineNorm(nn.Module):
  """`norm3`: LayerNorm/RMSNorm with optional elementwise affine (diffusers' norm3)."""
  kind: str = "layer"
  eps: float = 1e-5
  affine: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = NORMS.get(self.kind)(x, self.eps)
    if self.affine:
      d = x.shape[-1]
      scale = self.param("scale", nn.with_logical_partitioning(_init("ones"), ("norm",)), (d,),
                         self.param_dtype)
      y = y * jnp.asarray(scale, y.dtype)
      if self.kind == "layer":
        bias = self.param("bias", nn.with_logical_partitioning(_init("zeros"), ("norm",)), (d,),
                          self.param_dtype)
        y = y + jnp.asarray(bias, y.dtype)
    return y


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: `(h, t_freq, labels, extra, rope) -> (h, (c, h?))`.

  The second output carries the block's conditioning `c` (block 0's feeds the final layer) and,
  when `collect`, the block's output hidden states (for `return_features` under `nn.scan`).
  """
  cfg: BlockConfig
  deterministic: bool = True
  collect: bool = False

  @nn.compact
  def __call__(self, h, t_freq, labels, extra, rope):
    cfg = self.cfg
    norm = NORMS.get(cfg.norm)
    (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp), c = AdaLNZero(
        cfg, name="norm1")(t_freq, labels, extra)
    x = norm(h, 1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    h = h + gate_msa[:, None] * Attention(cfg, self.deterministic, name="attn")(x, rope)
    x = AffineNorm(cfg.norm, cfg.norm_eps, cfg.norm_elementwise_affine, cfg.param_dtype,
                   name="norm3")(h)
    x = x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    h = h + gate_mlp[:, None] * MLPS.get(cfg.mlp)(cfg, self.deterministic, name="mlp")(x)
    if cfg.guidance_adapter:
      h = h + GuidanceAdapter(cfg.dim, cfg.guidance_adapter, cfg.dtype, cfg.param_dtype,
                              name="guidance_adapter")(c)[:, None, :].astype(h.dtype)
    return h, (c, h if self.collect else None)


def _block_class(remat: str, scan: bool):
  policy = REMAT_POLICIES.get(remat)()
  if isinstance(policy, str) and policy == _NO_REMAT:
    return DiTBlock
  return nn.remat(DiTBlock, policy=policy, prevent_cse=not scan)


# ----------------------------------------------------------------------------------------------
# The model.

@register_model("dit")
class DiT(nn.Module):
  """diffusers' DiTTransformer2DModel (field names follow its config), NHWC; see module doc."""

  num_attention_heads: int = 16
  attention_head_dim: int = 72
  in_channels: int = 4
  out_channels: Optional[int] = None
  learn_sigma: bool = False
  num_layers: int = 28
  dropout: float = 0.0
  attention_bias: bool = True
  sample_size: int = 32
  patch_size: int = 2
  activation_fn: str = "gelu-approximate"  # or "gelu" (exact); used by mlp="gelu"
  num_embeds_ada_norm: int = 1000  # number of classes (the table has one more: the null class)
  norm_elementwise_affine: bool = False
  norm_eps: float = 1e-5
  class_dropout_prob: float = 0.0
  # Extras (off by default).
  norm: str = "layer"
  qk_norm: bool = False
  pos_embed: str = "sincos"
  rope: bool = False
  rope_theta: float = 10_000.0
  mlp: str = "gelu"
  mlp_ratio: float = 4.0
  guidance_embed: bool = False
  guidance_embed_scale: float = 1000.0
  timestep2_embed: bool = False
  guidance_adapter: int = 0    # AGD: per-block adapter hidden width (0: none)
  # Execution.
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "xla"       # gradient passes (models/attention.py)
  # Tangent passes (jax.jvp, the sCM tangent): the objective runs a clone with
  # attention=jvp_attention, or the pair shared_primal_impl(attention, jvp_attention) when the
  # jvp's primal is also differentiated, since a custom_vjp kernel cannot be pushed through
  # jax.jvp.
  jvp_attention: str = "xla"
  remat: str = "none"
  scan_blocks: bool = False
  scan_unroll: int = 1         # with scan_blocks: blocks per loop iteration

  diffusers_class = "DiTTransformer2DModel"
  # How a student of this model embeds the CFG scale w (the objectives' `guidance_embed`).
  GUIDANCE_EMBED = {"guidance_embed": True}

  def guidance_inputs(self, w) -> dict:
    """The call keywords for CFG scale w (scaled by `guidance_embed_scale` inside)."""
    return {"guidance": w}

  # -- derived sizes ---------------------------------------------------------------------------
  @property
  def hidden_size(self) -> int:
    return self.num_attention_heads * self.attention_head_dim

  @property
  def output_channels(self) -> int:
    if self.out_channels is not None:
      return self.out_channels
    return 2 * self.in_channels if self.learn_sigma else self.in_channels

  @property
  def mlp_hidden(self) -> int:
    hidden = int(self.hidden_size * self.mlp_ratio)
    if self.mlp == "swiglu":
      hidden = -(-int(2 * hidden / 3) // 8) * 8
    return hidden

  def block_config(self) -> BlockConfig:
    if self.activation_fn not in ("gelu-approximate", "gelu"):
      raise ValueError(f"unsupported DiT activation_fn {self.activation_fn!r}")
    return BlockConfig(
        dim=self.hidden_size, heads=self.num_attention_heads, head_dim=self.attention_head_dim,
        num_classes=self.num_embeds_ada_norm, attention_bias=self.attention_bias,
        dropout=self.dropout, gelu_approximate=self.activation_fn == "gelu-approximate",
        norm=self.norm, norm_eps=self.norm_eps,
        norm_elementwise_affine=self.norm_elementwise_affine, qk_norm=self.qk_norm,
        mlp=self.mlp, mlp_hidden=self.mlp_hidden, attention=self.attention,
        guidance_adapter=self.guidance_adapter, dtype=self.dtype, param_dtype=self.param_dtype)

  def dummy_inputs(self, batch: int = 1):
    """Inputs of the right shapes for `init` / `jax.eval_shape`."""
    s = self.sample_size
    return (jnp.zeros((batch, s, s, self.in_channels), self.dtype), jnp.zeros((batch,)),
            jnp.zeros((batch,), jnp.int32))

  def scan_layout(self, params: dict, scan: bool) -> dict:
    """`params` of this module in the layout of `scan_blocks=scan` (stacked or per block)."""
    if scan == self.scan_blocks:
      return params
    relayout = stack_block_params if scan else unstack_block_params
    return relayout(params, self.num_layers)

  def flops_per_example(self, height: Optional[int] = None, width: Optional[int] = None) -> int:
    return flops_per_example(self, height, width)

  # -- pieces ----------------------------------------------------------------------------------
  def _scalar_embedding(self, name: str, values, batch: int, scale: float):
    v = jnp.broadcast_to(jnp.asarray(0.0 if values is None else values, jnp.float32).reshape(-1),
                         (batch,))
    emb = TimestepEmbedding(self.hidden_size, zero_init_out=True, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)
    return emb(timestep_embedding(v * scale))

  def _labels(self, class_labels, batch: int, train: bool):
    null = self.num_embeds_ada_norm
    if class_labels is None:
      return jnp.full((batch,), null, jnp.int32)
    labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32).reshape(-1), (batch,))
    if train and self.class_dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("dropout"), (batch,)) < self.class_dropout_prob
      labels = jnp.where(drop, null, labels)
    return labels

  def _feature_indices(self, return_features: Sequence[int]) -> tuple[int, ...]:
    out = []
    for i in return_features:
      if not -self.num_layers <= int(i) < self.num_layers:
        raise ValueError(f"return_features index {i} out of range for {self.num_layers} blocks")
      out.append(int(i) % self.num_layers)
    return tuple(out)

  def _run_blocks(self, h, t_freq, labels, extra, rope, deterministic: bool,
                  features: tuple[int, ...]):
    cfg = self.block_config()
    if self.scan_blocks:
      block = nn.scan(
          _block_class(self.remat, scan=True), variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 4,
          length=self.num_layers, unroll=self.scan_unroll,
          metadata_params={nn.PARTITION_NAME: "layers"})
      h, (conds, hs) = block(cfg, deterministic, bool(features), name=BLOCK_PREFIX)(
          h, t_freq, labels, extra, rope)
      return h, conds[0], {i: hs[i] for i in features}
    block_cls = _block_class(self.remat, scan=False)
    cond0, feats = None, {}
    for i in range(self.num_layers):
      h, (c, _) = block_cls(cfg, deterministic, name=f"{BLOCK_PREFIX}_{i}")(
          h, t_freq, labels, extra, rope)
      cond0 = c if i == 0 else cond0
      if i in features:
        feats[i] = h
    return h, cond0, feats

  @nn.compact
  def __call__(self, x, timestep, class_labels=None, *, train: bool = False, guidance=None,
               timestep2=None, return_features: Sequence[int] = ()):
    """x (B, H, W, in_channels) -> (B, H, W, output_channels) [, {block: (B, L, D)}]."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"DiT expects (B, H, W, {self.in_channels}) inputs, got {x.shape}")
    batch, height, width, _ = x.shape
    p, dim, out_ch = self.patch_size, self.hidden_size, self.output_channels
    if height % p or width % p:
      raise ValueError(f"image size {(height, width)} is not divisible by patch size {p}")
    gh, gw = height // p, width // p
    features = self._feature_indices(return_features)

    h = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    _init("xavier"), (None, None, "conv_in", "embed")),
                bias_init=nn.with_logical_partitioning(_init("zeros"), ("embed",)))(
                    x.astype(self.dtype))
    h = h.reshape(batch, gh * gw, dim)
    if self.pos_embed == "sincos":
      pe = sincos_pos_embed(dim, gh, gw, base_size=self.sample_size // p)
      h = (_upcast(h) + pe[None]).astype(self.dtype)
    elif self.pos_embed != "none":
      raise ValueError(f"unknown pos_embed {self.pos_embed!r} (known: sincos, none)")
    rope = rope_2d(gh, gw, self.attention_head_dim, self.rope_theta) if self.rope else None

    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (batch,))
    t_freq = timestep_embedding(t).astype(self.dtype)
    labels = self._labels(class_labels, batch, train)
    extra = None
    if self.guidance_embed:
      extra = self._scalar_embedding("guidance_embedder", guidance, batch,
                                     self.guidance_embed_scale)
    elif guidance is not None:
      raise ValueError("guidance given but the DiT has guidance_embed=False")
    if self.timestep2_embed:
      e2 = self._scalar_embedding("timestep2_embedder", timestep2, batch, 1.0)
      extra = e2 if extra is None else extra + e2
    elif timestep2 is not None:
      raise ValueError("timestep2 given but the DiT has timestep2_embed=False")

    h, cond0, feats = self._run_blocks(h, t_freq, labels, extra, rope, not train, features)

    shift, scale = jnp.split(
        _dense(2 * dim, ("embed", "mlp"), "proj_out_1", self.dtype, self.param_dtype,
               init="zeros")(nn.silu(cond0)), 2, axis=-1)
    h = NORMS.get(self.norm)(h, 1e-6) * (1 + scale[:, None]) + shift[:, None]
    h = _dense(p * p * out_ch, ("embed", "conv_out"), "proj_out_2", self.dtype,
               self.param_dtype, init="zeros")(h)
    out = unpatchify(h, gh, gw, p, out_ch)
    if return_features:
      # Keyed as requested (a negative index counts from the end, as in models/mlp.py).
      return out, {i: feats[j] for i, j in zip(return_features, features)}
    return out


def unpatchify(h: Array, gh: int, gw: int, p: int, channels: int) -> Array:
  """(B, gh*gw, p*p*C) tokens -> (B, gh*p, gw*p, C); token features ordered (p_row, p_col, c)."""
  b = h.shape[0]
  h = h.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return h.reshape(b, gh * p, gw * p, channels)


# ----------------------------------------------------------------------------------------------
# FLOPs and parameter layouts.

def flops_per_example(model: DiT, height: Optional[int] = None,
                      width: Optional[int] = None) -> int:
  """Forward FLOPs per example: 2*m*n*k for every matmul/conv plus attention's QK^T and PV.

  Counts the patch-embed conv, every block's timestep MLP and adaLN modulation, q/k/v/out,
  attention, the MLP, the guidance / timestep2 MLPs, AGD adapters and the final layer.
  Elementwise work
  (norms, softmax, activations, biases, RoPE) and gathers are not counted: XLA's
  `cost_analysis()` of the unscanned forward is 1-3% higher for realistic widths (tested). With
  `scan_blocks` XLA counts the loop body once, so compare against the unscanned model.
  """
  height = height or model.sample_size
  width = width or model.sample_size
  p, d = model.patch_size, model.hidden_size
  n = (height // p) * (width // p)
  time_mlp = 2 * (TIME_FREQ_DIM * d + d * d)
  patch = 2 * n * p * p * model.in_channels * d
  adapter = 2 * 2 * d * model.guidance_adapter   # two per-example matmuls (AGD adapter)
  block = (time_mlp + 2 * d * 6 * d + 4 * 2 * n * d * d + 2 * 2 * n * n * d
           + _MLP_MATMULS[model.mlp] * 2 * n * d * model.mlp_hidden + adapter)
  extras = (int(model.guidance_embed) + int(model.timestep2_embed)) * time_mlp
  final = 2 * d * 2 * d + 2 * n * d * p * p * model.output_channels
  return int(patch + model.num_layers * block + extras + final)


_BLOCK_RE = re.compile(rf"^{BLOCK_PREFIX}_(\d+)$")


def stack_block_params(params: dict, num_layers: int) -> dict:
  """Unscanned params (`transformer_blocks_i`) -> scanned (`transformer_blocks`, leading L)."""
  out = {k: v for k, v in params.items() if not _BLOCK_RE.match(k)}
  blocks = [params[f"{BLOCK_PREFIX}_{i}"] for i in range(num_layers)]
  out[BLOCK_PREFIX] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def unstack_block_params(params: dict, num_layers: int) -> dict:
  """Scanned params (`transformer_blocks`, leading L) -> unscanned (`transformer_blocks_i`)."""
  out = {k: v for k, v in params.items() if k != BLOCK_PREFIX}
  for i in range(num_layers):
    out[f"{BLOCK_PREFIX}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i],
                                                        params[BLOCK_PREFIX])
  return out
