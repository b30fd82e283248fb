"""LADD: latent adversarial diffusion distillation with discriminator heads on the frozen
teacher's features (Sauer et al. 2024; SANA-Sprint's hybrid with sCM), as a piece any generator
objective can take on, and the objectives `ladd` and `scm_ladd`.

    python -m launch.train --config configs/toy/scm_ladd.py:gmm --workdir runs/toy_scm_ladd \
        --config.teacher.checkpoint=runs/toy_teacher_gmm_dense  # (teacher: see the config file)

The discriminator D: a sample x0 is re-noised at an EDM noise level sigma ~ exp(N(d_p_mean,
d_p_std^2)) (SANA-Sprint's t_D = arctan(sigma / sigma_d) in TrigFlow terms), x = x0 + sigma
eps, read in the teacher's own process (`wrappers.EDM_TIMES`: x_t = alpha_t x at the t of the
same signal-to-noise ratio), and the frozen teacher's block outputs at `feature_blocks` feed one
StyleGAN-T head each (models/heads.py, "ladd_heads", network "disc_heads"); the logits of every
token of every head are D's output. Only the heads train.

Generator term (added to the generator objective's loss with weight `adv_weight`; a second
student forward): the student's x0_hat from real data noised at t_G (t_G = t_max with
probability `max_time_prob`, else the student process's own proposal; or, with `num_steps` K,
one of the K-step sampler's times: the first with probability `max_time_prob`, the others
alike), re-noised as above; gradients reach the student through the teacher's *input*:

    hinge:    L_G = -mean D(x0_hat)            softplus:  L_G = mean softplus(-D(x0_hat))

Discriminator phase (on sg x0_hat from fresh draws and on the batch's real data, each re-noised
independently; `misaligned_pairs`: the real samples rolled by one along the batch are extra
fakes under the original conditioning):

    hinge:    L_D = 1/2 (mean relu(1 - D(real)) + mean relu(1 + D(fake)))
    softplus: L_D = 1/2 (mean softplus(-D(real)) + mean softplus(D(fake)))
    + r1_weight mean_b ||d sum D(real) / d features||^2    (R1 on the heads' inputs)

Schedule: `alternate` = SANA-Sprint's strict alternation (generator phase on even steps,
discriminator on odd ones, each its own batch); otherwise both every step, D after G.

- `with_ladd(objective, cfg, generator_phase)` adds the heads, the D phase and the generator
  term to any objective whose phase `generator_phase` trains the student.
- `ladd`: the pure adversarial distillation (the student, a copy of the teacher, trained by
  L_G alone), sampled with the `consistency` sampler.
- `scm_ladd`: SANA-Sprint: the `scm` objective (its keys) + LADD, adv_weight 0.5.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import wrappers
from distill.context import embeds_guidance
from distill.objective import Network, Objective, Phase, register_objective
from distill.objectives import scm
from distill.objectives.lcm import choice
from distill.objectives.matching import bcast, generator_times, step_cond

HEADS, STUDENT, TEACHER = "disc_heads", "student", "teacher"

LADD_DEFAULTS = {
    "feature_blocks": (-1,),      # teacher blocks whose outputs the heads read (SANA 1.6B:
                                  # (2, 8, 14, 19))
    "feature_dim": 128,           # their width (the teacher's hidden size)
    "virtual_bs": 8,              # BatchNormLocal's group of samples
    "spectral_norm": True,        # spectral normalisation of the heads' convs
    "adv_loss": "hinge",          # "hinge" or "softplus"
    "adv_weight": 0.5,            # weight of the generator's adversarial term
    "d_p_mean": -0.6,             # re-noising sigma = exp(N(d_p_mean, d_p_std^2))
    "d_p_std": 1.0,
    "max_time_prob": 0.5,         # P(t_G = t_max) of the generator input
    "misaligned_pairs": False,    # rolled real samples as extra fakes (SANA-Sprint's text case)
    "r1_weight": 0.0,             # R1 penalty on the heads' inputs (0: off)
    "alternate": True,            # G and D phases alternate step by step (SANA-Sprint)
}


# --------------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------------


def renoise_draws(rng, shape, p_mean: float, p_std: float) -> dict:
  """The discriminator's noising of one sample set: EDM sigma (B,) and eps."""
  k_s, k_e = jax.random.split(rng)
  return {"sigma": jnp.exp(p_mean + p_std * jax.random.normal(k_s, (shape[0],), jnp.float32)),
          "eps": jax.random.normal(k_e, shape, jnp.float32)}


