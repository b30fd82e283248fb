"""Shared pieces of the distribution-matching family (`dmd2`, `sid`, `vsd`).

Every method here trains a few-step generator ("student", a copy of the teacher) against two
scores of noised generator samples: the frozen teacher's ("real", optionally guided) and a
"fake" score network trained online by denoising the generator's own samples. What differs is
the generator's loss (DMD's normalised score difference under stop-gradient, SiD's
score-identity loss with gradients through both networks' inputs, VSD's sigma^2-weighted eps
difference) and the critic (full copy or LoRA; with or without a GAN head).

Pieces (pure functions; randomness is drawn up front by `*_draws(rng, ...)` so that tests can
hand the very same numbers to a PyTorch reference):

- `generator_times(process, K)`: the student's step times = the first K times of
  `process.timesteps(K)`, i.e. exactly the grid of the `consistency` sampler used for eval.
- `step_cond`: the batch's condition with a `null_prob` fraction dropped (the null class, or
  the all-zero prompt of DMD2-SDXL: `context.null_condition`), seen by every network of a
  step: the student learns the unconditional distribution, which unconditional sampling
  (eval's default) draws, besides the conditional ones. CFG (`guided`) uses the same null.
- `generate(ctx, net, params, cond, draws, num_steps=K)`: a generator sample. K = 1: x0_hat of
  the student at (prior noise, t_max). K > 1 (DMD2's backward simulation = few-step SiD's
  mixture of step outputs): per sample k ~ U{0..K-1}; k consistency steps are rolled out without
  gradient (denoise, re-noise to the next grid time with fresh noise), then one differentiable
  student step at (x_{t_k}, t_k). With k drawn per sample (not per batch as in the reference
  code) the batch is a mixture over k; the expected loss is the same.
- `guided(ctx, net, x_t, t, cond, scale, kind)`: classifier-free guidance u + s (c - u) of any
  prediction kind (x0 / eps / raw); identical in every kind since kinds are affine in each other
  at fixed (x_t, t). `scale` is a Python float (1: one conditional pass; 0: one null pass) or a
  per-sample (B,) array (SNOOPI's random scale). Unconditional networks ignore it.
- `fake_loss`: the fake score's denoising loss on stop-gradient generator samples, in the
  teacher's own parameterisation and time proposal (the loss the teacher was trained with), with
  label dropout and optional guided-output training (SiD-LSG's kappa_1; 0 = Zero-CFG's null-only).
- `gan_logits` / the "gan_head" model: a small head on an intermediate feature of the fake
  network (`return_features`), DMD2's classifier branch.
- `window_t`: a time uniform in [lo, hi] as fractions of the process's [t_min, t_max] (DMD's
  2%-98% window), floored onto discrete lattices.
"""
from __future__ import annotations

from typing import Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill import processes as procs
from distill.context import cond_from_batch, conditional, null_condition, to_kind
from distill.objective import Phase
from distill.objectives.denoise import prediction_space_weight
from models.registry import register_model

Array = jax.Array
Scale = Union[float, Array]

STUDENT, TEACHER, FAKE, HEAD = "student", "teacher", "fake_score", "gan_head"


def per_example_mean(x: Array) -> Array:
  """Mean over every axis but the batch: (B, ...) -> (B,)."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def per_example_sum(x: Array) -> Array:
  """Sum over every axis but the batch: (B, ...) -> (B,)."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def bcast(a: Array, x: Array) -> Array:
  """(B,) -> (B, 1, ..., 1) against x."""
  return procs.expand_like(a, x)


# --------------------------------------------------------------------------------------------
# Times
# --------------------------------------------------------------------------------------------


def window_t(process, rng: Array, shape, lo: float, hi: float) -> Array:
  """t ~ U[t_min + lo (t_max - t_min), t_min + hi (t_max - t_min)] (floored on lattices)."""
  span = process.t_max - process.t_min
  u = jax.random.uniform(rng, tuple(shape), jnp.float32, lo, hi)
  return process.floor_time(process.t_min + span * u)


def generator_times(process, num_steps: int) -> np.ndarray:
  """The K step times of a K-step student: the consistency sampler's grid without its end."""
  return np.asarray(process.timesteps(num_steps), np.float32)[:num_steps]


# --------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------


