"""`vsd`: Variational Score Distillation for one-step generators (ProlificDreamer's VSD as used by
SwiftBrush, Nguyen & Tran CVPR'24), with SNOOPI's random guidance scale shared by both teachers.

    python -m launch.train --config configs/toy/vsd.py:gmm --workdir runs/toy_vsd_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm

Networks: "teacher" (frozen), "student" (a copy of the teacher at t_max), "fake_score" = the
LoRA teacher: the teacher's weights shared by reference (`base="teacher"`) plus a LoRA adapter
on the kernels matching `lora_pattern` (rank `lora_rank`, multiplier lora_alpha / rank); only
the adapter is trained. `fake_lora=False` uses a full trainable copy instead.
Phases: "critic" (the LoRA teacher) every step, "generator" every `fake_updates` steps
(SwiftBrush: 1:1).

Generator loss (everything but G's own output under stop-gradient):

    x = G(z);  t ~ U[t_min_frac, t_max_frac] of the process range;  x_t = a_t sg(x) + sigma_t eps
    k = `guidance`, or per sample k ~ U[guidance_min, guidance_max] (`random_guidance`, SNOOPI)
    e_T = CFG_k(teacher eps)(x_t),  e_L = CFG_k(LoRA teacher eps)(x_t)    (the same k for both)
    g = nan_to_num(w(t) (e_T - e_L)),  w(t) = sigma_t^2 ("sigma2", SwiftBrush / ProlificDreamer's
        1 - abar_t) or 1 ("none")
    L = 1/2 mean (x - sg(x - g))^2            =>  dL/dx = g / N

Since eps = (x_t - alpha x0) / sigma, sigma^2 (e_T - e_L) = -alpha sigma (x0_T - x0_L): the
generator moves towards the teacher's denoised estimate and away from the LoRA teacher's.

Conditioning: each step's labels are the batch's with a `null_label_prob` fraction replaced by
the null class, for every network of the step (`matching.step_cond`), so the student learns the
null-label (unconditional) distribution that eval's unconditional sampling draws.

LoRA-teacher loss: the teacher's own denoising loss (kind, proposal) on sg(G(z)) with labels
dropped to null with `fake_label_dropout` (SwiftBrush: 0.1, so the LoRA teacher has the null
output CFG needs). SwiftBrush's abar_t-weighted eps-MSE is an x0-space weighting; set
`fake_weighting` to pick another (distill.processes.WEIGHTINGS).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from distill.objective import Network, Objective, register_objective
from distill.objectives import matching as m

DEFAULTS = {
    "fake_updates": 1,            # critic (LoRA) updates per generator update (SwiftBrush: 1)
    "null_label_prob": 0.1,       # per-sample probability of the null label in a step (all nets;
                                  # the student learns unconditional sampling)
    "num_steps": 1,               # generator steps K (K > 1: backward simulation, as dmd2)
    "guidance": 1.0,              # CFG scale of both teachers (SwiftBrush: 4.5)
    "random_guidance": False,     # SNOOPI: k ~ U[guidance_min, guidance_max] per sample
    "guidance_min": 1.0,
    "guidance_max": 1.0,
    "weighting": "sigma2",        # w(t): sigma2 | none
    "t_min_frac": 0.02,           # generator time window, fractions of [t_min, t_max]
    "t_max_frac": 0.98,
    "fake_lora": True,            # LoRA teacher (True) or a full trainable copy (False)
    "lora_pattern": r"block_\d+",  # regex over kernel paths the adapter covers
    "lora_rank": 8,
    "lora_alpha": 0.0,            # LoRA multiplier alpha / rank (0: alpha = rank)
    "fake_label_dropout": 0.1,    # label dropout of the LoRA teacher's loss (SwiftBrush: 0.1)
    "fake_weighting": "none",     # x0-space weighting of the LoRA teacher's loss
    "ema_decay": 0.0,             # `eval` EMA of the student (0: none)
}

WEIGHTS = {
    "sigma2": lambda alpha, sigma: jnp.square(sigma),
    "none": lambda alpha, sigma: jnp.ones_like(sigma),
}


def vsd_gradient(e_teacher, e_lora, alpha, sigma, weighting: str):
  """g = nan_to_num(w(t) (e_T - e_L)) under stop-gradient."""
  w = m.bcast(WEIGHTS[weighting](alpha, sigma), e_teacher)
  return jax.lax.stop_gradient(jnp.nan_to_num(w * (e_teacher - e_lora)))


def generator_draws(process, rng, shape, *, num_steps, null_prob, t_min_frac, t_max_frac,
                    guidance):
  """Randomness of one generator step: generator noise, time, noise, per-sample scales."""
  k_g, k_t, k_e, k_k = jax.random.split(rng, 4)
  fixed, lo, hi = guidance
  draws = {"gen": m.generator_draws(process, k_g, shape, num_steps, null_prob),
           "t": m.window_t(process, k_t, (shape[0],), t_min_frac, t_max_frac),
           "eps": jax.random.normal(k_e, shape, jnp.float32)}
  if fixed is None:
    draws["guidance"] = jax.random.uniform(k_k, (shape[0],), jnp.float32, lo, hi)
  return draws


def critic_draws(process, rng, shape, *, num_steps, null_prob, label_dropout):
  """Randomness of one LoRA-teacher step: generator noise and fake-loss draws."""
  k_g, k_f = jax.random.split(rng)
  return {"gen": m.generator_draws(process, k_g, shape, num_steps, null_prob),
          "fake": m.fake_draws(process, k_f, shape, label_dropout)}


def generator_loss_given(trainable, ctx, batch, draws, *, num_steps, guidance, weighting):
  """The VSD surrogate loss of the module docstring for given draws."""
  params = trainable[m.STUDENT]
  cond = m.step_cond(ctx, batch, draws["gen"])
  process = ctx.nets[m.STUDENT].process
  x = m.generate(ctx, m.STUDENT, params, cond, draws["gen"], num_steps)
  t = draws["t"]
  a, s = process.alpha_sigma(t)
  x_t = jax.lax.stop_gradient(m.bcast(a, x) * x + m.bcast(s, x) * draws["eps"])
  k = draws.get("guidance", guidance)
  e_teacher = m.guided(ctx, m.TEACHER, x_t, t, cond, k, "eps")
  e_lora = m.guided(ctx, m.FAKE, x_t, t, cond, k, "eps")
  g = vsd_gradient(e_teacher, e_lora, a, s, weighting)
  loss = 0.5 * jnp.mean(jnp.square(x - jax.lax.stop_gradient(x - g)))
  return loss, {"vsd": loss, "g_norm": jnp.mean(jnp.sqrt(m.per_example_sum(jnp.square(g)))),
                "x_std": jnp.mean(jnp.std(x, axis=0))}


def critic_loss_given(trainable, ctx, batch, draws, *, num_steps, fake_weighting):
  """The LoRA teacher's denoising loss on stop-gradient generator samples."""
  cond = m.step_cond(ctx, batch, draws["gen"])
  x = jax.lax.stop_gradient(
      m.generate(ctx, m.STUDENT, ctx.params[m.STUDENT], cond, draws["gen"], num_steps))
  l_fake, mse = m.fake_loss(ctx, m.FAKE, trainable[m.FAKE], x, cond, draws["fake"],
                            weighting=fake_weighting)
  return l_fake, {"fake": l_fake, "fake_mse": mse}