def generator_input_times(process, rng, batch: int, max_time_prob: float, num_steps: int = 0):
  """t_G per sample: t_max with probability max_time_prob, else the process's proposal
  (num_steps = 0) or one of the other K-step sampler times, uniformly."""
  k_m, k_t = jax.random.split(rng)
  at_max = jax.random.bernoulli(k_m, max_time_prob, (batch,))
  if num_steps > 1:
    times = jnp.asarray(generator_times(process, num_steps))
    other = times[jax.random.randint(k_t, (batch,), 1, num_steps)]
  elif num_steps == 1:
    other = jnp.full((batch,), process.t_max, jnp.float32)
  else:
    other = process.sample_t(k_t, (batch,))
  return jnp.where(at_max, jnp.float32(process.t_max), other)


def sample_draws(process, rng, shape, *, max_time_prob: float, num_steps: int, p_mean: float,
                 p_std: float, null_prob: float = 0.0, guidance=None) -> dict:
  """One student sample and its re-noising: t_G, the input noise, D's noising, null mask; with
  `guidance` ((scales, sampling) of a student that embeds the CFG scale) its w, as sCM draws
  it."""
  k_t, k_n, k_d, k_c = jax.random.split(rng, 4)
  draws = {"t": generator_input_times(process, k_t, shape[0], max_time_prob, num_steps),
           "noise": jax.random.normal(k_n, shape, jnp.float32),
           "d": renoise_draws(k_d, shape, p_mean, p_std),
           "null": jax.random.bernoulli(k_c, null_prob, (shape[0],))}
  if guidance is not None:
    draws["w"] = scm.draw_guidance(jax.random.fold_in(rng, 4), shape[0], *guidance)
  return draws


# --------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------


def student_x0(ctx, params, x_real, cond, draws, student: str = STUDENT):
  """The student's x0_hat from the real data noised at draws["t"] in its own process (pure
  noise where t = t_max on processes with alpha(t_max) = 0)."""
  process = ctx.nets[student].process
  alpha, sigma = process.alpha_sigma(draws["t"])
  x_t = bcast(alpha, x_real) * x_real + bcast(sigma, x_real) * draws["noise"]
  extras = ctx.guidance_inputs(student, draws["w"]) if "w" in draws else {}
  return ctx.x0(student, x_t, draws["t"], cond, params=params, **extras)


def teacher_features(ctx, x0, cond, draws, *, blocks: tuple, teacher: str = TEACHER, w=None):
  """The frozen teacher's block outputs at x0 + sigma eps, read in its own process. A teacher
  that takes the CFG scale as its input (SANA `guidance_embeds`) reads w (B,): the scale the
  student sampled x0 at, or 1 (no guidance) where None."""
  process = ctx.nets[teacher].process
  sigma = draws["sigma"]
  x_t, t = wrappers.from_edm(process, x0 + bcast(sigma, x0) * draws["eps"], sigma, "LADD")
  extras = {}
  if embeds_guidance(ctx.nets[teacher].module):
    w = jnp.ones(x0.shape[:1], jnp.float32) if w is None else w
    extras = ctx.guidance_inputs(teacher, jnp.broadcast_to(w, x0.shape[:1]))
  _, feats = ctx.call(teacher, x_t, process.timestep(t), **dict(cond or {}), **extras,
                      return_features=tuple(blocks))
  return [feats[b] for b in blocks]


def head_logits(ctx, feats, *, head_params=None, update_stats: bool = False):
  """D's logits (B, tokens) from features; with update_stats also the heads' new statistics."""
  x = feats[0].reshape(feats[0].shape[0], -1)
  if update_stats:
    return ctx.call(HEADS, x, None, params=head_params, features=tuple(feats),
                    update_stats=True, mutable=["batch_stats"])
  return ctx.call(HEADS, x, None, params=head_params, features=tuple(feats))


def generator_adv_loss(logits, kind: str):
  """hinge: -mean D; softplus: mean softplus(-D)."""
  if kind == "hinge":
    return -jnp.mean(logits)
  return jnp.mean(jax.nn.softplus(-logits))


def disc_adv_loss(real_logits, fake_logits, kind: str):
  """hinge: 1/2 (mean relu(1 - D(real)) + mean relu(1 + D(fake))); softplus alike."""
  if kind == "hinge":
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) +
                  jnp.mean(jax.nn.relu(1.0 + fake_logits)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-real_logits)) +
                jnp.mean(jax.nn.softplus(fake_logits)))


# --------------------------------------------------------------------------------------------
# The two terms for given draws
# --------------------------------------------------------------------------------------------