def is_static(scale) -> bool:
  """A Python / numpy number (decided at trace time), not a traced array."""
  return isinstance(scale, (int, float, np.number))


def guided(ctx, net: str, x_t: Array, t, cond: Mapping, scale: Scale, kind: str = "x0", *,
           params=None, feature_block: Optional[int] = None):
  """CFG u + scale (c - u) of network `net` in prediction `kind` ("raw": its own output).

  A static scale of 1 makes one conditional pass and 0 one null pass; otherwise the conditional
  and null passes run as one call on a doubled batch. The null condition is
  `context.null_condition` (the null class; zero prompt embeddings). Without a condition to drop
  (no classes, no prompt) one plain pass whatever the scale.

  With `feature_block` it returns (prediction, features): the network's features after that
  block (`return_features`) from the same forward, the conditional pass's where both run (the
  null pass's at a static scale 0): what SiDA's discriminator reads.
  """
  info = ctx.nets[net]
  b = x_t.shape[0]
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))

  def out(x, tt, c):
    if feature_block is None:
      raw, feats = ctx.apply(net, x, tt, c, params=params), None
    else:
      raw, f = ctx.apply(net, x, tt, c, params=params, return_features=(feature_block,))
      feats = f[feature_block]
    return (raw if kind == "raw" else to_kind(info, raw, kind, x, tt)), feats

  def result(pred, feats):
    return pred if feature_block is None else (pred, feats)

  if not conditional(info, cond):
    return result(*out(x_t, t, cond))
  null = null_condition(info, cond)
  if is_static(scale) and float(scale) == 1.0:
    return result(*out(x_t, t, cond))
  if is_static(scale) and float(scale) == 0.0:
    return result(*out(x_t, t, null))
  both, feats = out(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                    jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u]), dict(cond),
                                           null))
  c, u = both[:b], both[b:]
  s = scale if is_static(scale) else bcast(jnp.asarray(scale, jnp.float32), x_t)
  return result(u + s * (c - u), None if feats is None else feats[:b])


def null_cond(ctx, net: str, cond: Mapping) -> dict:
  """`cond` with the condition dropped (`context.null_condition`; unchanged if none)."""
  return null_condition(ctx.nets[net], cond)


# --------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------


def generator_draws(process, rng: Array, shape: tuple, num_steps: int,
                    null_prob: float = 0.0) -> dict:
  """Noise of one generator call: prior z; for K > 1 the per-sample step k and re-noising; with
  null_prob > 0 the mask of samples whose label becomes the null class (see `step_cond`)."""
  k_z, k_k, k_n, k_c = jax.random.split(rng, 4)
  draws = {"z": process.prior(k_z, shape)}
  if null_prob > 0:
    draws["null"] = jax.random.bernoulli(k_c, null_prob, (shape[0],))
  if num_steps > 1:
    draws["k"] = jax.random.randint(k_k, (shape[0],), 0, num_steps)
    draws["renoise"] = jax.random.normal(k_n, (num_steps - 1,) + tuple(shape), jnp.float32)
  return draws


def step_cond(ctx, batch: Mapping, gen_draws: Mapping, net: str = STUDENT) -> dict:
  """The conditioning of one step: the batch's, with the labels of `gen_draws["null"]` samples
  replaced by the null class. Generator, teacher, fake score and head all see it, so the
  student learns the unconditional (null-label) distribution too: what unconditional sampling
  (the default of eval) draws from. Without the mask (null_prob = 0) the batch's cond."""
  cond = cond_from_batch(batch)
  if "null" in gen_draws:
    cond = null_condition(ctx.nets[net], cond, where=gen_draws["null"])
  return cond


def generator_input(ctx, net: str, params, cond: Mapping, draws: Mapping,
                    num_steps: int) -> tuple[Array, Array]:
  """(x_in, t_in) of the differentiable student step (see the module docstring); no gradient."""
  process = ctx.nets[net].process
  times = generator_times(process, num_steps)
  z = draws["z"]
  b = z.shape[0]
  t_in = jnp.full((b,), times[0], jnp.float32)
  if num_steps == 1:
    return z, t_in
  frozen = jax.lax.stop_gradient(params)
  k = draws["k"]
  x, x_in = z, z
  for i in range(num_steps - 1):
    x0 = ctx.x0(net, x, times[i], cond, params=frozen)
    alpha, sigma = process.alpha_sigma(times[i + 1])
    x = alpha * x0 + sigma * draws["renoise"][i]
    pick = k == i + 1
    x_in = jnp.where(bcast(pick, x), x, x_in)
    t_in = jnp.where(pick, times[i + 1], t_in)
  return jax.lax.stop_gradient(x_in), t_in


