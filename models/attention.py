"""Multi-head attention implementations, chosen by name.

All implementations take the layout of `jax.nn.dot_product_attention`:
q `(B, Lq, H, D)`, k and v `(B, Lk, H, D)`, and return `(B, Lq, H, D)` in q's dtype:

    out = attention(q, k, v, impl="pallas")          # softmax(q k^T * scale) v per head
    out = sharded_attention(q, k, v, impl="pallas", mesh=mesh)   # inside jit, over a mesh

Implementations (registry `ATTENTION`):

| name         | runs on                        | reverse mode (grad)   | forward mode (jvp)   |
|--------------|--------------------------------|-----------------------|----------------------|
| `xla`        | everywhere                     | yes (plain jnp)       | yes (plain jnp)      |
| `cudnn`      | CUDA GPUs                      | yes (cuDNN vjp)       | NO (custom_vjp)      |
| `pallas`     | GPU (Triton), CPU interpret    | yes (Pallas backward) | NO (custom_vjp)      |
| `pallas_jvp` | GPU (Triton), CPU interpret    | NO (not transposable) | yes (fused kernel)   |
| `splash`     | TPU (Mosaic), CPU interpret=True | yes (splash vjp)    | NO (custom_vjp)      |
| `mosaic_jvp` | TPU (Mosaic), CPU interpret=True | NO (not transposable) | yes (fused kernel) |

How to choose (DESIGN.md, "Command line" and "Model conventions"): a model takes two names,
`model.attention` for passes that are differentiated in reverse mode (the loss's gradient pass,
plain forward passes, sampling) and `model.jvp_attention` for passes pushed through `jax.jvp`
(the sCM/TrigFlow tangent `d f(x_t, t)/dt`, default `xla`). The split exists because JAX allows
only one of `custom_vjp` / `custom_jvp` per function: `jax.jvp` through a `custom_vjp` (cuDNN,
splash, `pallas`) raises "can't apply forward-mode autodiff (jvp) to a custom_vjp function", and the
tangent produced by a `custom_jvp` rule that calls a Pallas kernel cannot be transposed
(`pallas_call` has no transpose rule), so `pallas_jvp` is not reverse-differentiable. The sCM loss
differentiates only the primal of its jvp, never the tangent: in its separate form it computes the
tangent as `jax.jvp(lambda x, t: apply(stop_gradient(params), x, t), ...)` (no reverse pass through
it) and runs a separate gradient pass; in its shared form (one student pass, the default) the jvp's
primal is the differentiated output and the model runs the pair `shared_primal_impl(attention,
jvp_attention)` ("cudnn+pallas_jvp"): the primal and its backward from the first, the tangent from
the second on stop-gradient inputs. Good pairs: GPU `attention="pallas"` or `"cudnn"` with
`jvp_attention="pallas_jvp"`; TPU `attention="splash"` with `jvp_attention="mosaic_jvp"` (the same
fused tangent as a Mosaic kernel, models/attention_mosaic.py) or `"xla"`; CPU `xla`/`xla`.
`GRADIENT_IMPLS` and `TANGENT_IMPLS` list which names suit which pass, and
`check_impls(model.attention, model.jvp_attention)` validates a config before any work. Misuse fails
loudly but late: an eager `jax.jvp` through a custom_vjp impl raises our TypeError naming the
tangent impls; under `jax.jit` JAX raises its own TypeError (same text "can't apply forward-mode
autodiff") at lowering; `jax.grad` through `pallas_jvp` raises JAX's ValueError "Linearization
failed to produce known values ...".

The fused tangent (sCM, Lu & Song 2025, App. F; reference/methods_consistency.md 0.2). With
S = q k^T * scale, P = softmax(S), O = P V and dS = (dq k^T + q dk^T) * scale:

    dO = (P o dS) V - rowsum(P o dS) o O + P dV

`pallas_jvp` (and `mosaic_jvp` on TPU) computes O and dO in one pass over key blocks with the
online-softmax running max m: per block it accumulates l = sum_j p_ij, r = sum_j p_ij dS_ij, acc =
sum_j p_ij v_j and tacc = sum_j p_ij (dS_ij v_j + dv_j), all rescaled by exp(m_old - m_new) when the
max moves; then O = acc / l and dO = tacc / l - (r / l) O: 6 tile matmuls per key block instead of 2
(q k^T, dq k^T, q dk^T, P V, (P o dS) V, P dV), like rcm's Triton JVP kernel.

Padding. Kernels pad the sequence lengths up to a multiple of their block sizes (padded keys are
masked out of the softmax, padded queries are sliced off) and the head dimension up to a power of
two >= 16 (Triton needs power-of-two tiles; splash and mosaic_jvp pad lengths and D to multiples of
128, the TPU lane width, with blocks of 256 or 128 rows). Zero padding of D is exact: it adds zeros
to every dot product and zero output columns. DiT-XL's D = 72 runs as 128. Block sizes are powers of
two (`BlockSizes`); a block longer than the sequence shrinks to the next power of two >= the
sequence length (at least 16).

Platform and interpret mode. `interpret=None` picks Pallas interpret mode on CPU for `pallas` and
`pallas_jvp` (slow, for tests) and compiled kernels elsewhere; `splash` and `mosaic_jvp` raise on a
backend other than TPU unless `interpret=True` is given (tests) and `cudnn` raises on a backend
other than a CUDA GPU: there is no silent fallback, a config that names a kernel gets that kernel or
stops. The backend is `jax.default_backend()`, or the platform of the mesh's devices in
`sharded_attention` (so an AOT compile for a TPU topology from a CPU host builds the TPU kernel);
`platform=` overrides both.

Sharding. Pallas/Mosaic/cuDNN kernels cannot be auto-partitioned by XLA: `sharded_attention`
runs them inside `jax.shard_map` with the batch split over the mesh's batch axes and the heads
over its tensor axis (attention is independent per example and per head, so no collective is
needed). `xla` is left to the XLA partitioner.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from distill.registry import Registry
from models import attention_mosaic

Array = jax.Array

ATTENTION: Registry = Registry("attention implementation")

# Names that can sit in a reverse-differentiated pass (`model.attention`) and in a pass pushed
# through `jax.jvp` (`model.jvp_attention`).
GRADIENT_IMPLS = ("xla", "cudnn", "pallas", "splash")
TANGENT_IMPLS = ("xla", "pallas_jvp", "mosaic_jvp")

# A large finite negative logit for masked keys: exp(MASK - m) == 0 without inf - inf = nan.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernels (powers of two >= 16; Triton needs power-of-two tiles).

  Attributes:
    block_q, block_k: query / key tile of the forward kernel.
    block_q_bwd, block_k_bwd: query / key tiles of the two backward kernels (dq; dk and dv).
    block_q_jvp, block_k_jvp: query / key tiles of the fused primal + tangent kernel (it holds
      twice the tiles of the forward kernel, hence the smaller default key tile).
    num_warps: Triton warps per program; None picks 4 for head dims <= 64, else 8.
    num_stages: Triton software-pipelining stages.
  Defaults are untuned starting points for H100-class GPUs; blocks shrink for short sequences.
  """
  block_q: int = 64
  block_k: int = 64
  block_q_bwd: int = 32
  block_k_bwd: int = 32
  block_q_jvp: int = 64
  block_k_jvp: int = 32
  num_warps: Optional[int] = None
  num_stages: int = 2

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.startswith("block_"):
        b = getattr(self, f.name)
        if b < 16 or b & (b - 1):
          raise ValueError(f"BlockSizes.{f.name}={b}: block sizes must be powers of two >= 16")


