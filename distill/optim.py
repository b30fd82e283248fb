"""One optax optimizer per trained network, built from `optim` (and `optim.networks.<name>`).

The learning rate is an injected hyperparameter set every step from a schedule of the stage
step (`t.stage_step`), so progressive stages anneal per stage and resets are explicit.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax

OPTIMIZER_KEYS = ("name", "lr", "b1", "b2", "eps", "weight_decay", "warmup_steps", "schedule",
                  "grad_clip", "grad_clip_value", "param_dtype")


def network_settings(optim_cfg: Mapping[str, Any], name: str) -> dict:
  """The optimizer settings of one network: the defaults with its overrides applied."""
  settings = {k: optim_cfg[k] for k in OPTIMIZER_KEYS}
  overrides = optim_cfg.get("networks", {}).get(name, {}) if optim_cfg.get("networks") else {}
  for k, v in dict(overrides).items():
    if k not in settings:
      raise ValueError(f"unknown config key 'optim.networks.{name}.{k}'")
    settings[k] = v
  return settings


def _base_tx(name: str, learning_rate, s: Mapping[str, Any]) -> optax.GradientTransformation:
  if name == "adam":
    return optax.adam(learning_rate, b1=s["b1"], b2=s["b2"], eps=s["eps"])
  if name == "adamw":
    return optax.adamw(learning_rate, b1=s["b1"], b2=s["b2"], eps=s["eps"],
                       weight_decay=s["weight_decay"])
  if name == "sgd":
    return optax.sgd(learning_rate, momentum=s["b1"] or None)
  if name == "lion":
    return optax.lion(learning_rate, b1=s["b1"], b2=s["b2"], weight_decay=s["weight_decay"])
  raise ValueError(f"config key 'optim.name': unknown optimizer {name!r} "
                   "(known: adam, adamw, sgd, lion)")


def make_optimizer(s: Mapping[str, Any]) -> optax.GradientTransformation:
  """clip by value -> clip by global norm -> optimizer, with the learning rate injected (set
  each step by `set_lr`)."""
  def build(learning_rate):
    parts = []
    if s["grad_clip_value"] and s["grad_clip_value"] > 0:
      parts.append(optax.clip(s["grad_clip_value"]))   # element-wise (SiDA's fake network: 1)
    if s["grad_clip"] and s["grad_clip"] > 0:
      parts.append(optax.clip_by_global_norm(s["grad_clip"]))
    parts.append(_base_tx(s["name"], learning_rate, s))
    return optax.chain(*parts)
  return optax.inject_hyperparams(build)(learning_rate=s["lr"])


def make_schedule(s: Mapping[str, Any], stage_steps: int) -> Callable[[Any], Any]:
  """lr as a function of the stage step: linear warm-up, then constant / cosine / linear."""
  lr, warm = float(s["lr"]), int(s["warmup_steps"])
  decay_steps = max(1, stage_steps - warm)
  kind = s["schedule"]
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps)
  elif kind == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  else:
    raise ValueError(f"config key 'optim.schedule': unknown schedule {kind!r} "
                     "(known: constant, cosine, linear)")
  if warm <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def set_lr(opt_state, lr):
  """Returns opt_state with its injected learning rate replaced."""
  hp = dict(opt_state.hyperparams)
  hp["learning_rate"] = jnp.asarray(lr, hp["learning_rate"].dtype)
  return opt_state._replace(hyperparams=hp)
