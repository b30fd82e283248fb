"""`sid`: Score identity Distillation (SiD, Zhou et al. ICML'24) with SiD-LSG guidance (ICLR'25),
Zero-CFG / Anti-CFG, few-step mixtures and an optional SiDA-style adversarial term.

    python -m launch.train --config configs/toy/sid.py:gmm --workdir runs/toy_sid_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

Data-free: batches only give labels (and real data for the optional adversarial term).

Networks: "teacher" (frozen, f_phi), "student" (the generator G, a copy of the teacher at
t_max), "fake_score" (f_psi, a copy of the teacher), "gan_head" with `gan_weight > 0`.
Phases: "critic" (fake score [+ head]) every step, then "generator" every `fake_updates` steps
(SiD: 1, i.e. alternating 1:1 with the fake update first).

Generator loss (per sample; NO stop-gradient on the network outputs: the gradient reaches G
through x, and through x_t into both the teacher's and the fake network's inputs):

    x = G(z);  t ~ time_dist;  x_t = alpha_t x + sigma_t eps
    y_r = CFG_{k_real}(teacher x0)(x_t),   y_f = CFG_{k_fake}(fake x0)(x_t)
    w = sg(max(mean_dims |x - y_r|, 1e-5))
    L_G = loss_scale * mean_b sum_dims (y_r - y_f) * ((y_r - x) - alpha (y_r - y_f)) / w

(= [(1 - alpha) ||y_r - y_f||^2 + (y_r - y_f).(y_f - x)] / w; alpha = 1.2 is SiD's default.)
Only w is stop-gradiented.

Fake-score loss: the teacher's own denoising loss (kind, proposal) on sg(G(z)), labels dropped
with `fake_label_dropout`, the network's output guided with k_train ("long" guidance of LSG;
k_train = 0 trains the null-label output only).

Adversarial term (`gan_weight > 0`; real images from the batch, or with `real_stream` from that
data stream under their own captions or labels), by `discriminator`:
- "encoder": SiDA (Zhou et al. ICLR'25). The discriminator has no parameters of its own: its
  logit is the channel mean of the fake network's features after block `gan_feature_block`
  (its encoder output; one logit per token), trained jointly with the fake score. Critic:
  L_fake + gan_d_weight * mean_b(w_b) * 1/2 [BCE(D(x_real), 1) + BCE(D(x_g), 0)], D(x_g) from
  the fake loss's own forward and x_real noised with the same t, eps (w_b: the fake loss's
  weights). Generator, from step `gan_start_step`: 0.5 L_G + 0.5 gan_weight L_GAN with
  L_GAN = dim(x) * mean_b(1/w_b) * BCE(clip(D(x_t), +-10), 1), D read from the forward that
  gave y_f (matching.sida_*). SiDA's recipe: gan_weight 0.01, gan_d_weight 1, the mix after
  200k images, no generator update before 100k (`generator_start_step`), the fake network's
  gradients clipped by value at 1 (`optim.networks.fake_score.grad_clip_value`), alpha 1.
- "head": a DMD2-style classifier head on the fake network's features (`gan_head`):
  L_G + gan_weight * mean softplus(-D(x noised)) from `gan_start_step`, critic
  + gan_d_weight * (the head's D loss).

Conditioning: each step's labels are the batch's with a `null_label_prob` fraction replaced by
the null class, for every network of the step (`matching.step_cond`), so the student learns the
null-label (unconditional) distribution that eval's unconditional sampling draws.

Guidance (`guidance_mode`; scales k_real, k_fake, k_train):
- "lsg":    all three = `guidance` (SiD-LSG; guidance = 1 is plain SiD);
- "zero":   Zero-CFG: k_real = 1, the fake evaluated and trained with the null label (0, 0);
- "anti":   Anti-CFG: k_real = 1, k_fake = 1 - guidance (< 0 for guidance > 1), k_train = 1
            (the fake's null output comes from label dropout: keep fake_label_dropout > 0);
- "custom": `real_guidance`, `fake_guidance`, `fake_train_guidance` as given.

Time distribution for L_G (`time_dist`): "window" = U[t_min_frac, t_max_frac] of the process
range (SiD-LSG: steps 20..979; SiD-EDM's sigma <= 24.4 is a window on the Karras grid), or
"logit_normal" (t = t_min + span sigmoid(N(logit_mean, logit_std^2)); SiD-DiT: N(ln 2, 1.6)).

Few-step (`num_steps` K > 1): the uniform mixture over step outputs (distill/objectives/
matching.py), used by both losses.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from distill.objective import Network, Objective, register_objective
from distill.objectives import matching as m

DEFAULTS = {
    "alpha": 1.2,                 # SiD's alpha (1.0: LSG / SiDA / SiD-DiT default)
    "fake_updates": 1,            # critic updates per generator update (SiD: 1)
    "null_label_prob": 0.1,       # per-sample probability of the null label in a step (all nets;
                                  # the student learns unconditional sampling)
    "num_steps": 1,               # generator steps K (K > 1: mixture over step outputs)
    "guidance_mode": "lsg",       # lsg | zero | anti | custom (see the module docstring)
    "guidance": 1.0,              # the CFG scale of lsg / anti
    "real_guidance": 1.0,         # custom: k_real
    "fake_guidance": 1.0,         # custom: k_fake (fake score evaluated in L_G)
    "fake_train_guidance": 1.0,   # custom: k_train (fake score's output in its own loss)
    "fake_label_dropout": 0.1,    # label dropout of the fake score's loss
    "fake_weighting": "none",     # x0-space weighting of the fake's loss ("none": its kind's MSE)
    "time_dist": "window",        # window | logit_normal (L_G's t)
    "t_min_frac": 0.02,
    "t_max_frac": 0.98,
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "loss_scale": 1.0,            # multiplies L_G (SiD-EDM: 100; irrelevant under Adam)
    "gan_weight": 0.0,            # adversarial term (0: off; SiDA: 0.01)
    "discriminator": "head",      # encoder (SiDA: the fake network's own features) | head
    "gan_start_step": 0,          # the generator's GAN term from this step (SiDA: 200k images)
    "generator_start_step": 0,    # the generator's first update (SiDA: 100k images)
    **m.FAKE_LORA_DEFAULTS,       # fake_lora_{rank,pattern,alpha}: the fake score as a LoRA
    **m.GAN_DEFAULTS,
    "ema_decay": 0.0,             # `eval` EMA of the student (0: none)
}


def guidance_scales(mode: str, guidance: float, real: float, fake: float,
                    train: float) -> tuple[float, float, float]:
  """(k_real, k_fake, k_train) of a guidance mode."""
  if mode == "lsg":
    return guidance, guidance, guidance
  if mode == "zero":
    return 1.0, 0.0, 0.0
  if mode == "anti":
    return 1.0, 1.0 - guidance, 1.0
  if mode == "custom":
    return real, fake, train
  raise ValueError(f"config key 'objective.guidance_mode': unknown mode {mode!r} "
                   "(known: lsg, zero, anti, custom)")


def sample_time(process, rng, b, *, time_dist, t_min_frac, t_max_frac, logit_mean, logit_std):
  """L_G's time: uniform on the window, or logit-normal over the process range."""
  if time_dist == "window":
    return m.window_t(process, rng, (b,), t_min_frac, t_max_frac)
  u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (b,), jnp.float32))
  return process.floor_time(process.t_min + (process.t_max - process.t_min) * u)