# ------------------------------------------------------------------------------------------------
# Reference implementation.


def _xla_attention(q, k, v, *, scale, mask=None, bias=None, precision=None, **unused):
  """softmax(q k^T * scale + bias, masked) v in plain jnp; logits and softmax in >= float32."""
  del unused
  acc = jnp.promote_types(q.dtype, jnp.float32)   # float32, or float64 under x64 (FD tests)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=acc) * scale
  if bias is not None:
    logits = logits + bias.astype(acc)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, precision=precision,
                   preferred_element_type=acc)
  return out.astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# cuDNN (GPU only).


def _cudnn_attention(q, k, v, *, scale, mask=None, bias=None, platform=None, **unused):
  """`jax.nn.dot_product_attention(implementation="cudnn")`; bf16/fp16 only (float32 is cast)."""
  del unused
  platform = platform or jax.default_backend()
  if platform not in ("gpu", "cuda"):
    raise RuntimeError(
        f"attention impl 'cudnn' needs a CUDA GPU backend, but the backend is {platform!r}; "
        "use impl='xla' (any backend), 'pallas' (GPU, or CPU interpret mode) or 'splash' (TPU)")
  dtype = q.dtype
  if dtype not in (jnp.bfloat16, jnp.float16):
    warnings.warn(f"attention impl 'cudnn' supports only bfloat16/float16; casting {dtype} "
                  "inputs to bfloat16 (output cast back)", stacklevel=3)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    bias = None if bias is None else bias.astype(jnp.bfloat16)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                     implementation="cudnn")
  return out.astype(dtype)