def generator_term_given(params, ctx, batch, draws, *, blocks, adv_loss: str):
  """L_G for given draws (the student's params differentiable; heads and teacher in ctx)."""
  cond = step_cond(ctx, batch, draws, STUDENT)
  x0_hat = student_x0(ctx, params, jnp.asarray(batch["x"], jnp.float32), cond, draws)
  logits = head_logits(ctx, teacher_features(ctx, x0_hat, cond, draws["d"], blocks=blocks,
                                             w=draws.get("w")))
  loss = generator_adv_loss(logits, adv_loss)
  return loss, {"adv_g": loss}


def disc_loss_given(trainable, ctx, batch, draws, *, blocks, adv_loss: str,
                    misaligned_pairs: bool, r1_weight: float):
  """L_D (+ R1) for given draws: draws["fake"] (a `sample_draws`), draws["real"] and
  draws["misaligned"] (`renoise_draws`); returns (loss, metrics, {heads: new statistics})."""
  fd = draws["fake"]
  cond = step_cond(ctx, batch, fd, STUDENT)
  x_real = jnp.asarray(batch["x"], jnp.float32)
  fake = jax.lax.stop_gradient(student_x0(ctx, ctx.params[STUDENT], x_real, cond, fd))
  fake_cond, fake_d, fake_w = cond, fd["d"], fd.get("w")
  if misaligned_pairs:
    fake = jnp.concatenate([fake, jnp.roll(x_real, 1, axis=0)])
    fake_cond = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, a]), cond)
    fake_d = {k: jnp.concatenate([fd["d"][k], draws["misaligned"][k]]) for k in ("sigma", "eps")}
    fake_w = None if fake_w is None else jnp.concatenate([fake_w, fake_w])
  f_feats = teacher_features(ctx, fake, fake_cond, fake_d, blocks=blocks, w=fake_w)
  r_feats = teacher_features(ctx, x_real, cond, draws["real"], blocks=blocks, w=fd.get("w"))
  r_feats = [jax.lax.stop_gradient(f) for f in r_feats]
  f_feats = [jax.lax.stop_gradient(f) for f in f_feats]
  n_fake = fake.shape[0]
  feats = [jnp.concatenate([f, r]) for f, r in zip(f_feats, r_feats)]
  logits, updates = head_logits(ctx, feats, head_params=trainable[HEADS], update_stats=True)
  lf, lr = logits[:n_fake], logits[n_fake:]
  loss = disc_adv_loss(lr, lf, adv_loss)
  metrics = {"adv_d": loss, "real_logit": jnp.mean(lr), "fake_logit": jnp.mean(lf)}
  if r1_weight > 0:
    real_sum = lambda fs: jnp.sum(head_logits(ctx, fs, head_params=trainable[HEADS]))
    grads = jax.grad(real_sum)(r_feats)
    penalty = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in grads)
    r1 = jnp.mean(penalty)
    loss = loss + r1_weight * r1
    metrics["r1"] = r1
  return loss, metrics, {HEADS: updates}


# --------------------------------------------------------------------------------------------
# Phase losses and the extension of an objective
# --------------------------------------------------------------------------------------------


def _draw_keys(cfg, num_steps: int) -> dict:
  keys = {"max_time_prob": float(cfg.max_time_prob), "num_steps": num_steps,
          "p_mean": float(cfg.d_p_mean), "p_std": float(cfg.d_p_std)}
  if cfg.get("guidance_embed", False):   # scm_ladd with a guidance-embedded student
    keys["guidance"] = (tuple(float(w) for w in cfg.guidance_scales), str(cfg.guidance_sampling))
  return keys


def disc_phase_loss(trainable, ctx, batch, rng, t, *, draw_keys: dict, null_prob: float,
                    **kw):
  process = ctx.nets[STUDENT].process
  shape = jnp.shape(batch["x"])
  k_f, k_r, k_m = jax.random.split(rng, 3)
  noising = lambda k: renoise_draws(k, shape, draw_keys["p_mean"], draw_keys["p_std"])
  draws = {"fake": sample_draws(process, k_f, shape, null_prob=null_prob, **draw_keys),
           "real": noising(k_r), "misaligned": noising(k_m)}
  return disc_loss_given(trainable, ctx, batch, draws, **kw)


def generator_term(params, ctx, batch, rng, *, draw_keys: dict, null_prob: float, **kw):
  process = ctx.nets[STUDENT].process
  draws = sample_draws(process, rng, jnp.shape(batch["x"]), null_prob=null_prob, **draw_keys)
  return generator_term_given(params, ctx, batch, draws, **kw)