def generate(ctx, net: str, params, cond: Mapping, draws: Mapping, num_steps: int = 1) -> Array:
  """A generator sample x_g = x0_hat_student(x_in, t_in) (differentiable w.r.t. `params`)."""
  x_in, t_in = generator_input(ctx, net, params, cond, draws, num_steps)
  return ctx.x0(net, x_in, t_in, cond, params=params)


# --------------------------------------------------------------------------------------------
# The fake score's denoising loss
# --------------------------------------------------------------------------------------------


def fake_draws(process, rng: Array, shape: tuple, label_dropout: float) -> dict:
  """t from the process's training proposal, eps, and the label-dropout mask."""
  k_t, k_e, k_d = jax.random.split(rng, 3)
  return {"t": process.sample_t(k_t, (shape[0],)),
          "eps": jax.random.normal(k_e, shape, jnp.float32),
          "drop": jax.random.bernoulli(k_d, label_dropout, (shape[0],))}


def fake_loss(ctx, net: str, params, x0: Array, cond: Mapping, draws: Mapping, *,
              weighting: str = "none", train_guidance: float = 1.0,
              feature_block: Optional[int] = None):
  """Denoising loss of the fake score on (stop-gradient) samples x0; returns (loss, mse).

  x_t = alpha x0 + sigma eps; the squared error of the network's prediction (its own kind,
  guided with `train_guidance` when != 1, labels dropped to null where `draws["drop"]`) against
  the kind's target, weighted by `weighting` as in the `denoise` objective.

  With `feature_block` it returns (loss, mse, extra): extra["features"] are the forward's
  features after that block, extra["weight"] the per-sample weights and extra["cond"] the
  (label-dropped) condition: SiDA's discriminator reads the same forward (`sida_critic_term`).
  """
  info = ctx.nets[net]
  process = info.process
  x0 = jax.lax.stop_gradient(x0)
  t, eps = draws["t"], draws["eps"]
  alpha, sigma = process.alpha_sigma(t)
  alpha, sigma = bcast(alpha, x0), bcast(sigma, x0)
  x_t = alpha * x0 + sigma * eps
  cond = null_condition(info, cond, where=draws["drop"])
  pred = guided(ctx, net, x_t, t, cond, train_guidance, "raw", params=params,
                feature_block=feature_block)
  if feature_block is not None:
    pred, feats = pred
  target = procs.encode(x0, eps, info.prediction, alpha, sigma)
  per = per_example_mean(jnp.square(pred - target))
  w = prediction_space_weight(process, t, weighting, info.prediction)
  if feature_block is None:
    return jnp.mean(w * per), jnp.mean(per)
  extra = {"features": feats, "weight": jnp.broadcast_to(w, per.shape), "cond": cond}
  return jnp.mean(w * per), jnp.mean(per), extra


# --------------------------------------------------------------------------------------------
# GAN head on the fake network's features (DMD2's classifier branch)
# --------------------------------------------------------------------------------------------


@register_model("gan_head")
class GanHead(nn.Module):
  """Logit of "real" from a fake-network feature h (B, feature_dim):
  LayerNorm -> Dense(hidden) -> SiLU -> Dense(1). Token or spatial features (B, ..., feature_dim),
  e.g. a DiT block's (B, L, D), get a logit per token, averaged over the tokens (a patch
  discriminator). Called as (x, timestep, features=h) -> (B,);
  x and timestep only fix the batch (the feature already carries time and class). Without
  `features` (the engine's init) it reads zeros of width `feature_dim`."""

  feature_dim: int = 128
  hidden: int = 128

  @nn.compact
  def __call__(self, x, timestep, class_labels=None, *, features=None):
    del timestep, class_labels
    h = jnp.zeros((x.shape[0], self.feature_dim), jnp.float32) if features is None else features
    if h.shape[-1] != self.feature_dim:
      raise ValueError(f"config key 'objective.gan_feature_dim': the head reads features of "
                       f"width {self.feature_dim}, the fake network gives {h.shape[-1]}")
    h = nn.LayerNorm(name="norm", scale_init=nn.with_logical_partitioning(
        nn.initializers.ones_init(), ("norm",)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ("norm",)))(h)
    dense = lambda n, axes, name: nn.Dense(
        n, name=name, kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))
    h = nn.silu(dense(self.hidden, ("embed", "mlp"), "fc1")(h))
    logits = dense(1, ("mlp", None), "fc2")(h)[..., 0]
    return logits.reshape(logits.shape[0], -1).mean(axis=1)