# ------------------------------------------------------------------------------------------------
# Pallas flash attention (Triton on GPU, interpret mode on CPU).


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static configuration of one padded kernel call (hashable: a nondiff argument)."""
  scale: float
  kv_len: int             # true key length; keys at index >= kv_len are padding
  kv_pad: int             # padded key length
  block_q: int
  block_k: int
  block_q_bwd: int
  block_k_bwd: int
  block_q_jvp: int
  block_k_jvp: int
  num_warps: int
  num_stages: int
  interpret: bool
  precision: Any          # in-kernel dot precision (None: TF32 for f32 on GPU, exact on CPU)

  def params(self):
    if self.interpret:
      return None
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def _next_pow2(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _fit(block: int, length: int) -> int:
  """The block used for a sequence of `length`: no longer than needed, a power of two >= 16."""
  return min(block, max(16, _next_pow2(length)))


def _dot(a, b, contract, precision):
  """2-D dot_general with float32 accumulation; `contract` = (lhs dim, rhs dim)."""
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=precision, preferred_element_type=jnp.float32)


def _mask_keys(s, start, block_k, kv_len, padded):
  """Masks logits of padded keys (columns start + j >= kv_len) with a large negative value."""
  if not padded:
    return s
  cols = start + jnp.arange(block_k)
  return jnp.where((cols < kv_len)[None, :], s, _MASK_VALUE)


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, *lse_ref, cfg: _Cfg, block_k: int):
  """One query tile against all key tiles: online softmax; writes O (and the row logsumexp)."""
  q = q_ref[...]
  bq = q.shape[0]
  padded = cfg.kv_pad != cfg.kv_len

  def body(j, carry):
    acc, m, l = carry
    start = j * block_k
    k = k_ref[pl.ds(start, block_k), :]
    v = v_ref[pl.ds(start, block_k), :]
    s = _dot(q, k, (1, 1), cfg.precision) * cfg.scale
    s = _mask_keys(s, start, block_k, cfg.kv_len, padded)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0), cfg.precision)
    return acc, m_new, l

  init = (jnp.zeros((bq, q.shape[1]), jnp.float32),
          jnp.full((bq,), _MASK_VALUE, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  if lse_ref:
    lse_ref[0][...] = m + jnp.log(l)


def _tile_spec(block, dp):
  """BlockSpec of a (block, dp) tile of a (B, L, H, Dp) array; grid = (tiles, B, H)."""
  return pl.BlockSpec((None, block, None, dp), lambda i, b, h: (b, i, h, 0))


def _full_spec(length, dp):
  """BlockSpec of the whole (L, Dp) sequence of one (batch, head) of a (B, L, H, Dp) array."""
  return pl.BlockSpec((None, length, None, dp), lambda i, b, h: (b, 0, h, 0))


def _row_spec(block):
  """BlockSpec of a tile of a (B, H, L) row statistic (logsumexp, delta)."""
  return pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))


def _full_row_spec(length):
  return pl.BlockSpec((None, None, length), lambda i, b, h: (b, h, 0))


def _flash_forward(q, k, v, cfg: _Cfg, with_lse: bool):
  """Runs the forward kernel on padded (B, Lq, H, Dp) / (B, Lk, H, Dp) arrays."""
  b, lq, h, dp = q.shape
  lk = k.shape[1]
  bq, bk = cfg.block_q, cfg.block_k
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  out_specs = [_tile_spec(bq, dp)]
  if with_lse:
    out_shape.append(jax.ShapeDtypeStruct((b, h, lq), jnp.float32))
    out_specs.append(_row_spec(bq))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, block_k=bk),
      grid=(lq // bq, b, h),
      in_specs=[_tile_spec(bq, dp), _full_spec(lk, dp), _full_spec(lk, dp)],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(q, k, v)
  return outs if with_lse else (outs[0], None)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: _Cfg):
  """dq for one query tile: sum over key tiles of dS k, dS = P o (dO v^T - delta)."""
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  bk = cfg.block_k_bwd
  padded = cfg.kv_pad != cfg.kv_len

  def body(j, dq):
    start = j * bk
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s = _dot(q, k, (1, 1), cfg.precision) * cfg.scale
    s = _mask_keys(s, start, bk, cfg.kv_len, padded)
    p = jnp.exp(s - lse[:, None])
    dp = _dot(do, v, (1, 1), cfg.precision)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, (1, 0), cfg.precision)

  dq = lax.fori_loop(0, k_ref.shape[0] // bk, body,
                     jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Cfg):
  """dk, dv for one key tile: sums over query tiles of dS^T q and P^T dO."""
  k = k_ref[...]
  v = v_ref[...]
  bk = k.shape[0]
  bq = cfg.block_q_bwd
  start_k = pl.program_id(0) * bk
  padded = cfg.kv_pad != cfg.kv_len

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(i * bq, bq)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    lse = lse_ref[rows]
    delta = delta_ref[rows]
    s = _dot(q, k, (1, 1), cfg.precision) * cfg.scale          # (bq, bk)
    s = _mask_keys(s, start_k, bk, cfg.kv_len, padded)
    p = jnp.exp(s - lse[:, None])
    dv = dv + _dot(p.astype(do.dtype), do, (0, 0), cfg.precision)
    dp = _dot(do, v, (1, 1), cfg.precision)
    ds = p * (dp - delta[:, None])
    dk = dk + _dot(ds.astype(q.dtype), q, (0, 0), cfg.precision)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, q_ref.shape[0] // bq, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _flash_backward(q, k, v, o, lse, do, cfg: _Cfg):
  """dq, dk, dv of the padded forward from its residuals (two Pallas kernels)."""
  b, lq, h, dp = q.shape
  lk = k.shape[1]
  bq, bk = cfg.block_q_bwd, cfg.block_k_bwd
  delta = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(lq // bq, b, h),
      in_specs=[_tile_spec(bq, dp), _full_spec(lk, dp), _full_spec(lk, dp),
                _tile_spec(bq, dp), _row_spec(bq), _row_spec(bq)],
      out_specs=_tile_spec(bq, dp),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, do, lse, delta)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(lk // bk, b, h),
      in_specs=[_full_spec(lq, dp), _tile_spec(bk, dp), _tile_spec(bk, dp),
                _full_spec(lq, dp), _full_row_spec(lq), _full_row_spec(lq)],
      out_specs=[_tile_spec(bk, dp), _tile_spec(bk, dp)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_vjp(q, k, v, cfg):
  return _flash_forward(q, k, v, cfg, with_lse=False)[0]


def _flash_vjp_fwd(q, k, v, cfg):
  o, lse = _flash_forward(q, k, v, cfg, with_lse=True)
  return o, (q, k, v, o, lse)


def _flash_vjp_bwd(cfg, res, do):
  q, k, v, o, lse = res
  return _flash_backward(q, k, v, o, lse, do, cfg)


_flash_vjp.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def _jvp_kernel(q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, o_ref, to_ref, *, cfg: _Cfg):
  """Fused primal + tangent of one query tile (online softmax over key tiles)."""
  q = q_ref[...]
  tq = tq_ref[...]
  bq, dp = q.shape
  bk = cfg.block_k_jvp
  padded = cfg.kv_pad != cfg.kv_len
  prec = cfg.precision

  def body(j, carry):
    acc, tacc, m, l, r = carry
    start = j * bk
    cols = pl.ds(start, bk)
    k = k_ref[cols, :]
    v = v_ref[cols, :]
    tk = tk_ref[cols, :]
    tv = tv_ref[cols, :]
    s = _dot(q, k, (1, 1), prec) * cfg.scale
    s = _mask_keys(s, start, bk, cfg.kv_len, padded)
    ds = (_dot(tq, k, (1, 1), prec) + _dot(q, tk, (1, 1), prec)) * cfg.scale
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])          # 0 on masked keys, where ds is finite (k, tk = 0)
    pds = p * ds
    l = alpha * l + jnp.sum(p, axis=-1)
    r = alpha * r + jnp.sum(pds, axis=-1)
    acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v, (1, 0), prec)
    tacc = (alpha[:, None] * tacc + _dot(pds.astype(v.dtype), v, (1, 0), prec)
            + _dot(p.astype(tv.dtype), tv, (1, 0), prec))
    return acc, tacc, m_new, l, r

  zeros = jnp.zeros((bq, dp), jnp.float32)
  row0 = jnp.zeros((bq,), jnp.float32)
  init = (zeros, zeros, jnp.full((bq,), _MASK_VALUE, jnp.float32), row0, row0)
  acc, tacc, _, l, r = lax.fori_loop(0, k_ref.shape[0] // bk, body, init)
  o = acc / l[:, None]
  o_ref[...] = o.astype(o_ref.dtype)
  to_ref[...] = (tacc / l[:, None] - (r / l)[:, None] * o).astype(to_ref.dtype)


def _flash_primal_tangent(q, k, v, tq, tk, tv, cfg: _Cfg):
  """(O, dO) of the padded inputs in one fused Pallas kernel."""
  b, lq, h, dp = q.shape
  lk = k.shape[1]
  bq = cfg.block_q_jvp
  tile, full = _tile_spec(bq, dp), _full_spec(lk, dp)
  return pl.pallas_call(
      functools.partial(_jvp_kernel, cfg=cfg),
      grid=(lq // bq, b, h),
      in_specs=[tile, full, full, tile, full, full],
      out_specs=[tile, tile],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape, q.dtype)],
      compiler_params=cfg.params(),
      interpret=cfg.interpret,
      name="flash_attention_jvp",
  )(q, k, v, tq.astype(q.dtype), tk.astype(k.dtype), tv.astype(v.dtype))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _flash_jvp(q, k, v, cfg):
  return _flash_forward(q, k, v, cfg, with_lse=False)[0]


@_flash_jvp.defjvp
def _flash_jvp_rule(cfg, primals, tangents):
  q, k, v = primals
  tq, tk, tv = tangents
  o, to = _flash_primal_tangent(q, k, v, tq, tk, tv, cfg)
  return o, to


def _make_cfg(q, k, scale, block_sizes: Optional[BlockSizes], interpret: bool, precision):
  """Fits the blocks to the sequence lengths; returns (cfg, padded Lq, padded Lk, padded D)."""
  bs = block_sizes or BlockSizes()
  lq, lk, d = q.shape[1], k.shape[1], q.shape[3]
  blocks = dict(
      block_q=_fit(bs.block_q, lq), block_k=_fit(bs.block_k, lk),
      block_q_bwd=_fit(bs.block_q_bwd, lq), block_k_bwd=_fit(bs.block_k_bwd, lk),
      block_q_jvp=_fit(bs.block_q_jvp, lq), block_k_jvp=_fit(bs.block_k_jvp, lk))
  # All blocks are powers of two, so the largest one is a multiple of the others.
  lq_pad = _round_up(lq, max(blocks["block_q"], blocks["block_q_bwd"], blocks["block_q_jvp"]))
  lk_pad = _round_up(lk, max(blocks["block_k"], blocks["block_k_bwd"], blocks["block_k_jvp"]))
  d_pad = max(16, _next_pow2(d))
  num_warps = bs.num_warps if bs.num_warps is not None else (4 if d_pad <= 64 else 8)
  cfg = _Cfg(scale=float(scale), kv_len=lk, kv_pad=lk_pad, num_warps=num_warps,
             num_stages=bs.num_stages,
             interpret=bool(interpret), precision=precision, **blocks)
  return cfg, lq_pad, lk_pad, d_pad


def _pad(x, length, d):
  pad_l, pad_d = length - x.shape[1], d - x.shape[3]
  if pad_l == 0 and pad_d == 0:
    return x
  return jnp.pad(x, ((0, 0), (0, pad_l), (0, 0), (0, pad_d)))


def _check_kernel_inputs(name, q, k, v, mask, bias):
  if mask is not None or bias is not None:
    raise NotImplementedError(
        f"attention impl {name!r} supports neither mask nor bias (DiT/SANA attention needs "
        "none); use impl='xla' or 'cudnn' for masked or biased attention")
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
    raise ValueError(f"attention impl {name!r}: expected q (B, Lq, H, D) and k, v (B, Lk, H, D) "
                     f"with the same B, H, D; got {q.shape}, {k.shape}, {v.shape}")


def _resolve_interpret(name, interpret, platform):
  """Interpret mode on CPU (or when asked); the compiled kernel is Triton, so GPU only."""
  platform = platform or jax.default_backend()
  if interpret is None:
    interpret = platform == "cpu"
  if not interpret and platform not in ("gpu", "cuda", "rocm"):
    raise RuntimeError(
        f"attention impl {name!r} is a Pallas Triton kernel (GPU, or CPU interpret mode), but the "
        f"backend is {platform!r}; on TPU use impl='splash' for gradient passes and "
        "'mosaic_jvp' or 'xla' for tangent passes")
  return bool(interpret)


def _pallas_common(core, name, q, k, v, *, scale, mask=None, bias=None, block_sizes=None,
                   interpret=None, precision=None, platform=None, **unused):
  del unused
  _check_kernel_inputs(name, q, k, v, mask, bias)
  interpret = _resolve_interpret(name, interpret, platform)
  cfg, lq_pad, lk_pad, d_pad = _make_cfg(q, k, scale, block_sizes, interpret, precision)
  lq, d = q.shape[1], q.shape[3]
  out = core(_pad(q, lq_pad, d_pad), _pad(k, lk_pad, d_pad), _pad(v, lk_pad, d_pad), cfg)
  return out[:, :lq, :, :d]


_pallas_attention = functools.partial(_pallas_common, _flash_vjp, "pallas")
_pallas_jvp_attention = functools.partial(_pallas_common, _flash_jvp, "pallas_jvp")


# ------------------------------------------------------------------------------------------------
# Splash attention (TPU).


def _splash_block(length: int) -> int:
  for b in (512, 256, 128):
    if length % b == 0:
      return b
  raise AssertionError(length)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, lq: int, lk: int, lq_pad: int, lk_pad: int, interpret: bool):
  """Builds (and caches) a non-causal splash MHA kernel for padded lengths; masks padded keys."""
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if lk_pad == lk:
    head_mask = sa.FullMask((lq_pad, lk_pad))
  else:
    valid = np.broadcast_to(np.arange(lk_pad) < lk, (lq_pad, lk_pad))
    head_mask = sa.NumpyMask(np.ascontiguousarray(valid))
  bq, bk = _splash_block(lq_pad), _splash_block(lk_pad)
  block_sizes = sa.BlockSizes(
      block_q=bq, block_kv=bk, block_kv_compute=bk,
      block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
      block_q_dq=bq, block_kv_dq=bk)
  return sa.make_splash_mha(sa.MultiHeadMask([head_mask] * num_heads), block_sizes=block_sizes,
                            head_shards=1, q_seq_shards=1, interpret=interpret)


def _check_tpu_kernel(name, q, k, v, mask, bias, interpret, platform, gpu_alternatives):
  """A TPU kernel's inputs (no mask or bias) and platform (TPU, or interpret mode): one line."""
  _check_kernel_inputs(name, q, k, v, mask, bias)
  platform = platform or jax.default_backend()
  if platform != "tpu" and not interpret:
    raise RuntimeError(
        f"attention impl {name!r} needs a TPU backend, but the backend is {platform!r}; use "
        f"impl='xla' (any backend), {gpu_alternatives} (GPU), or interpret=True (slow, tests)")


