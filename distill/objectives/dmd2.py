"""`dmd2`: Distribution Matching Distillation (DMD, Yin et al. CVPR'24; DMD2, NeurIPS'24).

    python -m launch.train --config configs/toy/dmd2.py:gmm --workdir runs/toy_dmd2_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

Networks: "teacher" (the checkpoint, frozen: the real score, guided with `real_guidance`),
"student" (the generator, a copy of the teacher evaluated at t_max: x = x0_hat(z, t_max)),
"fake_score" (a copy of the teacher trained by denoising the generator's samples) and, with
`gan_weight > 0`, "gan_head" (model "gan_head" on the fake network's block `gan_feature_block`
feature, trained with the fake score: the fake network's weights get gradients from both).

Phases (TTUR): "critic" every step trains (fake_score[, gan_head]); "generator" every
`fake_updates`-th step (offset fake_updates - 1) trains the student, after that step's critic.

Generator loss, per sample (all network outputs under stop-gradient except the GAN term's path
through the fake network's *input*):

    x = G(z);  t ~ U[t_min_frac, t_max_frac] of the process range;  x_t = alpha x + sigma eps
    mu_r = CFG_{real_guidance}(teacher x0)(x_t),  mu_f = fake x0 (x_t)   (no CFG on the fake)
    g = (mu_f - mu_r) / max(mean_dims |x - mu_r|, 1e-5)       (nan_to_num)
    L_DM = 1/2 mean (x - sg(x - g))^2          =>  dL/dx = g / N (x moves towards mu_r - mu_f)
    L_GAN = mean softplus(-D(x noised to t_D))    t_D ~ U[gan_t_min_frac, gan_t_max_frac]
    L_reg = mean_b sum_dims (G(z_i) - y_i)^2     (DMD1's regression on fixed teacher pairs)
    L_G = dm_weight L_DM + gan_weight L_GAN + regression_weight L_reg

Critic loss on fresh stop-gradient generator samples (and real data for D: the batch's `x`, or
with `real_stream` the images of that data stream under their own captions or labels: DMD2's
text-to-image runs draw prompts from a caption set and real images from an image set):

    L_fake = the teacher's own denoising loss (its kind and time proposal) on sg(x)
    L_D = mean softplus(D(sg x noised)) + mean softplus(-D(x_real noised))   (independent t_D)
    L_critic = L_fake + gan_d_weight L_D

Conditioning: each step's labels are the batch's with a `null_label_prob` fraction replaced by
the null class, for every network of the step (`matching.step_cond`), so the student learns the
null-label (unconditional) distribution that eval's unconditional sampling draws.

The regression pairs (`regression_weight > 0`, 1-step students only) are `regression_pairs`
fixed noises z_i = prior(fold_in(key(regression_seed), i)) with labels i mod classes and their
teacher ODE endpoints y_i (the eval's teacher solver: Euler, DDIM on VP processes;
`regression_teacher_steps` steps, guided with `real_guidance`).
Each generator step regresses a random `regression_batch` of them; y_i is recomputed from z_i
(a pure function of i, so the pairs are fixed exactly as if precomputed; for large teachers
precompute them instead). LPIPS is replaced by the squared error.

Multi-step students (`num_steps` K > 1): DMD2's backward simulation, see
distill/objectives/matching.py (per-sample k; eval with the `consistency` sampler at K steps).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill import evaluation, solvers
from distill.objective import Network, Objective, register_objective
from distill.objectives import matching as m

DEFAULTS = {
    "fake_updates": 5,            # TTUR: critic updates per generator update (DMD2: 5 or 10)
    "null_label_prob": 0.1,       # per-sample probability of the null label in a step (all nets;
                                  # the student learns unconditional sampling)
    "num_steps": 1,               # generator steps K (K > 1: backward simulation)
    "real_guidance": 1.0,         # CFG scale of the teacher's x0 (1 = conditional, no guidance)
    "t_min_frac": 0.02,           # DM-loss time window, fractions of [t_min, t_max] (DMD: 2%..98%)
    "t_max_frac": 0.98,
    "dm_weight": 1.0,             # weight of L_DM
    "fake_weighting": "none",     # x0-space weighting of the fake's denoising loss ("none": MSE)
    "fake_label_dropout": 0.0,    # label dropout when training the fake score
    "gan_weight": 0.0,            # generator's non-saturating GAN weight (0: no GAN head at all)
    **m.FAKE_LORA_DEFAULTS,       # fake_lora_{rank,pattern,alpha}: the fake score as a LoRA
    **m.GAN_DEFAULTS,             # gan_d_weight, gan_t_{min,max}_frac, gan_feature_{block,dim},
                                  # gan_hidden: see distill/objectives/matching.py
    "regression_weight": 0.0,     # DMD1 regression on fixed teacher pairs (0: off)
    "regression_pairs": 1024,     # size of the fixed pair set
    "regression_batch": 64,       # pairs per generator step
    "regression_teacher_steps": 32,  # Euler steps of the teacher ODE making a pair
    "regression_seed": 0,         # key of the pair noises
    "ema_decay": 0.0,             # `eval` EMA of the student (0: none, DMD2 uses none)
}


def dm_gradient(x, mu_real, mu_fake):
  """DMD's per-sample normalised score difference g = (mu_f - mu_r) / mean|x - mu_r| (no grad)."""
  w = jnp.maximum(m.per_example_mean(jnp.abs(x - mu_real)), 1e-5)
  g = (mu_fake - mu_real) / m.bcast(w, x)
  return jax.lax.stop_gradient(jnp.nan_to_num(g))