def plus_adversarial(base_loss, *, weight: float, term):
  """A generator phase loss: base_loss (its own draws from fold_in(rng, 0)) + weight * the
  adversarial term (draws from fold_in(rng, 1)); metrics of both, the base's value as `base`."""
  def loss(trainable, ctx, batch, rng, t):
    out = base_loss(trainable, ctx, batch, jax.random.fold_in(rng, 0), t)
    value, metrics = out[0], dict(out[1])
    adv, adv_metrics = term(trainable[STUDENT], ctx, batch, jax.random.fold_in(rng, 1))
    metrics.update(adv_metrics)
    metrics["base"] = value
    return (value + weight * adv, metrics) + tuple(out[2:])
  return loss


def adversarial_only(trainable, ctx, batch, rng, t, *, term):
  return term(trainable[STUDENT], ctx, batch, rng)


def _null_prob(cfg) -> float:
  for key in ("label_dropout", "null_label_prob"):
    if key in cfg:
      return float(cfg[key])
  return 0.0


def with_ladd(objective: Objective, cfg, *, generator_phase: str, num_steps: int = 0,
              base_loss=True) -> Objective:
  """`objective` + LADD: the "disc_heads" network, the discriminator phase and the adversarial
  term added to phase `generator_phase` (weight cfg.adv_weight; `base_loss=False`: the term
  alone). cfg holds LADD_DEFAULTS' keys."""
  adv_loss = choice(cfg, "adv_loss", ("hinge", "softplus"))
  blocks = tuple(int(b) for b in cfg.feature_blocks)
  if not blocks:
    raise ValueError("config key 'objective.feature_blocks': needs at least one teacher block")
  if not 0.0 <= float(cfg.max_time_prob) <= 1.0:
    raise ValueError(f"config key 'objective.max_time_prob': must be in [0, 1], got "
                     f"{cfg.max_time_prob}")
  common = {"draw_keys": _draw_keys(cfg, num_steps), "null_prob": _null_prob(cfg),
            "blocks": blocks, "adv_loss": adv_loss}
  term = functools.partial(generator_term, **common)
  disc = functools.partial(disc_phase_loss, misaligned_pairs=bool(cfg.misaligned_pairs),
                           r1_weight=float(cfg.r1_weight), **common)
  alternate = bool(cfg.alternate)
  phases = []
  for p in objective.phases:
    if p.name == generator_phase:
      loss = (plus_adversarial(p.loss, weight=float(cfg.adv_weight), term=term) if base_loss
              else functools.partial(adversarial_only, term=term))
      p = Phase(p.name, loss=loss, trains=p.trains, every=2 if alternate else p.every,
                offset=0 if alternate else p.offset, start=p.start, stop=p.stop, data=p.data)
    phases.append(p)
  if generator_phase not in [p.name for p in phases]:
    raise ValueError(f"with_ladd: the objective has no phase {generator_phase!r}")
  phases.append(Phase("disc", loss=disc, trains=(HEADS,), every=2 if alternate else 1,
                      offset=1 if alternate else 0))
  heads = Network(HEADS, model="ladd_heads", init="random", backbone=TEACHER,
                  kwargs={"feature_dims": (int(cfg.feature_dim),) * len(blocks),
                          "virtual_bs": int(cfg.virtual_bs),
                          "spectral": bool(cfg.spectral_norm)})
  return Objective(networks=tuple(objective.networks) + (heads,), phases=tuple(phases),
                   ema=objective.ema, stages=objective.stages, student=objective.student,
                   sampler=objective.sampler, evaluates_as=objective.evaluates_as)


# --------------------------------------------------------------------------------------------
# Objectives
# --------------------------------------------------------------------------------------------


@register_objective("scm_ladd", defaults={**scm.DEFAULTS, **LADD_DEFAULTS})
def build_scm_ladd(cfg) -> Objective:
  return with_ladd(scm.build(cfg), cfg, generator_phase="scm")


LADD_ONLY = {**LADD_DEFAULTS, "adv_weight": 1.0, "num_steps": 1, "label_dropout": 0.1,
             "ema_decay": 0.0}


@register_objective("ladd", defaults=LADD_ONLY)
def build_ladd(cfg) -> Objective:
  k = int(cfg.num_steps)
  if k < 1:
    raise ValueError(f"config key 'objective.num_steps': must be >= 1, got {k}")
  ema = {STUDENT: {"eval": float(cfg.ema_decay)}} if float(cfg.ema_decay) > 0 else {}
  base = Objective(networks=(Network(TEACHER, init="checkpoint", trainable=None),
                             Network(STUDENT, init="teacher")),
                   phases=(Phase("generator", loss=None, trains=(STUDENT,)),), ema=ema,
                   student=STUDENT, sampler="consistency", evaluates_as=STUDENT)
  return with_ladd(base, cfg, generator_phase="generator", num_steps=k, base_loss=False)