def _splash_attention(q, k, v, *, scale, mask=None, bias=None, interpret=None, platform=None,
                      **unused):
  """TPU splash attention, vmapped over the batch; (B, L, H, D) in and out."""
  del unused
  _check_tpu_kernel("splash", q, k, v, mask, bias, interpret, platform, "'pallas' or 'cudnn'")
  b, lq, h, d = q.shape
  lk = k.shape[1]
  lq_pad, lk_pad, d_pad = _round_up(lq, 128), _round_up(lk, 128), _round_up(d, 128)
  kernel = _splash_kernel(h, lq, lk, lq_pad, lk_pad, bool(interpret))
  # Splash does not scale the logits: fold the scale into q. Layout (B, H, L, D) per call.
  qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
  to_bhld = lambda x, n: _pad(x, n, d_pad).transpose(0, 2, 1, 3)
  # The kernel's matmuls (forward and backward) take the ambient default precision, and Mosaic
  # has no fp32-precision matmul of bf16 operands ("Bad lhs type"): bf16 splash needs
  # jax_default_matmul_precision at its default (not "highest").
  out = jax.vmap(kernel)(to_bhld(qs, lq_pad), to_bhld(k, lk_pad), to_bhld(v, lk_pad))
  return out.transpose(0, 2, 1, 3)[:, :lq, :, :d].astype(q.dtype)