def surrogate(x, g):
  """1/2 mean (x - sg(x - g))^2: its gradient w.r.t. x is g / x.size."""
  return 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - g)))


# --------------------------------------------------------------------------------------------
# Draws
# --------------------------------------------------------------------------------------------


def generator_draws(process, rng, shape, *, num_steps, null_prob, t_min_frac, t_max_frac,
                    gan_window):
  """Randomness of one generator step: generator noise, DM time and noise, GAN noising and
  the regression key."""
  k_g, k_t, k_e, k_d, k_r = jax.random.split(rng, 5)
  return {"gen": m.generator_draws(process, k_g, shape, num_steps, null_prob),
          "t": m.window_t(process, k_t, (shape[0],), t_min_frac, t_max_frac),
          "eps": jax.random.normal(k_e, shape, jnp.float32),
          "gan": m.gan_draws(process, k_d, shape, *gan_window),
          "reg": k_r}


critic_draws = m.critic_draws   # generator noise, fake-loss draws, GAN noising


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def regression_loss(ctx, params, key, shape, *, pairs, batch, teacher_steps, guidance, seed):
  """DMD1's regression: mean_b sum_dims (G(z_i) - y_i)^2 over `batch` fixed pairs (z_i, y_i)."""
  info = ctx.nets[m.STUDENT]
  idx = jax.random.randint(key, (batch,), 0, pairs)
  base = jax.random.PRNGKey(seed)
  z = jax.vmap(lambda i: info.process.prior(jax.random.fold_in(base, i), tuple(shape)))(idx)
  cond = {}
  if info.num_classes:
    cond = {"class_labels": (idx % info.num_classes).astype(jnp.int32)}

  def teacher(x_t, t):
    return m.guided(ctx, m.TEACHER, x_t, t, cond, guidance, "x0")
  process = ctx.nets[m.TEACHER].process
  y = jax.lax.stop_gradient(solvers.sample(teacher, process, z, steps=teacher_steps,
                                           solver=evaluation.teacher_solver(process)))
  x = m.generate(ctx, m.STUDENT, params, cond, {"z": z}, 1)
  return jnp.mean(m.per_example_sum(jnp.square(x - y)))


def generator_loss_given(trainable, ctx, batch, draws, *, num_steps, real_guidance, dm_weight,
                         gan_weight, gan_feature_block, regression_weight=0.0, regression=None):
  """L_G of the module docstring for given draws."""
  params = trainable[m.STUDENT]
  cond = m.step_cond(ctx, batch, draws["gen"])
  process = ctx.nets[m.STUDENT].process
  x = m.generate(ctx, m.STUDENT, params, cond, draws["gen"], num_steps)
  alpha, sigma = process.alpha_sigma(draws["t"])
  x_t = jax.lax.stop_gradient(m.bcast(alpha, x) * x + m.bcast(sigma, x) * draws["eps"])
  mu_real = jax.lax.stop_gradient(m.guided(ctx, m.TEACHER, x_t, draws["t"], cond, real_guidance))
  mu_fake = jax.lax.stop_gradient(m.guided(ctx, m.FAKE, x_t, draws["t"], cond, 1.0))
  g = dm_gradient(x, mu_real, mu_fake)
  l_dm = surrogate(x, g)
  loss = dm_weight * l_dm
  metrics = {"dm": l_dm, "g_norm": jnp.mean(jnp.sqrt(m.per_example_sum(jnp.square(g)))),
             "x_std": jnp.mean(jnp.std(x, axis=0))}
  if gan_weight:
    l_gan = m.gan_generator_term(ctx, x, cond, draws["gan"], feature_block=gan_feature_block)
    loss = loss + gan_weight * l_gan
    metrics["gan"] = l_gan
  if regression_weight:
    l_reg = regression(ctx, params, draws["reg"], batch["x"].shape[1:])
    loss = loss + regression_weight * l_reg
    metrics["regression"] = l_reg
  return loss, metrics


