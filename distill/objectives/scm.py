"""`scm`: continuous-time consistency models with TrigFlow (sCM, Lu & Song 2024): sCD (distilled
from a teacher's velocity) and sCT (the single-sample velocity, no teacher).

    python -m launch.train --config configs/toy/scm.py:gmm --workdir runs/toy_scm_gmm \
        --config.teacher.checkpoint=runs/toy_teacher_gmm_dense  # (teacher: see the config file)

TrigFlow: x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2 I), t in [0, pi/2]. The student is a
TrigFlow network F (kind "trigflow": sigma_d F = dx_t/dt) and its consistency function is

    f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t, t)

(`processes.decode(F, "trigflow", ...)`; the 1-4 step sampler is the solver "trigflow"). A
rectified-flow teacher becomes a TrigFlow model without retraining through the wrapper
`flow_to_trigflow(sigma_data=...)` (distill/wrappers.py); the student is a copy of the teacher
behind the same wrapper, so it starts as the teacher's TrigFlow F. The frozen teacher keeps its
own process (its eval rows are Euler on its own ODE); the loss converts its output.

One training step (all in the student's TrigFlow coordinates, per sample):

    t = arctan(exp(N(p_mean, p_std^2)) / sigma_d),  x_t = cos t x0 + sin t z
    dx_t/dt = sigma_d F_teacher(x_t, t)            (sCD; CFG: u + w (c - u), w per sample)
            = cos t z - sin t x0                   (sCT)
    F^-, T = jvp(F_{sg(theta)}, (x_t, t), (cos t sin t dx_t/dt, cos t sin t))   # float32;
                                                   # T = cos t sin t dF^-/dt
    g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d T)
    r = min(1, step / tangent_warmup)
    g_hat = g / (||g|| + c)                        (c = tangent_norm; c <= 0: no normalisation)
    loss = mean_b[ exp(w_phi(t)) / D ||F_theta - sg(F_theta) - g_hat||^2 - w_phi(t) ]

g = cos t df^-/dt (the 2nd term scaled by r), so the gradient at theta^- = theta is
-2 exp(w) / D (dF_theta/dtheta)^T g_hat: the continuous-time consistency gradient. w_phi is the
adaptive weighting (a small MLP of t, network "weight", trained in the same phase; zero-init,
so it starts at w = 0); `adaptive_weight=False` uses w = 0. Samples whose g (teacher velocity,
tangent) is not finite are masked out (g_hat = 0, loss term 0). The loss value carries no
progress signal (~ exp(w) ||g_hat||^2 / D - w): watch `scm/g_norm` (mean ||g|| before
normalisation) and the few-step eval.

One student pass (`shared_primal`, the default): F^- = sg(F_theta) and T = sg(jvp tangent), so
`jax.jvp(F_theta)` inside the gradient gives both, and reverse mode runs through its primal only
(the tangent is stop-gradient'd; XLA drops its unused linearisation). That saves one student
forward of the separate form (a stop-gradient jvp pass, then a forward with gradient, as
SANA-Sprint and rCM do): about 1 of 6 forward-equivalents per step (teacher 1, primal + tangent
2, backward 2, plus the forward). The gradient is the same (tests/test_scm.py compares both with
PyTorch); attention kernels are paired (`models.attention.shared_primal_impl`): the primal from
`model.attention`, the tangent from `model.jvp_attention`.

Networks: "teacher" (the checkpoint, frozen; in sCT only a reference for eval rows), "student"
(init from the teacher behind the wrapper; or random with a native TrigFlow model config),
"weight" (the adaptive weighting head, model "scm_weight") when `adaptive_weight`.

Pitfalls: the tangent differentiates the student in time, so the network's time input must be
smooth. A time embedding of 1000 s (diffusers / SD3 convention) makes dF/dt oscillate with a
period of ~0.006 in s and the run diverges (g_norm grows); use a teacher with a dense time
input (s in [0, 1]: SANA-Sprint fine-tunes its teacher so; the toy MLP: model.time_scale =
0.001). Label dropout trains the student's null class too (eval samples unconditionally by
default). A guidance-embedded student (`guidance_embed`) is evaluated at w = `eval.guidance`
(default 1: no guidance), the teacher's rows with CFG at the same w.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill import processes as procs
from distill import wrappers
from distill.context import cond_from_batch, embeds_guidance, null_condition
from distill.objective import Network, Objective, Phase, register_objective
from distill.objectives import matching
from models import attention as attention_lib
from models.mlp import sinusoidal_embedding
from models.registry import register_model

DEFAULTS = {
    # "scd": distil the teacher's velocity; "sct": consistency training with the single-sample
    # velocity cos t z - sin t x0 (the teacher, if any, is only a reference for eval rows).
    "mode": "scd",
    # Student start: "teacher" (the teacher's weights behind the flow_to_trigflow wrapper) or
    # "random" (sct only: a fresh `model.*` network with model.prediction="trigflow" and
    # process.name="trigflow", process.sigma_data = objective.sigma_data).
    "init": "teacher",
    # TrigFlow sigma_d: z ~ N(0, sigma_d^2). The data std is a good choice (1.0 for the toy
    # data, 0.5 for images in [-1, 1]).
    "sigma_data": 1.0,
    # Time proposal: ln(sigma) ~ N(p_mean, p_std^2), t = arctan(sigma / sigma_d).
    "p_mean": -1.0,
    "p_std": 1.4,
    # Tangent warm-up: r goes linearly 0 -> 1 over this many steps (0: r = 1 from the start).
    "tangent_warmup": 500,
    # c of the tangent normalisation g / (||g|| + c); <= 0 turns normalisation off.
    "tangent_norm": 0.1,
    # Learn the adaptive weighting w_phi(t) jointly (network "weight"); False: w = 0.
    "adaptive_weight": True,
    "weight_hidden": 64,          # width of the weighting head
    # Classifier-free guidance of the teacher velocity: w per sample from this set ("choice") or
    # uniform in [min, max] ("uniform"); guidance = u + w (c - u). (1.0,) = no guidance.
    "guidance_scales": (1.0,),
    "guidance_sampling": "choice",
    # Feed w to the student (its model's w input: `context.guidance_embed_kwargs`).
    "guidance_embed": False,
    # Probability of dropping a sample's condition: class label -> null class, prompt -> the
    # data's null prompt (teacher and student alike, so the student also learns the
    # unconditional model that eval samples by default).
    "label_dropout": 0.1,
    # Decay of the student's `eval` EMA (used for sampling / eval); 0 = no EMA, eval the raw
    # weights. (sCM has no EMA *target*: theta^- = sg(theta).)
    "ema_decay": 0.0,
    # One student pass per step: F_theta (with its gradient) and the tangent T (a constant to
    # it) from one jax.jvp, the attention a `shared_primal_impl(model.attention,
    # model.jvp_attention)` pair. False: a separate stop-gradient tangent pass, then a forward
    # with gradient (SANA-Sprint's and rCM's structure), one student forward more per step; its
    # tangent pass runs on float32 copies of the parameters, which differs from the shared pass
    # only for `model.param_dtype` bfloat16.
    "shared_primal": True,
}


# --------------------------------------------------------------------------------------------
# The adaptive weighting head w_phi(t)
# --------------------------------------------------------------------------------------------


@register_model("scm_weight")
class AdaptiveWeight(nn.Module):
  """sCM's w_phi(t): sinusoid(time_scale t) -> Dense(hidden) -> SiLU -> Dense(1), last layer
  zero-initialised (w = 0 at start). Called as (x, timestep) -> (B,); x only gives the batch."""

  hidden: int = 64
  embed_dim: int = 32
  time_scale: float = 1000.0

  @nn.compact
  def __call__(self, x, timestep):
    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (b,))
    emb = sinusoidal_embedding(t * self.time_scale, self.embed_dim)
    dense = lambda n, axes, init, name: nn.Dense(
        n, name=name, kernel_init=nn.with_logical_partitioning(init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]))
    h = nn.silu(dense(self.hidden, (None, "mlp"), nn.initializers.lecun_normal(), "fc1")(emb))
    return dense(1, ("mlp", None), nn.initializers.zeros_init(), "fc2")(h)[:, 0]


# --------------------------------------------------------------------------------------------
# Pure pieces (tested one by one against PyTorch and closed forms)
# --------------------------------------------------------------------------------------------


def _bcast(a, x):
  return procs.expand_like(a, x)


def _sum_rest(a):
  return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def warmup_ratio(step, warmup: int):
  """r = min(1, step / warmup) (1 when warmup <= 0)."""
  if warmup <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / float(warmup))


def draw_inputs(rng, x0, *, sigma_data: float, p_mean: float, p_std: float,
                guidance_scales=(1.0,), guidance_sampling: str = "choice",
                label_dropout: float = 0.0) -> dict:
  """The random draws of one loss call: t (B,), z (like x0, std sigma_d), w (B,) and `drop`
  (B,) bool, True where the condition is dropped (the null class or null prompt)."""
  b = x0.shape[0]
  k_t, k_z, k_w, k_d = jax.random.split(rng, 4)
  sigma = jnp.exp(p_mean + p_std * jax.random.normal(k_t, (b,), jnp.float32))
  t = jnp.arctan(sigma / sigma_data)
  z = sigma_data * jax.random.normal(k_z, x0.shape, jnp.float32)
  w = draw_guidance(k_w, b, guidance_scales, guidance_sampling)
  drop = jax.random.bernoulli(k_d, label_dropout, (b,))
  return {"t": t, "z": z, "w": w, "drop": drop}


def draw_guidance(rng, batch: int, guidance_scales, guidance_sampling: str = "choice"):
  """CFG scales w (B,): one of `guidance_scales` each ("choice") or uniform over their range."""
  scales = jnp.asarray(tuple(guidance_scales), jnp.float32)
  if guidance_sampling == "uniform":
    return jax.random.uniform(rng, (batch,), jnp.float32, jnp.min(scales), jnp.max(scales))
  if guidance_sampling == "choice":
    return scales[jax.random.randint(rng, (batch,), 0, scales.shape[0])]
  raise ValueError(f"config key 'objective.guidance_sampling': expected 'choice' or "
                   f"'uniform', got {guidance_sampling!r}")


def output_and_tangent(F_fn, x_t, t, dxdt):
  """(F, T) = jvp(F_fn, (x_t, t), (cos t sin t dx_t/dt, cos t sin t)), inputs in float32.

  T = cos t sin t dF/dt along the ODE (sCM's "JVP rearrangement": the cos t sin t factor keeps
  the tangent's scale bounded in low precision). F is F_fn's output as it is: differentiable in
  reverse mode where F_fn's parameters are (the shared pass), constant where they are
  stop-gradient (the separate tangent pass)."""
  x_t = jnp.asarray(x_t, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  cs = jnp.cos(t) * jnp.sin(t)
  return jax.jvp(F_fn, (x_t, t), (_bcast(cs, x_t) * jnp.asarray(dxdt, jnp.float32), cs))


def tangent_target(F_minus, T, x_t, t, dxdt, *, sigma_data: float, r):
  """g = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + sigma_d T) in float32: cos t
  df^-/dt of f = cos t x_t - sin t sigma_d F^-, its second term scaled by r."""
  x_t, t, dxdt, F_minus, T = (jnp.asarray(a).astype(jnp.float32)
                              for a in (x_t, t, dxdt, F_minus, T))
  cos, sin = jnp.cos(t), jnp.sin(t)
  return (-_bcast(jnp.square(cos), x_t) * (sigma_data * F_minus - dxdt)
          - r * (_bcast(cos * sin, x_t) * x_t + sigma_data * T))


def scm_tangent(F_fn, x_t, t, dxdt, *, sigma_data: float, r):
  """(F^-, g) for a consistency model f = cos t x_t - sin t sigma_d F_fn(x_t, t), F_fn holding
  stop-gradient parameters: `output_and_tangent`, then `tangent_target`."""
  F_minus, T = output_and_tangent(F_fn, x_t, t, dxdt)
  F_minus = F_minus.astype(jnp.float32)
  return F_minus, tangent_target(F_minus, T, x_t, t, dxdt, sigma_data=sigma_data, r=r)


def normalize_tangent(g, c: float):
  """(g / (||g|| + c), ||g||) per sample, norms in float32; c <= 0 returns g unchanged."""
  g = jnp.asarray(g, jnp.float32)
  norm = jnp.sqrt(_sum_rest(jnp.square(g)))
  if c <= 0:
    return g, norm
  return g / _bcast(norm + c, g), norm


def scm_per_sample(F_theta, F_minus, g_hat, logw):
  """exp(w) / D ||F_theta - F^- - g_hat||^2 - w per sample (F^-, g_hat constants)."""
  d = math.prod(F_theta.shape[1:])
  diff = (F_theta.astype(jnp.float32) - jax.lax.stop_gradient(F_minus)
          - jax.lax.stop_gradient(g_hat))
  return jnp.exp(logw) / d * _sum_rest(jnp.square(diff)) - logw


def teacher_velocity(ctx, teacher: str, x_t, t, cond: dict, w, sigma_data: float, *,
                     guided: bool):
  """dx_t/dt = sigma_d F_teacher(x_t, t) in TrigFlow coordinates, with CFG u + w (c - u)
  (`matching.guided` on the raw output: F is an affine map of it, so the same as CFG on F or
  on the teacher's own velocity). The null condition: the null class, or the data's null
  prompt (`context.null_condition`). A teacher that takes the CFG scale as its input (a SANA
  with `guidance_embeds`, SANA-Sprint's own teacher) gets w there instead, in one conditional
  pass (w = 1 unguided)."""
  info = ctx.nets[teacher]
  scale = w if guided else 1.0
  if embeds_guidance(info.module):
    extras = ctx.guidance_inputs(teacher, jnp.broadcast_to(jnp.asarray(scale, jnp.float32),
                                                           x_t.shape[:1]))
    apply_inner = lambda xs, s: ctx.apply(teacher, xs, s, cond, **extras)
  else:
    apply_inner = lambda xs, s: matching.guided(ctx, teacher, xs, s, cond, scale, kind="raw")
  return sigma_data * wrappers.as_trigflow(apply_inner, info.process, info.prediction, x_t, t,
                                           sigma_data)


def tangent_context(ctx, name: str, *, shared: bool = False):
  """`ctx` whose network `name` runs with the attention of a pass pushed through `jax.jvp`.

  A model with both `attention` and `jvp_attention` fields (DESIGN.md: model.attention for
  gradient passes, model.jvp_attention for tangent passes; a custom_vjp kernel cannot be pushed
  through jax.jvp) is cloned with attention = jvp_attention, or with `shared` (a jvp pass whose
  primal is also differentiated) with the pair `attention.shared_primal_impl(attention,
  jvp_attention)`; other models are left as they are.
  """
  info = ctx.nets[name]
  module = info.module
  impl, primal = getattr(module, "jvp_attention", None), getattr(module, "attention", None)
  if impl is None or primal is None or info.apply_fn is not None:
    return ctx
  if shared:
    impl = attention_lib.shared_primal_impl(primal, impl)
  if impl == primal:
    return ctx
  tangent = dataclasses.replace(info, module=module.clone(attention=impl))
  return ctx.replace(nets={**ctx.nets, name: tangent})


def _f32_tree(tree):
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def scm_loss_given(trainable, ctx, batch, draws: dict, r, *, student: str, teacher: str,
                   weight, mode: str, tangent_norm: float, guided: bool,
                   guidance_embed: bool, shared_primal: bool = True):
  """The sCM loss for given draws (t, z, w) and warm-up ratio r; see the module docstring."""
  info = ctx.nets[student]
  sd = float(info.process.sigma_data)
  x0 = jnp.asarray(batch["x"], jnp.float32)
  t, z, w = draws["t"], draws["z"], draws["w"]
  x_t = _bcast(jnp.cos(t), x0) * x0 + _bcast(jnp.sin(t), x0) * z
  cond = cond_from_batch(batch)
  if "drop" in draws:
    cond = null_condition(info, cond, where=draws["drop"])
  if mode == "sct":
    dxdt = _bcast(jnp.cos(t), x0) * z - _bcast(jnp.sin(t), x0) * x0
  else:
    dxdt = teacher_velocity(ctx, teacher, x_t, t, cond, w, sd, guided=guided)
  dxdt = jax.lax.stop_gradient(dxdt)
  extras = ctx.guidance_inputs(student, w) if guidance_embed else {}

  if shared_primal:
    # One pass: F_theta with its gradient, and the tangent, a constant to the gradient.
    sctx = tangent_context(ctx, student, shared=True)
    F_live = lambda x, tt: sctx.apply(student, x, tt, cond, params=trainable[student], **extras)
    F_theta, T = output_and_tangent(F_live, x_t, t, dxdt)
    F_minus = jax.lax.stop_gradient(F_theta).astype(jnp.float32)
    T = jax.lax.stop_gradient(T)
  else:
    # A tangent pass on stop-gradient float32 parameters, then a forward with gradient.
    frozen = _f32_tree(jax.lax.stop_gradient(trainable[student]))
    tctx = tangent_context(ctx, student)
    F_sg = lambda x, tt: tctx.apply(student, x, tt, cond, params=frozen, **extras)
    F_minus, T = output_and_tangent(F_sg, x_t, t, dxdt)
    F_minus = F_minus.astype(jnp.float32)
    F_theta = ctx.apply(student, x_t, t, cond, params=trainable[student], **extras)
  g = tangent_target(F_minus, T, x_t, t, dxdt, sigma_data=sd, r=r)
  g_hat, g_norm = normalize_tangent(g, tangent_norm)
  ok = jnp.isfinite(g_norm)
  g_hat = jax.lax.stop_gradient(jnp.where(_bcast(ok, g_hat), g_hat, 0.0))

  if weight is not None:
    logw = ctx.call(weight, x_t, t, params=trainable[weight]).astype(jnp.float32)
  else:
    logw = jnp.zeros_like(t)
  per = scm_per_sample(F_theta, jax.lax.stop_gradient(F_theta), g_hat, logw)
  per = jnp.where(ok, per, 0.0)
  loss = jnp.mean(per)
  n_ok = jnp.maximum(jnp.sum(ok), 1)
  metrics = {
      "g_norm": jnp.sum(jnp.where(ok, g_norm, 0.0)) / n_ok,
      "logw": jnp.mean(logw),
      "masked": jnp.mean((~ok).astype(jnp.float32)),
      "warmup": jnp.asarray(r, jnp.float32),
  }
  return loss, metrics


def scm_loss(trainable, ctx, batch, rng, t, *, student: str, teacher: str, weight, mode: str,
             sigma_data: float, p_mean: float, p_std: float, tangent_warmup: int,
             tangent_norm: float, guidance_scales: tuple, guidance_sampling: str,
             guidance_embed: bool, label_dropout: float, shared_primal: bool):
  """Phase loss: draws (t, z, w) from `rng`, r from t.step, then `scm_loss_given`."""
  info = ctx.nets[student]
  if info.prediction != "trigflow" or getattr(info.process, "name", "") != "trigflow":
    raise ValueError("objective scm: the student must be a TrigFlow model (init='teacher' adds the "
                     "flow_to_trigflow wrapper; init='random' needs model.prediction='trigflow' "
                     f"and process.name='trigflow'), got {info.prediction!r} on "
                     f"{getattr(info.process, 'name', None)!r}")
  sd = float(info.process.sigma_data)
  if sd != sigma_data:
    raise ValueError(f"config key 'process.sigma_data': the student's TrigFlow sigma_data {sd} "
                     f"differs from objective.sigma_data {sigma_data}")
  draws = draw_inputs(rng, batch["x"], sigma_data=sd, p_mean=p_mean, p_std=p_std,
                      guidance_scales=guidance_scales, guidance_sampling=guidance_sampling,
                      label_dropout=label_dropout)
  r = warmup_ratio(t.step, tangent_warmup)
  guided = any(float(s) != 1.0 for s in guidance_scales)
  return scm_loss_given(trainable, ctx, batch, draws, r, student=student, teacher=teacher,
                        weight=weight, mode=mode, tangent_norm=tangent_norm, guided=guided,
                        guidance_embed=guidance_embed, shared_primal=shared_primal)


@register_objective("scm", defaults=DEFAULTS)
def build(cfg) -> Objective:
  mode, init = str(cfg.mode), str(cfg.init)
  if mode not in ("scd", "sct"):
    raise ValueError(f"config key 'objective.mode': expected 'scd' or 'sct', got {mode!r}")
  if init not in ("teacher", "random"):
    raise ValueError(f"config key 'objective.init': expected 'teacher' or 'random', got {init!r}")
  if mode == "scd" and init != "teacher":
    raise ValueError("config key 'objective.init': sCD starts the student from the teacher "
                     "(init='teacher')")
  if cfg.guidance_sampling not in ("choice", "uniform"):
    raise ValueError(f"config key 'objective.guidance_sampling': expected 'choice' or "
                     f"'uniform', got {cfg.guidance_sampling!r}")
  scales = tuple(float(s) for s in cfg.guidance_scales)
  if not scales:
    raise ValueError("config key 'objective.guidance_scales': needs at least one value")
  sd = float(cfg.sigma_data)
  kwargs = {"guidance_embed": True} if cfg.guidance_embed else {}
  networks = []
  if init == "teacher":
    networks.append(Network("teacher", init="checkpoint", trainable=None))
    spec = wrappers.wrapper_spec("flow_to_trigflow", sigma_data=sd, p_mean=float(cfg.p_mean),
                                 p_std=float(cfg.p_std))
    networks.append(Network("student", init="teacher", wrapper=spec, kwargs=kwargs))
  else:
    networks.append(Network("student", init="random", kwargs=kwargs))
  trains = ("student",)
  weight = None
  if cfg.adaptive_weight:
    weight = "weight"
    networks.append(Network(weight, model="scm_weight", init="random",
                            kwargs={"hidden": int(cfg.weight_hidden)}))
    trains = ("student", weight)
  loss = functools.partial(
      scm_loss, student="student", teacher="teacher", weight=weight, mode=mode, sigma_data=sd,
      p_mean=float(cfg.p_mean), p_std=float(cfg.p_std),
      tangent_warmup=int(cfg.tangent_warmup), tangent_norm=float(cfg.tangent_norm),
      guidance_scales=scales, guidance_sampling=str(cfg.guidance_sampling),
      guidance_embed=bool(cfg.guidance_embed), label_dropout=float(cfg.label_dropout),
      shared_primal=bool(cfg.shared_primal))
  ema = {"student": {"eval": float(cfg.ema_decay)}} if cfg.ema_decay > 0 else {}
  return Objective(networks=tuple(networks),
                   phases=(Phase("scm", loss=loss, trains=trains),),
                   ema=ema, student="student", sampler="trigflow", evaluates_as="student")