def generator_loss(trainable, ctx, batch, rng, t, *, draw, **kw):
  """The "generator" phase loss: draws from `rng`, then `generator_loss_given`."""
  del t
  draws = draw(ctx.nets[m.STUDENT].process, rng, batch["x"].shape)
  return generator_loss_given(trainable, ctx, batch, draws, **kw)


def critic_loss(trainable, ctx, batch, rng, t, *, draw, **kw):
  """The "critic" phase loss: draws from `rng`, then `critic_loss_given`."""
  del t
  draws = draw(ctx.nets[m.STUDENT].process, rng, batch["x"].shape)
  return critic_loss_given(trainable, ctx, batch, draws, **kw)


@register_objective("vsd", defaults=DEFAULTS)
def build(cfg) -> Objective:
  """The vsd Objective from the `objective.*` config (see DEFAULTS)."""
  for key in ("fake_updates", "num_steps", "lora_rank"):
    m.check_positive_int(cfg, key)
  m.check_window(cfg, "t_min_frac", "t_max_frac")
  if cfg.weighting not in WEIGHTS:
    raise ValueError(f"config key 'objective.weighting': unknown {cfg.weighting!r} "
                     f"(known: {', '.join(WEIGHTS)})")
  steps, k = int(cfg.num_steps), int(cfg.fake_updates)
  null_prob = float(cfg.null_label_prob)
  if cfg.random_guidance:
    if float(cfg.guidance_min) > float(cfg.guidance_max):
      raise ValueError("config key 'objective.guidance_min': must be <= guidance_max")
    guidance = (None, float(cfg.guidance_min), float(cfg.guidance_max))
  else:
    guidance = (float(cfg.guidance), 0.0, 0.0)
  generator = functools.partial(
      generator_loss,
      draw=functools.partial(generator_draws, num_steps=steps, null_prob=null_prob,
                             t_min_frac=float(cfg.t_min_frac),
                             t_max_frac=float(cfg.t_max_frac), guidance=guidance),
      num_steps=steps, guidance=guidance[0] if guidance[0] is not None else 1.0,
      weighting=cfg.weighting)
  critic = functools.partial(
      critic_loss,
      draw=functools.partial(critic_draws, num_steps=steps, null_prob=null_prob,
                             label_dropout=float(cfg.fake_label_dropout)),
      num_steps=steps, fake_weighting=cfg.fake_weighting)
  fake = m.fake_network(int(cfg.lora_rank) if cfg.fake_lora else 0, cfg.lora_pattern,
                        float(cfg.lora_alpha))
  networks = (Network(m.TEACHER, init="checkpoint", trainable=None),
              Network(m.STUDENT, init=m.TEACHER), fake)
  return Objective(networks=networks, phases=m.ttur_phases(critic, generator, (m.FAKE,), k),
                   ema=m.student_ema(cfg.ema_decay), student=m.STUDENT, sampler="consistency",
                   real_data=False)