# ------------------------------------------------------------------------------------------------
# The fused primal + tangent kernel for TPU (Pallas Mosaic; models/attention_mosaic.py).


def _mosaic_blocks(lq: int, lk: int) -> tuple[int, int, int, int]:
  """(block_q, block_k, padded Lq, padded Lk): blocks of up to 256 rows, multiples of 128."""
  lq_pad, lk_pad = _round_up(lq, 128), _round_up(lk, 128)
  bq = 256 if lq_pad % 256 == 0 else 128
  bk = 256 if lk_pad % 256 == 0 else 128
  return bq, bk, lq_pad, lk_pad


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _mosaic_jvp(q, k, v, cfg):
  return attention_mosaic.attention_bhld(q, k, v, **cfg._asdict())


@_mosaic_jvp.defjvp
def _mosaic_jvp_rule(cfg, primals, tangents):
  return attention_mosaic.attention_bhld(*primals, tuple(tangents), **cfg._asdict())


class _MosaicCfg(NamedTuple):
  scale: float
  kv_len: int
  block_q: int
  block_k: int
  interpret: bool


def _mosaic_jvp_attention(q, k, v, *, scale, mask=None, bias=None, interpret=None, platform=None,
                          **unused):
  """TPU fused attention whose jvp rule is the fused primal + tangent kernel; (B, L, H, D)."""
  del unused
  _check_tpu_kernel("mosaic_jvp", q, k, v, mask, bias, interpret, platform, "'pallas_jvp'")
  lq, d = q.shape[1], q.shape[3]
  bq, bk, lq_pad, lk_pad = _mosaic_blocks(lq, k.shape[1])
  d_pad = _round_up(d, 128)
  cfg = _MosaicCfg(float(scale), int(k.shape[1]), bq, bk, bool(interpret))
  to_bhld = lambda x, n: _pad(x, n, d_pad).transpose(0, 2, 1, 3)
  out = _mosaic_jvp(to_bhld(q, lq_pad), to_bhld(k, lk_pad), to_bhld(v, lk_pad), cfg)
  return out.transpose(0, 2, 1, 3)[:, :lq, :, :d]