def critic_draws(process, rng, shape, *, num_steps, null_prob, label_dropout, gan_window,
                 real_shape=None):
  """Randomness of one critic step (dmd2, sid): generator noise, fake-loss draws, GAN noising
  of the fake and the real samples (`real_shape`: the real images', from another stream)."""
  k_g, k_f, k_d1, k_d2 = jax.random.split(rng, 4)
  return {"gen": generator_draws(process, k_g, shape, num_steps, null_prob),
          "fake": fake_draws(process, k_f, shape, label_dropout),
          "gan_fake": gan_draws(process, k_d1, shape, *gan_window),
          "gan_real": gan_draws(process, k_d2, real_shape or shape, *gan_window)}


def gan_draws(process, rng: Array, shape: tuple, lo: float, hi: float) -> dict:
  """GAN noising of one sample set: t_D on the window and its noise."""
  k_t, k_e = jax.random.split(rng)
  return {"t": window_t(process, k_t, (shape[0],), lo, hi),
          "eps": jax.random.normal(k_e, shape, jnp.float32)}


def gan_logits(ctx, x0: Array, cond: Mapping, draws: Mapping, *, feature_block: int,
               fake_params=None, head_params=None, fake: str = FAKE, head: str = HEAD) -> Array:
  """Head logits of x0 noised to draws["t"] (the fake network read at its `feature_block`)."""
  info = ctx.nets[fake]
  alpha, sigma = info.process.alpha_sigma(draws["t"])
  x_t = bcast(alpha, x0) * x0 + bcast(sigma, x0) * draws["eps"]
  timestep = info.process.timestep(draws["t"])
  _, feats = ctx.call(fake, x_t, timestep, **dict(cond or {}), params=fake_params,
                      return_features=(feature_block,))
  return ctx.call(head, x_t, timestep, params=head_params, features=feats[feature_block])


def gan_generator_term(ctx, x, cond, draws, *, feature_block: int) -> Array:
  """Non-saturating generator loss mean softplus(-D(x noised)); gradient through the fake
  network's input only (its and the head's params are ctx's)."""
  return jnp.mean(jax.nn.softplus(-gan_logits(ctx, x, cond, draws, feature_block=feature_block)))


def gan_critic_term(trainable, ctx, x_fake, x_real, cond, draws_fake, draws_real, *,
                    feature_block: int, cond_real: Optional[Mapping] = None
                    ) -> tuple[Array, dict]:
  """mean softplus(D(sg x_fake)) + mean softplus(-D(x_real)), each noised independently; the
  fake network's and head's params are the trainable ones (both get gradients). The real
  samples are read under `cond_real` (their own captions or labels, from a real-image stream)
  or, without it, under the fakes' `cond`."""
  kw = dict(feature_block=feature_block, fake_params=trainable[FAKE],
            head_params=trainable[HEAD])
  lf = gan_logits(ctx, jax.lax.stop_gradient(x_fake), cond, draws_fake, **kw)
  lr = gan_logits(ctx, x_real, cond if cond_real is None else cond_real, draws_real, **kw)
  l_d = jnp.mean(jax.nn.softplus(lf)) + jnp.mean(jax.nn.softplus(-lr))
  return l_d, {"d": l_d, "p_real": jnp.mean(jax.nn.sigmoid(lr)),
               "p_fake": jnp.mean(jax.nn.sigmoid(lf))}


# --------------------------------------------------------------------------------------------
# SiDA's discriminator: the fake network's own encoder (no parameters of its own)
# --------------------------------------------------------------------------------------------