def sid_weight(x, y_real):
  """SiD's per-sample normaliser w = sg(max(mean_dims |x - y_r|, 1e-5))."""
  return jax.lax.stop_gradient(jnp.maximum(m.per_example_mean(jnp.abs(x - y_real)), 1e-5))


def sid_loss(x, y_real, y_fake, alpha: float):
  """Per-sample SiD loss sum_dims (y_r - y_f)((y_r - x) - alpha (y_r - y_f)) / sg(w)."""
  d = y_real - y_fake
  return m.per_example_sum(d * ((y_real - x) - alpha * d)) / sid_weight(x, y_real)


# --------------------------------------------------------------------------------------------
# Draws and losses
# --------------------------------------------------------------------------------------------


def generator_draws(process, rng, shape, *, num_steps, null_prob, time, gan_window):
  """Randomness of one generator step: generator noise, time, noise, GAN noising."""
  k_g, k_t, k_e, k_d = jax.random.split(rng, 4)
  return {"gen": m.generator_draws(process, k_g, shape, num_steps, null_prob),
          "t": time(process, k_t, shape[0]),
          "eps": jax.random.normal(k_e, shape, jnp.float32),
          "gan": m.gan_draws(process, k_d, shape, *gan_window)}


critic_draws = m.critic_draws   # generator noise, fake-loss draws, GAN noising


