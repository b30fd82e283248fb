"""The fused attention primal + tangent kernel for TPU (Pallas Mosaic): `mosaic_jvp`.

The TPU counterpart of the Triton `pallas_jvp` kernel (models/attention.py registers both and
holds the formulas): one pass over key blocks with the online softmax computes O = softmax(S) V
and its tangent dO = (P o dS) V - rowsum(P o dS) o O + P dV, S = q k^T * scale,
dS = (dq k^T + q dk^T) * scale, without any L x L matrix in HBM.

TPU layout. Arrays arrive as (B, H, L, D) with L a multiple of the blocks and D a multiple of
128 (the lane width); the grid is (B, H, Lq / block_q, Lk / block_k), the key-block axis last
and sequential ("arbitrary"): per query block the running max m, the sums l = sum_j p_ij and
r = sum_j p_ij dS_ij (each lane-replicated, (block_q, 128)) and the accumulators acc = sum_j p_ij
v_j and tacc = sum_j p_ij (dS_ij v_j + dv_j) live in VMEM scratch across the key blocks, are
rescaled by exp(m_old - m_new) when the max moves, and are divided out at the last block. Keys
at index >= kv_len (padding) get a large negative logit, so p = 0 there.

Runs compiled on TPU, and on CPU in Pallas interpret mode (tests); `launch.aot` compiles it for
a TPU topology from a CPU host (tests/test_aot.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128
_TRANS_B = (((1,), (1,)), ((), ()))   # a (m, d) x b (n, d) -> (m, n)
_PV = (((1,), (0,)), ((), ()))        # p (m, n) x v (n, d) -> (m, d)
# A large finite negative logit (as models/attention.py's): exp(MASK - m) == 0, no inf - inf.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(*refs, scale: float, kv_len: int, tangent: bool):
  """One (batch, head, query block, key block) step: O (and dO with `tangent`) of the block."""
  if tangent:
    (q_ref, k_ref, v_ref, tq_ref, tk_ref, tv_ref, o_ref, to_ref,
     m_ref, l_ref, r_ref, acc_ref, tacc_ref) = refs
  else:
    q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, acc_ref = refs
  j = pl.program_id(3)
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  d_reps, k_reps = acc_ref.shape[1] // LANES, block_k // LANES
  f32 = jnp.float32
  dot = lambda a, b, dims: lax.dot_general(a, b, dims, preferred_element_type=f32)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, f32)
    l_ref[...] = jnp.zeros(l_ref.shape, f32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, f32)
    if tangent:
      r_ref[...] = jnp.zeros(r_ref.shape, f32)
      tacc_ref[...] = jnp.zeros(tacc_ref.shape, f32)

  q, k, v = q_ref[...], k_ref[...], v_ref[...]
  s = dot(q, k, _TRANS_B) * scale
  if kv_len % block_k:   # the last key block holds padding
    col = j * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    s = jnp.where(col < kv_len, s, _MASK_VALUE)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))   # (block_q, 128)
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(s - jnp.tile(m_new, (1, k_reps)))
  m_ref[...] = m_new
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  alpha_d = jnp.tile(alpha, (1, d_reps))
  acc_ref[...] = alpha_d * acc_ref[...] + dot(p.astype(v.dtype), v, _PV)
  if tangent:
    tq, tk, tv = tq_ref[...], tk_ref[...], tv_ref[...]
    ds = (dot(tq, k, _TRANS_B) + dot(q, tk, _TRANS_B)) * scale
    pds = p * ds             # 0 on padded keys (p = 0; k, tk are zero there, so ds is finite)
    r_ref[...] = alpha * r_ref[...] + jnp.sum(pds, axis=1, keepdims=True)
    tacc_ref[...] = (alpha_d * tacc_ref[...] + dot(pds.astype(v.dtype), v, _PV)
                     + dot(p.astype(tv.dtype), tv, _PV))

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    inv_l = 1.0 / l_ref[...]
    o = acc_ref[...] * jnp.tile(inv_l, (1, d_reps))
    o_ref[...] = o.astype(o_ref.dtype)
    if tangent:
      to = (tacc_ref[...] * jnp.tile(inv_l, (1, d_reps))
            - jnp.tile(r_ref[...] * inv_l, (1, d_reps)) * o)
      to_ref[...] = to.astype(to_ref.dtype)


def attention_bhld(q, k, v, tangents=None, *, scale: float, kv_len: int, block_q: int,
                   block_k: int, interpret: bool = False):
  """O (and with `tangents` = (tq, tk, tv), also dO) of padded (B, H, L, D) arrays.

  Lq must divide by block_q, Lk by block_k (a multiple of 128), D by 128; keys at index >=
  kv_len are masked out. Returns O, or (O, dO), in q's dtype."""
  b, h, lq, d = q.shape
  lk = k.shape[2]
  if lq % block_q or lk % block_k or block_k % LANES or d % LANES:
    raise ValueError(f"mosaic_jvp: padded shapes expected (Lq % {block_q}, Lk % {block_k}, "
                     f"block_k % {LANES}, D % {LANES} all 0), got q {q.shape}, k {k.shape}")
  tangent = tangents is not None
  q_spec = pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i, j: (bi, hi, i, 0))
  k_spec = pl.BlockSpec((None, None, block_k, d), lambda bi, hi, i, j: (bi, hi, j, 0))
  n_out = 2 if tangent else 1
  stats = [pltpu.VMEM((block_q, LANES), jnp.float32)] * (3 if tangent else 2)
  accs = [pltpu.VMEM((block_q, d), jnp.float32)] * n_out
  inputs = (q, k, v) + (tuple(t.astype(x.dtype) for t, x in zip(tangents, (q, k, v)))
                        if tangent else ())
  out = pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), kv_len=int(kv_len), tangent=tangent),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=0, grid=(b, h, lq // block_q, lk // block_k),
          in_specs=[q_spec, k_spec, k_spec] * (2 if tangent else 1),
          out_specs=[q_spec] * n_out, scratch_shapes=stats + accs),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)] * n_out,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mosaic_attention_jvp" if tangent else "mosaic_attention",
  )(*inputs)
  return tuple(out) if tangent else out[0]