ATTENTION.add("xla", _xla_attention)
ATTENTION.add("cudnn", _cudnn_attention)
ATTENTION.add("pallas", _pallas_attention)
ATTENTION.add("pallas_jvp", _pallas_jvp_attention)
ATTENTION.add("splash", _splash_attention)
ATTENTION.add("mosaic_jvp", _mosaic_jvp_attention)


# ------------------------------------------------------------------------------------------------
# Shared-primal passes: one primal, differentiated in reverse mode and pushed through jax.jvp.

SHARED_SEP = "+"


def shared_primal_impl(gradient: str, tangent: str) -> str:
  """The name of the attention for a pass pushed through `jax.jvp` whose *primal* output is also
  differentiated in reverse mode, while its tangent output is a constant to reverse mode.

  sCM's shared pass (`objective.shared_primal`) computes the student's output F_theta and its
  stop-gradient tangent T in one `jax.jvp` inside the loss's gradient, instead of a tangent pass
  and a second forward. A kernel serves one of the two modes only, so such a pass takes the pair
  `"<gradient>+<tangent>"`: the primal comes from `gradient` (its custom_vjp backward serves the
  loss's gradient), the tangent from `tangent`'s forward-mode rule evaluated on stop-gradient
  inputs (so the tangent kernel is never linearised or transposed). `xla` serves both modes
  itself, so the pair (xla, xla) is plain `xla`.

  The tangent a pair returns carries no gradient, so a pair name is only for passes whose
  tangent is stop-gradient'd (sCM's); `check_impls` refuses it in a config. Every call of a pair
  in such a pass must see a tangent from the jvp's inputs (true of DiT's self- and
  cross-attention: q always depends on x_t); a call whose q, k, v carry none is differentiated
  through the rule itself and fails loudly at trace time (a transpose of stop_gradient, or
  Pallas' "must override"): run such a model with `objective.shared_primal=False`.
  """
  return "xla" if gradient == tangent == "xla" else f"{gradient}{SHARED_SEP}{tangent}"