def generator_loss_given(trainable, ctx, batch, draws, *, num_steps, alpha, real_guidance,
                         fake_guidance, loss_scale, gan_weight=0.0, gan_feature_block=-1,
                         discriminator="head", gan_start=0, step=0):
  """L_G of the module docstring for given draws (no stop-gradient on y_r, y_f), with the
  adversarial term from step `gan_start` on."""
  params = trainable[m.STUDENT]
  cond = m.step_cond(ctx, batch, draws["gen"])
  process = ctx.nets[m.STUDENT].process
  x = m.generate(ctx, m.STUDENT, params, cond, draws["gen"], num_steps)
  t = draws["t"]
  a, s = process.alpha_sigma(t)
  x_t = m.bcast(a, x) * x + m.bcast(s, x) * draws["eps"]     # differentiable
  y_real = m.guided(ctx, m.TEACHER, x_t, t, cond, real_guidance)
  encoder = bool(gan_weight) and discriminator == "encoder"
  y_fake = m.guided(ctx, m.FAKE, x_t, t, cond, fake_guidance,
                    feature_block=gan_feature_block if encoder else None)
  if encoder:
    y_fake, feats = y_fake
  per = sid_loss(x, y_real, y_fake, alpha)
  loss = loss_scale * jnp.mean(per)
  metrics = {"sid": jnp.mean(per),
             "score_diff": jnp.mean(m.per_example_mean(jnp.square(y_real - y_fake))),
             "x_std": jnp.mean(jnp.std(x, axis=0))}
  if gan_weight:
    on = jnp.asarray(step) >= gan_start
    if encoder:
      l_gan = m.sida_generator_term(feats, sid_weight(x, y_real), int(np.prod(x.shape[1:])))
      loss = jnp.where(on, 0.5 * loss + 0.5 * gan_weight * l_gan, loss)
    else:
      l_gan = m.gan_generator_term(ctx, x, cond, draws["gan"], feature_block=gan_feature_block)
      loss = jnp.where(on, loss + gan_weight * l_gan, loss)
    metrics["gan"] = l_gan
  return loss, metrics


def critic_loss_given(trainable, ctx, batch, draws, *, num_steps, fake_weighting,
                      train_guidance, gan_d_weight=0.0, gan_feature_block=-1,
                      discriminator="head", gan=False, real_stream=""):
  """The fake score's loss (+ the discriminator's with the adversarial term) for given draws;
  the real images from `batch[real_stream]` with their own condition when given."""
  cond = m.step_cond(ctx, batch, draws["gen"])
  x = jax.lax.stop_gradient(
      m.generate(ctx, m.STUDENT, ctx.params[m.STUDENT], cond, draws["gen"], num_steps))
  encoder = gan and discriminator == "encoder"
  out = m.fake_loss(ctx, m.FAKE, trainable[m.FAKE], x, cond, draws["fake"],
                    weighting=fake_weighting, train_guidance=train_guidance,
                    feature_block=gan_feature_block if encoder else None)
  l_fake, mse = out[:2]
  loss, metrics = l_fake, {"fake": l_fake, "fake_mse": mse}
  if not (encoder or m.HEAD in trainable):
    return loss, metrics
  x_real, cond_real = m.real_images(batch, real_stream)
  if encoder:
    l_d, more = m.sida_critic_term(ctx, trainable[m.FAKE], x_real, draws["fake"], out[2],
                                   feature_block=gan_feature_block, cond_real=cond_real,
                                   real_stream=real_stream)
  else:
    l_d, more = m.gan_critic_term(trainable, ctx, x, x_real, cond, draws["gan_fake"],
                                  draws["gan_real"], feature_block=gan_feature_block,
                                  cond_real=cond_real)
  metrics.update(more)
  return loss + gan_d_weight * l_d, metrics