def encoder_logits(features: Array) -> Array:
  """SiDA's discriminator logits: the channel mean of the fake network's features (its
  "encoder output" at `gan_feature_block`), one logit per token / position: (B, ...)."""
  return jnp.mean(features.astype(jnp.float32), axis=-1)


def sida_critic_term(ctx, fake_params, x_real: Array, draws: Mapping, extra: Mapping, *,
                     feature_block: int, cond_real: Optional[Mapping] = None,
                     real_stream: str = "") -> tuple[Array, dict]:
  """SiDA's discriminator loss mean_b(w_b) * 1/2 [BCE(D(x_real), 1) + BCE(D(x_g), 0)].

  D(x_g) comes from the fake score's own denoising forward (`fake_loss(..., feature_block)`'s
  `extra`); x_real is noised with the same t and eps and read under the same condition (or its
  own, `cond_real`, when it comes from the real-image stream `real_stream`). Each BCE is a mean
  over batch and positions; w_b are the fake loss's per-sample weights (1 for its kind's own
  MSE; EDM's lambda(sigma) with that weighting), and as in the official code their batch mean
  scales the batch-mean BCE.
  """
  info = ctx.nets[FAKE]
  if x_real.shape != draws["eps"].shape:
    raise ValueError(
        f"config key 'data_streams.{real_stream}.batch_size': SiDA noises the real images with "
        f"the generator samples' t and eps, so the stream's batch must be the train batch: "
        f"real images {tuple(x_real.shape)}, generator samples {tuple(draws['eps'].shape)}")
  alpha, sigma = info.process.alpha_sigma(draws["t"])
  x_real = x_real.astype(jnp.float32)
  x_t = bcast(alpha, x_real) * x_real + bcast(sigma, x_real) * draws["eps"]
  _, feats = ctx.apply(FAKE, x_t, draws["t"], extra["cond"] if cond_real is None else cond_real,
                       params=fake_params, return_features=(feature_block,))
  lr = encoder_logits(feats[feature_block])
  lf = encoder_logits(extra["features"])
  bce = 0.5 * (jnp.mean(jax.nn.softplus(-lr)) + jnp.mean(jax.nn.softplus(lf)))
  l_d = jnp.mean(extra["weight"]) * bce
  return l_d, {"d": l_d, "p_real": jnp.mean(jax.nn.sigmoid(lr)),
               "p_fake": jnp.mean(jax.nn.sigmoid(lf))}


def sida_generator_term(features: Array, w: Array, data_size: int) -> Array:
  """SiDA's generator GAN loss: BCE(clip(D(x_t), -10, 10), 1) (a mean over batch and
  positions) times mean_b 1/w_b (SiD's per-sample normaliser, stop-gradient) and the number of
  data dimensions, the official code's scaling. `features`: the fake network's features from
  the forward that gave y_fake in the SiD loss (same x_t)."""
  logits = jnp.clip(encoder_logits(features), -10.0, 10.0)
  return data_size * jnp.mean(1.0 / w) * jnp.mean(jax.nn.softplus(-logits))


# --------------------------------------------------------------------------------------------
# Builder helpers
# --------------------------------------------------------------------------------------------


def check_window(cfg, lo: str, hi: str):
  """Raises one line naming the key unless 0 <= lo < hi <= 1."""
  if not 0.0 <= float(cfg[lo]) < float(cfg[hi]) <= 1.0:
    raise ValueError(f"config key 'objective.{lo}': need 0 <= {lo} < {hi} <= 1, got "
                     f"{cfg[lo]} and {cfg[hi]}")


def check_positive_int(cfg, key: str):
  """Raises one line naming the key unless it is >= 1."""
  if int(cfg[key]) < 1:
    raise ValueError(f"config key 'objective.{key}': must be >= 1, got {cfg[key]}")


def ttur_phases(critic, generator, trains_critic, k: int, generator_start: int = 0,
                real_stream: str = "") -> tuple[Phase, Phase]:
  """Critic every step; generator every k-th step, after that step's critic update (from step
  `generator_start` on: SiDA trains the critic alone first). With `real_stream` the critic
  also reads that data stream (its GAN's real images, `batch[real_stream]`)."""
  data = ("train", real_stream) if real_stream else "train"
  return (Phase("critic", loss=critic, trains=trains_critic, every=1, data=data),
          Phase("generator", loss=generator, trains=(STUDENT,), every=k, offset=k - 1,
                start=int(generator_start)))