def _shared_primal_attention(q, k, v, *, gradient, tangent, mask=None, bias=None, **kwargs):
  """`gradient`'s attention whose jvp rule takes its tangent from `tangent` (stop-gradient).

  A bias is an argument like q, k and v (its gradient and tangent count); the boolean mask has
  neither."""
  sg = lambda xs: tuple(lax.stop_gradient(x) for x in xs)
  mask = None if mask is None else lax.stop_gradient(mask)

  def call(fn, q, k, v, *maybe_bias):
    return fn(q, k, v, mask=mask, bias=maybe_bias[0] if maybe_bias else None, **kwargs)

  @jax.custom_jvp
  def attend(*args):
    return call(gradient, *args)

  @attend.defjvp
  def attend_jvp(primals, tangents):
    _, out_tangent = jax.jvp(functools.partial(call, tangent), sg(primals), sg(tangents))
    return call(gradient, *primals), out_tangent

  return attend(q, k, v, *(() if bias is None else (bias,)))


def _implementation(impl: str):
  """The function of an implementation name, or of a shared-primal pair `gradient+tangent`."""
  gradient, sep, tangent = impl.partition(SHARED_SEP)
  if not sep:
    return ATTENTION.get(impl)
  return functools.partial(_shared_primal_attention, gradient=ATTENTION.get(gradient),
                           tangent=ATTENTION.get(tangent))


# ------------------------------------------------------------------------------------------------
# Public entry points.


def attention(q: Array, k: Array, v: Array, *, impl: str = "xla", mask: Optional[Array] = None,
              bias: Optional[Array] = None, scale: Optional[float] = None,
              block_sizes: Optional[BlockSizes] = None, interpret: Optional[bool] = None,
              precision: Any = None, platform: Optional[str] = None) -> Array:
  """Multi-head attention softmax(q k^T * scale + bias) v with the implementation `impl`.

  Args:
    q: queries (B, Lq, H, D).
    k, v: keys and values (B, Lk, H, D).
    impl: a name in `ATTENTION` (xla, cudnn, pallas, pallas_jvp, splash), or a shared-primal
      pair `shared_primal_impl(gradient, tangent)`; see the module doc
      for which to use in gradient passes (`model.attention`) and in tangent passes
      (`model.jvp_attention`).
    mask: boolean, broadcastable to (B, H, Lq, Lk), True = attend (xla, cudnn only).
    bias: additive logits bias broadcastable to (B, H, Lq, Lk) (xla, cudnn only).
    scale: logit scale (a Python float: it is static in the kernels), default 1 / sqrt(D).
    block_sizes: Pallas tile sizes (pallas, pallas_jvp).
    interpret: Pallas interpret mode; None = on CPU only (pallas*); splash needs True off TPU.
    precision: dot precision inside the kernels and of the xla einsums (None = backend default:
      TF32 for float32 Triton dots on GPU; exact float32 on CPU).
    platform: the backend the call is compiled for (default: jax.default_backend()).

  Returns:
    (B, Lq, H, D) in q's dtype.

  Raises:
    RuntimeError: a kernel that does not exist on the platform (cudnn off GPU, splash off TPU).
    TypeError: `jax.jvp` through an implementation that is a custom_vjp (cudnn, pallas,
      splash); the message names the tangent-capable implementations.
  """
  fn = _implementation(impl)
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  try:
    return fn(q, k, v, scale=scale, mask=mask, bias=bias, block_sizes=block_sizes,
              interpret=interpret, precision=precision, platform=platform)
  except TypeError as e:
    if "forward-mode autodiff" not in str(e):
      raise
    raise TypeError(
        f"attention impl {impl!r} is a jax.custom_vjp and cannot be pushed through jax.jvp "
        f"(JAX: {e}). Use one of {TANGENT_IMPLS} for tangent passes (model.jvp_attention); "
        f"keep {impl!r} for gradient passes (model.attention).") from e


def check_impls(attention_impl: str, jvp_attention_impl: str, prefix: str = "model") -> None:
  """Validates a model's (`model.attention`, `model.jvp_attention`) pair before any work
  (`trainer.prepare_config` runs it on `model.*` and `teacher.runtime.*`; `prefix` names them).

  Raises one ValueError line when a name is unknown or used in a pass it cannot serve (e.g.
  `jvp_attention="pallas"`, a custom_vjp, or `attention="pallas_jvp"`, not transposable).
  """
  for name, allowed, key in ((attention_impl, GRADIENT_IMPLS, f"{prefix}.attention"),
                             (jvp_attention_impl, TANGENT_IMPLS, f"{prefix}.jvp_attention")):
    if name not in ATTENTION:
      raise ValueError(f"{key}={name!r}: unknown attention implementation "
                       f"(known: {', '.join(ATTENTION.names())})")
    if name not in allowed:
      raise ValueError(f"{key}={name!r} cannot serve this pass; choose one of {allowed}")