def critic_loss_given(trainable, ctx, batch, draws, *, num_steps, fake_weighting,
                      gan_d_weight=0.0, gan_feature_block=-1, real_stream=""):
  """L_critic of the module docstring for given draws (the GAN part when "gan_head" trains;
  its real images from `batch[real_stream]` with their own condition when given)."""
  cond = m.step_cond(ctx, batch, draws["gen"])
  x = jax.lax.stop_gradient(
      m.generate(ctx, m.STUDENT, ctx.params[m.STUDENT], cond, draws["gen"], num_steps))
  l_fake, mse = m.fake_loss(ctx, m.FAKE, trainable[m.FAKE], x, cond, draws["fake"],
                            weighting=fake_weighting)
  loss = l_fake
  metrics = {"fake": l_fake, "fake_mse": mse}
  if m.HEAD in trainable:
    x_real, cond_real = m.real_images(batch, real_stream)
    l_d, more = m.gan_critic_term(trainable, ctx, x, x_real, cond, draws["gan_fake"],
                                  draws["gan_real"], feature_block=gan_feature_block,
                                  cond_real=cond_real)
    loss = loss + gan_d_weight * l_d
    metrics.update(more)
  return loss, metrics


def generator_loss(trainable, ctx, batch, rng, t, *, draw, **kw):
  """The "generator" phase loss: draws from `rng`, then `generator_loss_given`."""
  del t
  shape = batch["x"].shape
  return generator_loss_given(trainable, ctx, batch, draw(ctx.nets[m.STUDENT].process, rng,
                                                          shape), **kw)


# The "critic" phase loss: draws from `rng`, then `critic_loss_given`.
critic_loss = functools.partial(m.critic_phase_loss, critic_loss_given)


# --------------------------------------------------------------------------------------------
# Builder
# --------------------------------------------------------------------------------------------


@register_objective("dmd2", defaults=DEFAULTS)
def build(cfg) -> Objective:
  """The dmd2 Objective from the `objective.*` config (see DEFAULTS)."""
  for key in ("fake_updates", "num_steps", "regression_pairs", "regression_batch",
              "regression_teacher_steps"):
    m.check_positive_int(cfg, key)
  m.check_window(cfg, "t_min_frac", "t_max_frac")
  m.check_window(cfg, "gan_t_min_frac", "gan_t_max_frac")
  k, steps = int(cfg.fake_updates), int(cfg.num_steps)
  null_prob = float(cfg.null_label_prob)
  gan = float(cfg.gan_weight) != 0.0
  real_stream = m.real_stream_from(cfg, gan)
  reg = float(cfg.regression_weight) != 0.0
  if reg and steps != 1:
    raise ValueError("config key 'objective.regression_weight': the regression loss is for "
                     "1-step students (objective.num_steps = 1)")
  gan_window = (float(cfg.gan_t_min_frac), float(cfg.gan_t_max_frac))
  gen_draw = functools.partial(generator_draws, num_steps=steps, null_prob=null_prob,
                               t_min_frac=float(cfg.t_min_frac),
                               t_max_frac=float(cfg.t_max_frac), gan_window=gan_window)
  critic_draw = functools.partial(critic_draws, num_steps=steps, null_prob=null_prob,
                                  label_dropout=float(cfg.fake_label_dropout),
                                  gan_window=gan_window)
  regression = functools.partial(
      regression_loss, pairs=int(cfg.regression_pairs), batch=int(cfg.regression_batch),
      teacher_steps=int(cfg.regression_teacher_steps), guidance=float(cfg.real_guidance),
      seed=int(cfg.regression_seed)) if reg else None
  generator = functools.partial(
      generator_loss, draw=gen_draw, num_steps=steps, real_guidance=float(cfg.real_guidance),
      dm_weight=float(cfg.dm_weight), gan_weight=float(cfg.gan_weight),
      gan_feature_block=int(cfg.gan_feature_block),
      regression_weight=float(cfg.regression_weight), regression=regression)
  critic = functools.partial(
      critic_loss, draw=critic_draw, num_steps=steps, fake_weighting=cfg.fake_weighting,
      gan_d_weight=float(cfg.gan_d_weight), gan_feature_block=int(cfg.gan_feature_block),
      real_stream=real_stream)
  networks = [Network(m.TEACHER, init="checkpoint", trainable=None),
              Network(m.STUDENT, init=m.TEACHER),
              m.fake_network_from(cfg)]
  trains = (m.FAKE,)
  if gan:
    networks.append(m.gan_head_network(cfg))
    trains = (m.FAKE, m.HEAD)
  return Objective(networks=tuple(networks),
                   phases=m.ttur_phases(critic, generator, trains, k, real_stream=real_stream),
                   ema=m.student_ema(cfg.ema_decay), student=m.STUDENT, sampler="consistency",
                   real_data=(real_stream or True) if gan else False)