def student_ema(decay: float) -> dict:
  """The student's `eval` EMA role when decay > 0 (else none)."""
  return {STUDENT: {"eval": float(decay)}} if float(decay) > 0 else {}



# The fake score as a LoRA adapter over the frozen teacher's weights (a memory option: no second
# full copy, optimizer state for the adapter only), rank 0: a full trainable copy.
FAKE_LORA_DEFAULTS = {
    "fake_lora_rank": 0,
    "fake_lora_pattern": r"block_\d+",   # regex over kernel paths (configs/t2i: UNet modules)
    "fake_lora_alpha": 0.0,               # multiplier alpha / rank (0: alpha = rank)
}


def fake_network(rank: int, pattern: str, alpha: float = 0.0):
  """The "fake_score" Network: a copy of the teacher, or with rank > 0 a LoRA over it."""
  from distill.objective import LoRA, Network
  if rank < 0:
    raise ValueError(f"config key 'objective.fake_lora_rank' / 'lora_rank': expected >= 0 (0: "
                     f"no LoRA), got {rank}")
  if rank == 0:
    return Network(FAKE, init=TEACHER)
  return Network(FAKE, init=TEACHER, base=TEACHER,
                 adapter=LoRA(str(pattern), rank=int(rank), alpha=float(alpha) or None))


def fake_network_from(cfg):
  """`fake_network` from an objective config with FAKE_LORA_DEFAULTS' keys."""
  return fake_network(int(cfg.fake_lora_rank), cfg.fake_lora_pattern,
                      float(cfg.fake_lora_alpha))


def gan_head_network(cfg):
  """The "gan_head" Network (model "gan_head" reading the fake network's features)."""
  from distill.objective import Network
  return Network(HEAD, model="gan_head", init="random", backbone=FAKE,
                 kwargs={"feature_dim": int(cfg.gan_feature_dim), "hidden": int(cfg.gan_hidden)})


def critic_phase_loss(given, trainable, ctx, batch, rng, t, *, draw, real_stream="", **kw):
  """The "critic" phase loss of dmd2 and sid: the draws of `draw(process, rng, shape,
  real_shape=...)` (the real images' shape: the batch's, or its `real_stream`'s), then
  `given(trainable, ctx, batch, draws, real_stream=..., **kw)`."""
  del t
  real_shape = real_images(batch, real_stream)[0].shape
  draws = draw(ctx.nets[STUDENT].process, rng, batch["x"].shape, real_shape=real_shape)
  return given(trainable, ctx, batch, draws, real_stream=real_stream, **kw)


def real_stream_from(cfg, gan: bool) -> str:
  """`objective.real_stream`: the data stream of the GAN's real images ("" = the train
  stream's own images); one line when set without a GAN term (nothing would read it)."""
  stream = str(cfg.real_stream or "")
  if stream and not gan:
    raise ValueError(f"config key 'objective.real_stream': {stream!r} holds the GAN's real "
                     "images, but the GAN term is off (objective.gan_weight = 0)")
  if stream == "train":
    return ""
  return stream


def real_images(batch: Mapping, real_stream: str) -> tuple[Array, Optional[dict]]:
  """(real images, their condition) for the discriminator: `batch[real_stream]`'s images and
  own condition (its captions or labels, as the data gives them), or without a real stream the
  phase batch's images and None (they are read under the fakes' condition)."""
  if not real_stream:
    return batch["x"], None
  real = batch[real_stream]
  return real["x"], cond_from_batch(real)


GAN_DEFAULTS = {
    "real_stream": "",            # data stream of the real images ("": the train batch's);
                                  # e.g. "real" = data_streams.real, when `data` is prompts
    "gan_d_weight": 1e-2,         # discriminator loss weight in the critic (DMD2: 1e-2)
    "gan_t_min_frac": 0.0,        # GAN noising window t_D, fractions of [t_min, t_max]
    "gan_t_max_frac": 1.0,
    "gan_feature_block": -1,      # fake-network block whose output the head reads
    "gan_feature_dim": 128,       # that feature's width (the fake network's hidden size)
    "gan_hidden": 128,            # the head's hidden width
}