# The backends each kernel runs on (XLA's runs everywhere; the Pallas Triton kernels also run in
# interpret mode on CPU).
IMPL_PLATFORMS = {"cudnn": ("gpu", "cuda"), "pallas": ("gpu", "cuda", "cpu"),
                  "pallas_jvp": ("gpu", "cuda", "cpu"), "splash": ("tpu",),
                  "mosaic_jvp": ("tpu",)}
_PLATFORM_CHOICE = {"tpu": "splash (gradient) / mosaic_jvp or xla (tangent)",
                    "gpu": "cudnn or pallas (gradient) / pallas_jvp or xla (tangent)",
                    "cpu": "xla"}


def runs_on(name: str, platform: str) -> bool:
  """Whether attention implementation `name` runs on `platform` ("cpu", "gpu", "cuda", "tpu")."""
  return platform in IMPL_PLATFORMS.get(name, (platform,))


KERNEL_KEYS = ("attention", "jvp_attention")


def unrunnable_kernels(settings, platform: str) -> list:
  """The kernel keys of `settings` (a model section or runtime dict: `attention`,
  `jvp_attention`) naming an implementation that cannot run on `platform`."""
  return [key for key in KERNEL_KEYS
          if settings.get(key) is not None and not runs_on(settings[key], platform)]


def check_platform(attention_impl: str, jvp_attention_impl: str, platform: str,
                   prefix: str = "model") -> None:
  """Raises one ValueError line when a named kernel cannot run on `platform` ("cpu", "gpu",
  "cuda", "tpu"): before a run or an ahead-of-time compile, instead of at the first trace."""
  for name, key in ((attention_impl, f"{prefix}.attention"),
                    (jvp_attention_impl, f"{prefix}.jvp_attention")):
    if not runs_on(name, platform):
      choice = _PLATFORM_CHOICE.get("gpu" if platform == "cuda" else platform, "xla")
      raise ValueError(f"{key}={name!r} does not run on {platform}; there use {choice} "
                       f"(--config.{key}=...)")


def sharded_attention(q: Array, k: Array, v: Array, *, impl: str = "xla",
                      mesh: Optional[jax.sharding.Mesh] = None,
                      batch_axes: Sequence[str] = ("data", "fsdp"),
                      head_axis: Optional[str] = "tensor", strict: bool = True,
                      **kwargs) -> Array:
  """`attention` over a device mesh: kernels run per shard inside `jax.shard_map`.

  The batch is split over the mesh axes in `batch_axes` and the heads over `head_axis` (axes the
  mesh lacks are skipped); sequence and head dim stay whole on every device, so no collective is
  needed. `impl="xla"` (or `mesh=None`) calls `attention` directly and leaves partitioning to
  XLA. Usable inside `jax.jit`; differentiable exactly as the chosen `impl` is.

  Args:
    q, k, v: as in `attention`; B must divide by the product of the batch axes' sizes and H by
      the head axis' size.
    impl: implementation name.
    mesh: a `jax.sharding.Mesh` (or AbstractMesh); None = no shard_map.
    batch_axes: mesh axes the batch is split over.
    head_axis: mesh axis the heads are split over (None = heads replicated).
    strict: a batch or head count the mesh does not divide raises; False calls `attention`
      directly instead (no shard_map) for such shapes.
    **kwargs: forwarded to `attention` (scale, block_sizes, interpret, precision, mask, bias;
      mask and bias only with impl="xla").
  """
  if impl == "xla" or mesh is None:
    return attention(q, k, v, impl=impl, **kwargs)
  if kwargs.get("mask") is not None or kwargs.get("bias") is not None:
    raise NotImplementedError("sharded_attention passes mask/bias only with impl='xla'")
  names = tuple(mesh.axis_names)
  sizes = dict(zip(names, mesh.axis_sizes))
  b_axes = tuple(a for a in batch_axes if a in names)
  h_axis = head_axis if head_axis in names else None
  n_b = int(np.prod([sizes[a] for a in b_axes])) if b_axes else 1
  n_h = sizes[h_axis] if h_axis else 1
  if q.shape[0] % n_b or q.shape[2] % n_h:
    if not strict:
      return attention(q, k, v, impl=impl, **kwargs)
    raise ValueError(f"sharded_attention: batch {q.shape[0]} must divide by {n_b} (axes "
                     f"{b_axes}) and heads {q.shape[2]} by {n_h} (axis {h_axis!r})")
  if kwargs.get("platform") is None:
    kwargs["platform"] = _mesh_platform(mesh)
  spec = P(b_axes if b_axes else None, None, h_axis, None)
  fn = functools.partial(attention, impl=impl, **kwargs)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def _mesh_platform(mesh) -> str:
  """The platform of a mesh's devices ('cpu', 'gpu', 'tpu'); default backend if unknown."""
  devices = None if isinstance(mesh, jax.sharding.AbstractMesh) else getattr(mesh, "devices",
                                                                             None)
  if devices is not None and getattr(devices, "size", 0):
    platform = np.asarray(devices).flat[0].platform
  else:
    abstract = getattr(mesh, "abstract_device", None)
    platform = getattr(abstract, "platform", None) or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform
