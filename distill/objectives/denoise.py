"""`denoise`: teacher training and fine-tuning by denoising (eps / x0 / v / flow matching).

The network predicts in its declared kind (`model.prediction`); the loss is the squared error
in that kind, times a weighting by name (distill.processes.WEIGHTINGS, expressed as weights of
the x0-space error and converted to the prediction space), with label dropout so the same
network serves conditional, unconditional and classifier-free-guided sampling.

    python -m launch.train --config configs/toy/teacher.py --workdir runs/toy_teacher

This module is the worked example of docs/engine.md (adding an objective): one builder, one
pure loss.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import processes as procs
from distill.context import cond_from_batch, null_condition
from distill.objective import Network, Objective, Phase, register_objective

DEFAULTS = {
    "weighting": "none",        # "none" = plain MSE of the prediction; else an x0-space weighting
    "label_dropout": 0.1,       # probability of dropping the condition (null class / null prompt)
    "init": "random",           # random | teacher (fine-tune the teacher's weights)
    # With init "teacher": train in the config's process / model.prediction instead of the
    # teacher's (e.g. a VP eps DiT fine-tuned into a dense-time flow model).
    "reparameterize": False,
    "ema_decay": 0.999,         # the `eval` EMA of the trained network
}


def prediction_space_weight(process, t, weighting: str, kind: str):
  """Per-example weight of the squared error in prediction space.

  "none" is the plain MSE of the prediction. Every other weighting w(t) is defined on the
  x0-space error (distill.processes.WEIGHTINGS) and carried into prediction space through
  ||pred - pred_hat||^2 = c_kind(t) ||x0 - x0_hat||^2, i.e. divided by `loss_factor`.
  """
  if weighting == "none":
    return jnp.ones_like(t)
  alpha, sigma = process.alpha_sigma(t)
  return procs.get_weighting(weighting)(process, t) / procs.loss_factor(kind, alpha, sigma)


def denoise_loss(trainable, ctx, batch, rng, t, *, net: str, weighting: str,
                 label_dropout: float):
  """Squared error of the network's prediction at a random noise level."""
  info = ctx.nets[net]
  process = info.process
  x0 = batch["x"]
  b = x0.shape[0]
  k_t, k_eps, k_drop = jax.random.split(rng, 3)
  tt = process.sample_t(k_t, (b,))
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  shape = (-1,) + (1,) * (x0.ndim - 1)
  alpha, sigma = process.alpha_sigma(tt)
  alpha, sigma = alpha.reshape(shape), sigma.reshape(shape)
  x_t = alpha * x0 + sigma * eps

  cond = null_condition(info, cond_from_batch(batch),
                        where=jax.random.bernoulli(k_drop, label_dropout, (b,)))

  pred = ctx.apply(net, x_t, tt, cond, params=trainable[net])
  target = procs.encode(x0, eps, info.prediction, alpha, sigma)
  per_example = jnp.mean(jnp.square(pred - target).reshape(b, -1), axis=1)
  w = prediction_space_weight(process, tt, weighting, info.prediction)
  loss = jnp.mean(w * per_example)
  return loss, {"mse": jnp.mean(per_example)}


@register_objective("denoise", defaults=DEFAULTS)
def build(cfg) -> Objective:
  net = "model"
  init = cfg.get("init", "random")
  if init not in ("random", "teacher"):
    raise ValueError(f"config key 'objective.init': expected 'random' or 'teacher', got {init!r}")
  loss = functools.partial(denoise_loss, net=net, weighting=cfg.weighting,
                           label_dropout=float(cfg.label_dropout))
  return Objective(
      networks=(Network(net, init=init, reparameterize=bool(cfg.get("reparameterize", False))),),
      phases=(Phase("denoise", loss=loss, trains=(net,)),),
      ema={net: {"eval": float(cfg.ema_decay)}},
      student=net, sampler="euler", evaluates_as="teacher")