def generator_loss(trainable, ctx, batch, rng, t, *, draw, **kw):
  """The "generator" phase loss: draws from `rng`, then `generator_loss_given`."""
  draws = draw(ctx.nets[m.STUDENT].process, rng, batch["x"].shape)
  return generator_loss_given(trainable, ctx, batch, draws, step=t.step, **kw)


# The "critic" phase loss: draws from `rng`, then `critic_loss_given`.
critic_loss = functools.partial(m.critic_phase_loss, critic_loss_given)


@register_objective("sid", defaults=DEFAULTS)
def build(cfg) -> Objective:
  """The sid Objective from the `objective.*` config (see DEFAULTS)."""
  for key in ("fake_updates", "num_steps"):
    m.check_positive_int(cfg, key)
  m.check_window(cfg, "t_min_frac", "t_max_frac")
  m.check_window(cfg, "gan_t_min_frac", "gan_t_max_frac")
  if cfg.time_dist not in ("window", "logit_normal"):
    raise ValueError(f"config key 'objective.time_dist': unknown {cfg.time_dist!r} "
                     "(known: window, logit_normal)")
  k_real, k_fake, k_train = guidance_scales(
      cfg.guidance_mode, float(cfg.guidance), float(cfg.real_guidance),
      float(cfg.fake_guidance), float(cfg.fake_train_guidance))
  steps, k = int(cfg.num_steps), int(cfg.fake_updates)
  null_prob = float(cfg.null_label_prob)
  if cfg.discriminator not in ("encoder", "head"):
    raise ValueError(f"config key 'objective.discriminator': unknown {cfg.discriminator!r} "
                     "(known: encoder, head)")
  for key in ("gan_start_step", "generator_start_step"):
    if int(cfg[key]) < 0:
      raise ValueError(f"config key 'objective.{key}': must be >= 0, got {cfg[key]}")
  gan = float(cfg.gan_weight) != 0.0
  real_stream = m.real_stream_from(cfg, gan)
  gan_window = (float(cfg.gan_t_min_frac), float(cfg.gan_t_max_frac))
  time = functools.partial(sample_time, time_dist=cfg.time_dist,
                           t_min_frac=float(cfg.t_min_frac), t_max_frac=float(cfg.t_max_frac),
                           logit_mean=float(cfg.logit_mean), logit_std=float(cfg.logit_std))
  generator = functools.partial(
      generator_loss,
      draw=functools.partial(generator_draws, num_steps=steps, null_prob=null_prob, time=time,
                             gan_window=gan_window),
      num_steps=steps, alpha=float(cfg.alpha), real_guidance=k_real, fake_guidance=k_fake,
      loss_scale=float(cfg.loss_scale), gan_weight=float(cfg.gan_weight),
      gan_feature_block=int(cfg.gan_feature_block), discriminator=cfg.discriminator,
      gan_start=int(cfg.gan_start_step))
  critic = functools.partial(
      critic_loss,
      draw=functools.partial(critic_draws, num_steps=steps, null_prob=null_prob,
                             label_dropout=float(cfg.fake_label_dropout), gan_window=gan_window),
      num_steps=steps, fake_weighting=cfg.fake_weighting, train_guidance=k_train,
      gan_d_weight=float(cfg.gan_d_weight), gan_feature_block=int(cfg.gan_feature_block),
      discriminator=cfg.discriminator, gan=gan, real_stream=real_stream)
  networks = [Network(m.TEACHER, init="checkpoint", trainable=None),
              Network(m.STUDENT, init=m.TEACHER), m.fake_network_from(cfg)]
  trains = (m.FAKE,)
  if gan and cfg.discriminator == "head":
    networks.append(m.gan_head_network(cfg))
    trains = (m.FAKE, m.HEAD)
  phases = m.ttur_phases(critic, generator, trains, k, int(cfg.generator_start_step),
                         real_stream=real_stream)
  return Objective(networks=tuple(networks), phases=phases,
                   ema=m.student_ema(cfg.ema_decay), student=m.STUDENT, sampler="consistency",
                   real_data=(real_stream or True) if gan else False)
