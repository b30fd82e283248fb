"""Functional LoRA over parameter trees (no module changes; works for any Linen model).

    lora = lora_init(params, r"attn/(to_q|to_k|to_v|to_out)", rank=16, rng=key)
    merged = lora_merge(params, lora, alpha=16)        # kernel + (A @ B) * alpha / rank * scale
    out = model.apply({"params": merged}, x, t, y)     # differentiate w.r.t. `lora` only

Selection: `pattern` is a regex searched (`re.search`) in each parameter's "/"-joined path, e.g.
"transformer_blocks_3/attn/to_q/kernel". Only leaves named `kernel` are adapted: Dense kernels
(in, out) and Conv kernels (kh, kw, in, out); 3D / 5D kernels are the same with a leading
stacked-layers axis (`nn.scan`), which gets one independent adapter per layer.

Layout of the LoRA tree: it mirrors the base tree down to each adapted kernel, where the leaf is
replaced by `{"lora_A": A, "lora_B": B}` with A of shape (..., in, r) for Dense, (..., kh, kw,
in, r) for Conv (PEFT's lora_A conv), and B (..., r, out) (PEFT's 1x1 lora_B). Initialisation
follows PEFT: A ~ kaiming-uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in)), B = 0, so a fresh adapter
leaves the model unchanged. The tree holds only arrays (optax/orbax friendly); the scaling
`alpha / rank` is static configuration passed to `lora_merge` (alpha defaults to rank).
"""
from __future__ import annotations

import functools
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Mapping[str, Any]

LORA_A, LORA_B = "lora_A", "lora_B"
_PLAIN_NDIM = {2: "dense", 4: "conv"}
_STACKED_NDIM = {3: "dense", 5: "conv"}


def _join(path: tuple) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _kernels(params: Params) -> list[tuple[tuple, Any]]:
  """(path, kernel) for every leaf named `kernel`, sorted by path."""
  flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  out = [(tuple(getattr(k, "key", k) for k in path), leaf) for path, leaf in flat
         if getattr(path[-1], "key", None) == "kernel"]
  return sorted(out, key=lambda pl: _join(pl[0]))


def lora_targets(params: Params, pattern: str) -> list[str]:
  """The "/"-joined paths of the kernels `pattern` selects (sorted)."""
  regex = re.compile(pattern)
  return [_join(p) for p, k in _kernels(params)
          if regex.search(_join(p)) and k.ndim in (*_PLAIN_NDIM, *_STACKED_NDIM)]


def _set(tree: dict, path: tuple, value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def lora_init(params: Params, pattern: str, rank: int, rng: jax.Array,
              dtype: Optional[Any] = None) -> dict:
  """LoRA parameters (A random, B zero) for every kernel of `params` that `pattern` selects."""
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  selected = set(lora_targets(params, pattern))
  if not selected:
    raise ValueError(f"LoRA pattern {pattern!r} selects no Dense/Conv kernel")
  specs = []  # (path, index, kernel shape, dtype)
  for i, (path, kernel) in enumerate(_kernels(params)):
    if _join(path) in selected:
      specs.append((path, i, tuple(kernel.shape), jnp.dtype(dtype or kernel.dtype)))
  entries = _draw_adapters(rng, tuple((i, s, d) for _, i, s, d in specs), rank)
  lora: dict = {}
  for (path, *_), entry in zip(specs, entries):
    _set(lora, path, entry)
  return lora


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_adapters(rng, specs, rank):
  """One compiled draw for all adapters: A ~ U(+-1/sqrt(fan_in)) (PEFT), B = 0."""
  out = []
  for index, shape, dt in specs:
    lead = shape[:1] if len(shape) in _STACKED_NDIM else ()
    fan_shape = shape[len(lead):-1]
    bound = 1.0 / math.prod(fan_shape)**0.5
    a = jax.random.uniform(jax.random.fold_in(rng, index), lead + fan_shape + (rank,),
                           jnp.float32, -bound, bound)
    out.append({LORA_A: a.astype(dt), LORA_B: jnp.zeros(lead + (rank, shape[-1]), dt)})
  return out


def lora_delta(entry: Mapping[str, jax.Array], kernel_shape: tuple) -> jax.Array:
  """A @ B reshaped to the kernel's shape (float32 or wider), per stacked layer if any."""
  a, b = entry[LORA_A], entry[LORA_B]
  n_lead = b.ndim - 2  # 1 with a stacked-layers axis
  dt = jnp.promote_types(a.dtype, jnp.float32)
  a2 = a.reshape(a.shape[:n_lead] + (-1, a.shape[-1])).astype(dt)
  return jnp.matmul(a2, b.astype(dt)).reshape(kernel_shape)


def lora_scale(rank: int, alpha: Optional[float] = None, scale: float = 1.0) -> float:
  """The multiplier of A @ B: `scale * alpha / rank` (alpha defaults to rank)."""
  return scale * (float(rank) if alpha is None else float(alpha)) / rank


def lora_merge(base_params: Params, lora_params: Params, scale: float = 1.0,
               alpha: Optional[float] = None) -> dict:
  """The merged view: every adapted kernel + (A @ B) * scale * alpha / rank; others shared."""
  def merge(base, lora, path):
    if not isinstance(lora, Mapping):
      raise ValueError(f"LoRA tree leaf at {_join(path)} is not an adapter entry")
    if set(lora) == {LORA_A, LORA_B}:
      rank = lora[LORA_A].shape[-1]
      delta = lora_delta(lora, base.shape) * lora_scale(rank, alpha, scale)
      return (base + delta).astype(base.dtype)
    if not isinstance(base, Mapping):
      raise ValueError(f"LoRA tree has {_join(path)} but the base params have a leaf there")
    missing = sorted(set(lora) - set(base))
    if missing:
      raise ValueError(f"LoRA entries not in the base params: "
                       f"{', '.join(_join(path + (m,)) for m in missing)}")
    out = dict(base)
    for k, v in lora.items():
      out[k] = merge(base[k], v, path + (k,))
    return out
  return merge(nn.meta.unbox(base_params), lora_params, ())


def lora_dense(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array],
               entry: Mapping[str, jax.Array], scale: float = 1.0) -> jax.Array:
  """Unmerged Dense: x @ kernel + bias + (x @ A) @ B * scale (the full multiplier: lora_scale)."""
  y = x @ kernel + (x @ entry[LORA_A]) @ entry[LORA_B] * scale
  return y if bias is None else y + bias


def lora_param_count(lora_params: Params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(lora_params))
