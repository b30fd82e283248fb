"""The multi-network train state: one sharded pytree.

TrainState(step, rng, params: {name: tree}, opt_state: {name: tree}, ema: {name: {role: tree}},
           model_state: {name: tree}, stage, skipped)

`params` holds every network a phase trains (and LoRA adapters); frozen networks (teachers) live
outside the state, are loaded once and recorded by reference, never re-saved. `skipped` counts
consecutive non-finite updates (the loop stops the run past `train.max_skipped_steps`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
  step: jax.Array
  rng: jax.Array
  params: dict
  opt_state: dict
  ema: dict
  model_state: dict
  stage: jax.Array
  skipped: jax.Array
  skipped_total: jax.Array


def new_state(rng, params: dict, opt_state: dict, ema: dict, model_state: dict) -> TrainState:
  # Distinct buffers for every counter: the whole state is donated to each step.
  z = lambda: jnp.zeros((), jnp.int32)
  return TrainState(step=z(), rng=rng, params=params, opt_state=opt_state, ema=ema,
                    model_state=model_state, stage=z(), skipped=z(), skipped_total=z())


def tree_bytes(tree: Any) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
             if hasattr(x, "dtype"))
