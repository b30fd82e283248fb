"""The `scm` objective (sCM: continuous-time consistency distillation / training with TrigFlow).

1. The whole loss (teacher CFG velocity through the flow->TrigFlow conversion, jvp tangent,
   warm-up, normalisation, adaptive weighting) equals a PyTorch reference written here
   (torch.func.jvp on a functional port of the toy MLP with the same weights) in value and in
   gradient w.r.t. the student's and the weighting head's parameters.
2. The jvp tangent equals a central finite difference of the student along the teacher's ODE.
3. Gaussian data: the exact TrigFlow velocity and the exact consistency function f* are known in
   closed form; with the student equal to f* the sCM target F^- + g equals F^- (g = 0), and for a
   perturbed student g equals cos t d(f - f*)/dt computed by hand.
4. The flow->TrigFlow conversion: the converted teacher's velocity sigma_d F equals the finite
   difference of the teacher's own rectified-flow ODE mapped into TrigFlow coordinates, and
   equals SANA-Sprint's closed form at sigma_d = 1.
5. (slow) A toy run from a teacher trained here: the 1-step student closes a good part of the
   teacher's 1-step vs many-step gap and its weights moved.
6. (slow) The same run on 8 fake CPU devices (data=4, fsdp=2) logs the same losses.

Tolerances (float32 on CPU, highest matmul precision, see conftest.py) are stated at each check.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from distill import context as ctx_lib
from distill import processes as procs
from distill import wrappers
from distill.objectives import scm
from models.mlp import MLPDenoiser

torch.set_default_dtype(torch.float32)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, DIM, NCLS = 6, 2, 3
MLP_KW = dict(dim=DIM, hidden=16, depth=1, time_embed_dim=8, num_classes=NCLS)


def _random_variables(model, *args, seed=0, scale=0.3, **kw):
  """The model's parameter tree filled with seeded N(0, scale^2) numpy values (no PRNG compile)."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args, **kw))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), shapes)


def _rk4(f, x, t0, t1, n=4):
  """x(t1) of dx/dt = f(x, t) from x(t0) by n RK4 steps; t0, t1 per sample (B,)."""
  h = (t1 - t0) / n
  hx = h[:, None]
  t = t0
  for _ in range(n):
    k1 = f(x, t)
    k2 = f(x + 0.5 * hx * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * hx * k2, t + 0.5 * h)
    k4 = f(x + hx * k3, t + h)
    x = x + hx / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    t = t + h
  return x


# ------------------------------------------------------------------ networks and a Context


def _rf(timestep_scale=1.0):
  return procs.make_process("rectified_flow", timestep_scale=timestep_scale)


def _context(sd, *, guidance_embed=False, adaptive=True, timestep_scale=1.0, seed=0):
  """A Context with a flow teacher (RF), the wrapped student and the weighting head."""
  teacher = MLPDenoiser(**MLP_KW)
  student = MLPDenoiser(**MLP_KW, guidance_embed=guidance_embed)
  x, t = jnp.zeros((B, DIM)), jnp.zeros((B,))
  lab = jnp.zeros((B,), jnp.int32)
  tp = _random_variables(teacher, x, t, lab, seed=seed)["params"]
  skw = {"guidance": t} if guidance_embed else {}
  sp = _random_variables(student, x, t, lab, seed=seed + 1, **skw)["params"]
  head = scm.AdaptiveWeight(hidden=8, embed_dim=8)
  wp = _random_variables(head, x, t, seed=seed + 2)["params"]
  rf = _rf(timestep_scale)
  wrap = wrappers.WRAPPERS.get(wrappers.wrapper_spec("flow_to_trigflow", sigma_data=sd))
  nets = {"teacher": ctx_lib.NetInfo("teacher", teacher, "flow", rf, NCLS),
          "student": ctx_lib.NetInfo("student", student, "flow", rf, NCLS, wrapper=wrap)}
  if adaptive:
    nets["weight"] = ctx_lib.NetInfo("weight", head, "raw", None, 0)
  ctx = ctx_lib.Context(params={"teacher": tp}, ema={}, model_state={}, nets=nets)
  trainable = {"student": sp}
  if adaptive:
    trainable["weight"] = wp
  return ctx, trainable


def _inputs(seed=0, sd=1.0, scales=(1.0,), label_dropout=0.0):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(1.3 * rng.standard_normal((B, DIM)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, NCLS, B), jnp.int32)
  draws = scm.draw_inputs(jax.random.PRNGKey(seed), x0, sigma_data=sd, p_mean=-0.4, p_std=1.0,
                          guidance_scales=scales, label_dropout=label_dropout)
  return {"x": x0, "label": labels}, draws


# ------------------------------------------------------------------ PyTorch reference


def _tt(a):
  return torch.tensor(np.asarray(a), dtype=torch.float32)


def _torch_tree(params, requires_grad=False):
  return jax.tree_util.tree_map(lambda a: _tt(a).requires_grad_(requires_grad), params)


def t_sinusoid(t, dim, max_period=10_000.0):
  half = dim // 2
  freqs = torch.exp(-np.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t[:, None] * freqs[None, :]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def t_dense(p, x):
  return x @ p["kernel"] + p["bias"]


def t_layer_norm(p, x, eps=1e-6):  # flax LayerNorm: biased variance, eps 1e-6
  mean = x.mean(-1, keepdim=True)
  var = ((x - mean) ** 2).mean(-1, keepdim=True)
  return (x - mean) / torch.sqrt(var + eps) * p["scale"] + p["bias"]


def t_mlp(P, x, timestep, labels, guidance=None):
  """Functional port of models.mlp.MLPDenoiser (time_scale 1, mlp_ratio 1)."""
  silu = torch.nn.functional.silu
  ted = MLP_KW["time_embed_dim"]
  emb = lambda q, s: t_dense(q["fc2"], silu(t_dense(q["fc1"], t_sinusoid(s, ted))))
  c = emb(P["time_embed"], timestep) + P["class_embed"]["embedding"][labels]
  if guidance is not None:
    c = c + emb(P["guidance_embed"], guidance)
  h = t_dense(P["in_proj"], x)
  for i in range(MLP_KW["depth"]):
    q = P[f"block_{i}"]
    y = t_layer_norm(q["norm"], h)
    y = t_dense(q["fc1"], y) + t_dense(q["cond"], silu(c))
    h = h + t_dense(q["fc2"], silu(y))
  return t_dense(P["out_proj"], silu(t_layer_norm(P["out_norm"], h)))


def t_weight_head(P, t):
  h = torch.nn.functional.silu(t_dense(P["fc1"], t_sinusoid(t * 1000.0, 8)))
  return t_dense(P["fc2"], h)[:, 0]


def t_trigflow_F(P, x_t, t, labels, sd, guidance=None):
  """TrigFlow F of a rectified-flow 'flow' net: s = sd sin t / k, x_s = x_t / k,
  k = cos t + sd sin t; x0 = x_s - s v, eps = x_s + (1 - s) v; F = cos t eps - sin t x0 / sd."""
  k = torch.cos(t) + sd * torch.sin(t)
  s = sd * torch.sin(t) / k
  xs = x_t / k[:, None]
  v = t_mlp(P, xs, s, labels, guidance)
  x0, eps = xs - s[:, None] * v, xs + (1 - s[:, None]) * v
  return torch.cos(t)[:, None] * eps - torch.sin(t)[:, None] * x0 / sd


def torch_scm_loss(Ps, Pt, Pw, x0, labels, t, z, w, r, sd, c, guided, guidance_embed,
                   mode="scd"):
  """The sCM loss of methods_consistency.md (b), written independently of distill/."""
  cos, sin = torch.cos(t)[:, None], torch.sin(t)[:, None]
  x_t = cos * x0 + sin * z
  with torch.no_grad():
    if mode == "sct":
      dxdt = cos * z - sin * x0
    else:
      Fc = t_trigflow_F(Pt, x_t, t, labels, sd)
      if guided:
        Fu = t_trigflow_F(Pt, x_t, t, torch.full_like(labels, NCLS), sd)
        Fc = Fu + w[:, None] * (Fc - Fu)
      dxdt = sd * Fc
  g_kw = w if guidance_embed else None
  Psg = jax.tree_util.tree_map(lambda a: a.detach(), Ps)
  cs = (cos * sin)[:, 0]
  F_m, T = torch.func.jvp(lambda x, tt: t_trigflow_F(Psg, x, tt, labels, sd, g_kw),
                          (x_t, t), (cs[:, None] * dxdt, cs))
  g = -cos ** 2 * (sd * F_m - dxdt) - r * (cs[:, None] * x_t + sd * T)
  g_norm = g.norm(dim=1)
  g_hat = g / (g_norm[:, None] + c)
  F = t_trigflow_F(Ps, x_t, t, labels, sd, g_kw)
  logw = t_weight_head(Pw, t) if Pw is not None else torch.zeros_like(t)
  per = torch.exp(logw) / x0.shape[1] * ((F - F.detach() - g_hat) ** 2).sum(1) - logw
  return per.mean(), g_norm.mean()


@pytest.mark.parametrize("sd,scales,guidance_embed,adaptive,mode,drop,shared", [
    (1.0, (1.0,), False, True, "scd", 0.0, True),
    (1.0, (1.0,), False, True, "scd", 0.0, False),
    (0.5, (1.5, 3.0), False, True, "scd", 0.5, True),
    (0.5, (2.0, 4.0), True, False, "scd", 0.0, True),
    (0.5, (2.0, 4.0), True, False, "scd", 0.0, False),
    (0.7, (1.0,), False, True, "sct", 0.5, True),
])
def test_loss_and_gradients_match_pytorch(sd, scales, guidance_embed, adaptive, mode, drop,
                                          shared):
  """Both student-pass forms (`shared_primal`: one jvp inside the gradient; or a stop-gradient
  jvp pass and a forward with gradient) against the PyTorch reference, which runs the two
  passes separately as SANA-Sprint does."""
  ctx, trainable = _context(sd, guidance_embed=guidance_embed, adaptive=adaptive)
  batch, draws = _inputs(1, sd, scales)
  if drop:  # a fixed mix of dropped (null class) and kept labels
    draws = {**draws, "drop": jnp.asarray([True, False, False, True, False, True])}
  r, c = 0.6, 0.1
  guided = any(s != 1.0 for s in scales)

  def ours(tr):
    return scm.scm_loss_given(tr, ctx, batch, draws, jnp.float32(r), student="student",
                              teacher="teacher", weight="weight" if adaptive else None,
                              mode=mode, tangent_norm=c, guided=guided,
                              guidance_embed=guidance_embed, shared_primal=shared)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(trainable)

  Ps = _torch_tree(trainable["student"], True)
  Pw = _torch_tree(trainable["weight"], True) if adaptive else None
  Pt = _torch_tree(ctx.params["teacher"])
  labels = np.where(np.asarray(draws["drop"]), NCLS, np.asarray(batch["label"]))  # null class
  ref, ref_gnorm = torch_scm_loss(
      Ps, Pt, Pw, _tt(batch["x"]), torch.tensor(labels, dtype=torch.long),
      _tt(draws["t"]), _tt(draws["z"]), _tt(draws["w"]), r, sd, c, guided, guidance_embed, mode)
  ref.backward()
  # float32 end to end; XLA and torch order reductions differently: rtol 1e-5 on O(1) values.
  np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["g_norm"]), ref_gnorm.item(), rtol=1e-5)
  assert float(metrics["masked"]) == 0.0
  names = ["student"] + (["weight"] if adaptive else [])
  for name, tree in zip(names, [Ps, Pw]):
    flat_ref = {jax.tree_util.keystr(p): v.grad for p, v in
                jax.tree_util.tree_flatten_with_path(tree)[0]}
    for p, g in jax.tree_util.tree_flatten_with_path(grads[name])[0]:
      k = jax.tree_util.keystr(p)
      want = flat_ref[k]
      want = np.zeros(g.shape, np.float32) if want is None else want.numpy()
      # Gradients are sums over the batch of O(1) products: atol 2e-6, rtol 1e-4.
      np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=2e-6, err_msg=f"{name}{k}")
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree_util.tree_leaves(grads[name]))


def test_draws():
  """t = arctan(exp(N(p_mean, p_std^2)) / sd), z ~ N(0, sd^2), w from the set or the range,
  label dropout at its rate (moments over 20k draws: 3-4 standard errors)."""
  n, sd = 20_000, 0.8
  x0 = jnp.zeros((n, 2))
  d = scm.draw_inputs(jax.random.PRNGKey(0), x0, sigma_data=sd, p_mean=-0.5, p_std=1.2,
                      guidance_scales=(2.0, 3.0, 5.0), label_dropout=0.2)
  log_sigma = np.log(sd * np.tan(np.asarray(d["t"], np.float64)))
  assert abs(log_sigma.mean() + 0.5) < 0.03 and abs(log_sigma.std() - 1.2) < 0.03
  assert 0 < float(d["t"].min()) and float(d["t"].max()) <= np.pi / 2 + 1e-6
  assert abs(float(jnp.std(d["z"])) - sd) < 0.01
  assert set(np.unique(np.asarray(d["w"])).tolist()) == {2.0, 3.0, 5.0}
  assert abs(float(jnp.mean(d["drop"])) - 0.2) < 0.015
  u = scm.draw_inputs(jax.random.PRNGKey(1), x0, sigma_data=sd, p_mean=0.0, p_std=1.0,
                      guidance_scales=(2.0, 5.0), guidance_sampling="uniform")
  assert 2.0 <= float(u["w"].min()) and float(u["w"].max()) <= 5.0 and not np.any(u["drop"])
  assert abs(float(jnp.mean(u["w"])) - 3.5) < 0.05
  np.testing.assert_array_equal(np.asarray(scm.warmup_ratio(jnp.arange(4), 2)), [0, 0.5, 1, 1])
  assert float(scm.warmup_ratio(0, 0)) == 1.0


def test_gradient_wrt_student_output_is_the_normalised_tangent():
  """d loss / d F_theta = -2 exp(w) g_hat / (D B) (the continuous-time CM gradient)."""
  rng = np.random.default_rng(3)
  F = jnp.asarray(rng.standard_normal((B, DIM)), jnp.float32)
  g_hat = jnp.asarray(rng.standard_normal((B, DIM)), jnp.float32)
  logw = jnp.asarray(rng.standard_normal(B), jnp.float32)
  grad = jax.grad(lambda f: jnp.mean(scm.scm_per_sample(f, jax.lax.stop_gradient(f), g_hat,
                                                        logw)))(F)
  want = -2.0 * np.exp(np.asarray(logw))[:, None] * np.asarray(g_hat) / (DIM * B)
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6, atol=1e-7)


def test_nonfinite_samples_are_masked():
  """A sample whose teacher velocity is NaN (its class row of the *teacher* is NaN) drops out:
  loss, metrics and every gradient stay finite, and the other samples are unaffected."""
  ctx, trainable = _context(1.0)
  batch, draws = _inputs(2)
  labels = np.array([0, 1, 0, 1, 2, 0], np.int32)  # class 2 only for sample 4
  batch = {**batch, "label": jnp.asarray(labels)}
  tp = jax.tree_util.tree_map(lambda a: a, ctx.params["teacher"])
  table = np.asarray(tp["class_embed"]["embedding"]).copy()
  table[2] = np.nan
  tp["class_embed"] = {"embedding": jnp.asarray(table)}
  bad = ctx.replace(params={"teacher": tp})

  def ours(tr, c, b):
    return scm.scm_loss_given(tr, c, b, draws, jnp.float32(1.0), student="student",
                              teacher="teacher", weight="weight", mode="scd", tangent_norm=0.1,
                              guided=False, guidance_embed=False)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(trainable, bad, batch)
  assert np.isfinite(float(loss)) and np.isfinite(float(metrics["g_norm"]))
  np.testing.assert_allclose(float(metrics["masked"]), 1.0 / B, rtol=1e-6)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  # Equal to the loss of the other samples alone (the masked term is 0, the mean is over B).
  keep = np.array([0, 1, 2, 3, 5])
  sub = {k: v[keep] for k, v in batch.items()}
  sub_draws = {k: v[keep] for k, v in draws.items()}
  sub_loss, _ = scm.scm_loss_given(trainable, ctx, sub, sub_draws, jnp.float32(1.0),
                                   student="student", teacher="teacher", weight="weight",
                                   mode="scd", tangent_norm=0.1, guided=False,
                                   guidance_embed=False)
  np.testing.assert_allclose(float(loss), float(sub_loss) * 5 / B, rtol=1e-5)


# ------------------------------------------------------------------ 2. tangent vs FD


def test_jvp_tangent_equals_finite_difference_along_teacher_ode():
  sd = 0.5
  ctx, trainable = _context(sd, seed=4)
  batch, draws = _inputs(4, sd)
  t = jnp.clip(draws["t"], 0.25, 1.35)
  x_t = jnp.cos(t)[:, None] * batch["x"] + jnp.sin(t)[:, None] * draws["z"]
  cond = {"class_labels": batch["label"]}
  params = trainable["student"]
  h = 2e-3

  @jax.jit
  def run(x_t, t):
    F_student = lambda x, tt: ctx.apply("student", x, tt, cond, params=params)
    velocity = lambda x, tt: scm.teacher_velocity(ctx, "teacher", x, tt, cond, None, sd,
                                                  guided=False)
    dxdt = velocity(x_t, t)
    F_minus, g = scm.scm_tangent(F_student, x_t, t, dxdt, sigma_data=sd, r=1.0)
    cs = (jnp.cos(t) * jnp.sin(t))[:, None]
    T = (g + jnp.cos(t)[:, None] ** 2 * (sd * F_minus - dxdt) + cs * x_t) / -sd  # cs dF/dt
    # The teacher's TrigFlow ODE from x_t to t +- h (RK4), then a central difference of F.
    xp, xm = _rk4(velocity, x_t, t, t + h), _rk4(velocity, x_t, t, t - h)
    fd = cs * (F_student(xp, t + h) - F_student(xm, t - h)) / (2 * h)
    return T, fd, F_minus, F_student(x_t, t)
  T, fd, F_minus, F_direct = run(x_t, t)
  # Central differences in float32 with h = 2e-3: truncation ~h^2, rounding ~1e-7 / h.
  np.testing.assert_allclose(np.asarray(T), np.asarray(fd), rtol=2e-3, atol=2e-3)
  assert float(jnp.max(jnp.abs(T))) > 0.05  # a non-trivial tangent
  np.testing.assert_allclose(np.asarray(F_minus), np.asarray(F_direct), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ 3. Gaussian closed form


def _gaussian(s, sd):
  """x0 ~ N(0, s^2 I): V(t) = cos^2 t s^2 + sin^2 t sd^2 = Var(x_t); the exact velocity is
  dx/dt = a(t) x with a = cos t sin t (sd^2 - s^2) / V (= (1/2) d log V / dt), so the PF-ODE is
  linear, x_t = sqrt(V(t)) / s x_0, and the consistency function is f*(x, t) = s x / sqrt(V(t));
  the matching TrigFlow output is F* = (cos t x - f*) / (sd sin t)."""
  V = lambda t: jnp.cos(t) ** 2 * s ** 2 + jnp.sin(t) ** 2 * sd ** 2
  a = lambda t: jnp.cos(t) * jnp.sin(t) * (sd ** 2 - s ** 2) / V(t)
  f_star = lambda x, t: s * x / jnp.sqrt(V(t))[:, None]
  F_star = lambda x, t: ((jnp.cos(t)[:, None] * x - f_star(x, t))
                         / (sd * jnp.sin(t))[:, None])
  return V, a, f_star, F_star


@pytest.mark.parametrize("s,sd", [(1.5, 0.5), (0.7, 1.0)])
def test_gaussian_exact_consistency_function_gives_zero_update(s, sd):
  V, a, f_star, F_star = _gaussian(s, sd)
  rng = np.random.default_rng(0)
  n = 64
  x0 = jnp.asarray(s * rng.standard_normal((n, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.05, 1.5, n), jnp.float32)
  z = jnp.asarray(sd * rng.standard_normal((n, 3)), jnp.float32)
  x_t = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
  dxdt = a(t)[:, None] * x_t
  # The exact velocity is the posterior mean of the single-sample velocity cos t z - sin t x0:
  # check it against the conditional expectation E[x0 | x_t] = cos t s^2 / V x_t.
  x0_hat = (jnp.cos(t) * s ** 2 / V(t))[:, None] * x_t
  np.testing.assert_allclose(np.asarray((jnp.cos(t)[:, None] * x_t - x0_hat)
                                        / jnp.sin(t)[:, None]), np.asarray(dxdt), rtol=2e-5,
                             atol=2e-6)

  F_minus, g = scm.scm_tangent(F_star, x_t, t, dxdt, sigma_data=sd, r=1.0)
  g_hat, g_norm = scm.normalize_tangent(g, 0.0)  # no normalisation
  scale = float(jnp.max(jnp.abs(x_t)))
  # Target F^- + g equals F^-: g vanishes to float32 rounding of O(|x|) terms.
  np.testing.assert_allclose(np.asarray(F_minus + g_hat), np.asarray(F_minus), atol=3e-6 * scale)

  # A perturbed student F = F* + eps x: f = f* - eps sd sin t x, so along the ODE
  # g = cos t d(f - f*)/dt = -eps sd cos t (cos t + sin t a(t)) x_t  (by hand).
  eps = 0.1
  F_pert = lambda x, tt: F_star(x, tt) + eps * x
  _, g_p = scm.scm_tangent(F_pert, x_t, t, dxdt, sigma_data=sd, r=1.0)
  want = (-eps * sd * jnp.cos(t) * (jnp.cos(t) + jnp.sin(t) * a(t)))[:, None] * x_t
  np.testing.assert_allclose(np.asarray(g_p), np.asarray(want), rtol=1e-4, atol=3e-6 * scale)
  assert float(jnp.min(jnp.linalg.norm(g_p, axis=1))) > 1e-4

  # sCT: the single-sample velocity is an unbiased estimate of the exact one, so the sCT g for
  # f* averages to zero over z at fixed x_t -- here checked through linearity: g is affine in
  # dx/dt with the jvp, so E[g_sct | x_t] = g(E[dx/dt | x_t]) = 0.
  _, g_sct = scm.scm_tangent(F_star, x_t, t, jnp.cos(t)[:, None] * z - jnp.sin(t)[:, None] * x0,
                             sigma_data=sd, r=1.0)
  _, g_exact = scm.scm_tangent(F_star, x_t, t, dxdt, sigma_data=sd, r=1.0)
  cos, sin = jnp.cos(t)[:, None], jnp.sin(t)[:, None]
  # For linear F* the jvp part is linear in the velocity: g_sct - g_exact = c(t) (v - v_exact)
  # with c = cos^2 t - sd cos t sin t dF*/dx = cos^2 t - cos t sin t (cos t - s / sqrt V) / sin t.
  c = cos ** 2 - cos * (cos - s / jnp.sqrt(V(t))[:, None])
  v_sct = cos * z - sin * x0
  np.testing.assert_allclose(np.asarray(g_sct - g_exact), np.asarray(c * (v_sct - dxdt)),
                             rtol=1e-4, atol=3e-6 * scale)


# ------------------------------------------------------------------ 4. flow -> TrigFlow


@pytest.mark.parametrize("sd", [0.5, 1.0, 2.0])
def test_flow_to_trigflow_velocity_is_the_teacher_ode(sd):
  rf = _rf(1.0)
  teacher = MLPDenoiser(**{**MLP_KW, "num_classes": 0})
  params = _random_variables(teacher, jnp.zeros((B, DIM)), jnp.zeros((B,)), seed=7)
  v = lambda x, s: teacher.apply(params, x, rf.timestep(jnp.broadcast_to(s, (x.shape[0],))))
  F = lambda x, t: wrappers.as_trigflow(v, rf, "flow", x, t, sd)

  rng = np.random.default_rng(1)
  t = jnp.asarray(rng.uniform(0.2, 1.4, B), jnp.float32)
  x_t = jnp.asarray(rng.standard_normal((B, DIM)) * 1.2, jnp.float32)
  h = 2e-3

  @jax.jit
  def run(x_t, t):
    s0, k0 = wrappers.rf_coordinates(t, sd)
    x_s = x_t * k0[:, None]
    ends = []
    for tn in (t + h, t - h):
      s1, k1 = wrappers.rf_coordinates(tn, sd)
      # The teacher's own ODE dx/ds = v in its own time, then back to TrigFlow coordinates.
      ends.append(_rk4(v, x_s, s0, s1) / k1[:, None])
    return sd * F(x_t, t), (ends[0] - ends[1]) / (2 * h)
  ours, fd = run(x_t, t)
  # float32 central differences, h = 2e-3: see test 2.
  np.testing.assert_allclose(np.asarray(ours), np.asarray(fd), rtol=2e-3, atol=2e-3)

  # Sampling sanity: x0 of the converted model equals the teacher's own x0 at the same noise.
  s, k = wrappers.rf_coordinates(t, sd)
  x_s = x_t * k[:, None]
  x0_teacher = x_s - s[:, None] * v(x_s, s)
  x0_trig = procs.decode(F(x_t, t), "trigflow", x_t, jnp.cos(t)[:, None],
                         sd * jnp.sin(t)[:, None])[0]
  np.testing.assert_allclose(np.asarray(x0_trig), np.asarray(x0_teacher), rtol=1e-5, atol=1e-5)

  if sd == 1.0:  # SANA-Sprint's closed form (methods_consistency.md b.3)
    sq = jnp.sqrt(s ** 2 + (1 - s) ** 2)[:, None]
    xF = x_t / (jnp.sin(t) + jnp.cos(t))[:, None]
    vel = v(xF, s)
    sana = ((1 - 2 * s)[:, None] * xF + (1 - 2 * s + 2 * s ** 2)[:, None] * vel) / sq
    np.testing.assert_allclose(np.asarray(F(x_t, t)), np.asarray(sana), rtol=1e-5, atol=1e-5)


def test_trigflow_prediction_kind_roundtrip():
  sd = 0.7
  proc = procs.make_process("trigflow", sigma_data=sd)
  rng = np.random.default_rng(2)
  x0 = jnp.asarray(rng.standard_normal((B, DIM)), jnp.float32)
  eps = jnp.asarray(rng.standard_normal((B, DIM)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.1, 1.5, B), jnp.float32)
  a, s = proc.alpha_sigma(t)
  a, s = a[:, None], s[:, None]
  x_t = a * x0 + s * eps
  F = procs.encode(x0, eps, "trigflow", a, s)
  np.testing.assert_allclose(np.asarray(F), np.asarray(procs.trigflow_target(x0, sd * eps, t) / sd),
                             rtol=1e-5, atol=1e-6)
  x0_hat, eps_hat = procs.decode(F, "trigflow", x_t, a, s)
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-5)
  np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps), atol=2e-5)
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(procs.trigflow_denoise(x_t, t, F, sd)),
                             atol=1e-6)
  v = procs.convert(F, "trigflow", "v", x_t, a, s)
  np.testing.assert_allclose(np.asarray(procs.convert(v, "v", "trigflow", x_t, a, s)),
                             np.asarray(F), atol=2e-5)


def test_wrapper_spec_and_presented_process():
  spec = wrappers.wrapper_spec("flow_to_trigflow", sigma_data=0.5)
  assert wrappers.parse_spec(spec) == ("flow_to_trigflow", {"sigma_data": 0.5})
  assert wrappers.parse_spec("flow_to_trigflow") == ("flow_to_trigflow", {})
  with pytest.raises(ValueError, match="wrapper spec"):
    wrappers.parse_spec("flow_to_trigflow(0.5)")
  with pytest.raises(KeyError, match="unknown wrapper"):
    wrappers.WRAPPERS.get("nope")
  info = ctx_lib.NetInfo("s", None, "flow", _rf(), 0, wrapper=wrappers.WRAPPERS.get(spec))
  assert info.process.name == "trigflow" and info.process.sigma_data == 0.5
  assert info.prediction == "trigflow"
  assert info.inner_process == _rf() and info.inner_prediction == "flow"
  with pytest.raises(ValueError, match="flow_to_trigflow"):
    ctx_lib.NetInfo("s", None, "eps", procs.make_process("edm"), 0,
                    wrapper=wrappers.WRAPPERS.get(spec))


def test_student_starts_as_the_teacher():
  """The wrapped copy of the teacher: x0 at every t equals the teacher's x0 at the same noise
  level; the 1-step sample f(sd eps, pi/2) equals one Euler step of the teacher from eps."""
  sd = 0.5
  ctx, _ = _context(sd)
  params = ctx.params["teacher"]
  batch, draws = _inputs(5, sd)
  cond = {"class_labels": batch["label"]}
  t = draws["t"]
  x_t = jnp.cos(t)[:, None] * batch["x"] + jnp.sin(t)[:, None] * draws["z"]
  x0_student = ctx.x0("student", x_t, t, cond, params=params)
  s, k = wrappers.rf_coordinates(t, sd)
  x0_teacher = ctx.x0("teacher", x_t * k[:, None], s, cond)
  np.testing.assert_allclose(np.asarray(x0_student), np.asarray(x0_teacher), rtol=1e-5, atol=1e-5)
  eps = draws["z"] / sd
  tmax = ctx.nets["student"].process.t_max
  one = ctx.x0("student", sd * eps, jnp.full((B,), tmax), cond, params=params)
  euler = eps - ctx.apply("teacher", eps, jnp.ones((B,)), cond)  # x_1 - 1 * v
  np.testing.assert_allclose(np.asarray(one), np.asarray(euler), rtol=1e-5, atol=1e-5)


def _toy_teacher():
  """An in-memory toy flow teacher (gmm: 8 classes) with random weights."""
  from distill.teacher import Teacher
  kw = {**MLP_KW, "num_classes": 8}
  module = MLPDenoiser(**kw)
  params = _random_variables(module, jnp.zeros((B, DIM)), jnp.zeros((B,)),
                             jnp.zeros((B,), jnp.int32), seed=11)["params"]
  params = jax.tree_util.tree_map(np.asarray, params)
  return Teacher(module=module, params=params, model_config={"name": "mlp", "prediction": "flow",
                                                             **kw},
                 process=_rf(1000.0), prediction="flow", num_classes=8,
                 reference={"path": "memory", "step": 0, "hash": "", "params": "raw"})


def test_a_teacher_of_another_process_is_named_by_its_key():
  """sCM reads its teacher through flow_to_trigflow: a VP teacher (the converted DiT before the
  recipe's fine-tune) stops in one line naming teacher.checkpoint, the path and the process."""
  import dataclasses
  from distill import trainer
  from distill.engine import Engine
  c = trainer.prepare_config(trainer.load_config(
      os.path.join(ROOT, "configs", "toy", "scm.py") + ":gmm", ["train.batch_size=16"]))
  flow = _toy_teacher()
  vp = dataclasses.replace(flow, process=procs.make_process("vp_discrete"), prediction="eps",
                           model_config={**flow.model_config, "prediction": "eps"},
                           reference={"path": "/teachers/dit_vp", "hash": ""})
  with pytest.raises(ValueError, match=r"^config key 'teacher.checkpoint': objective 'scm' "
                                       r"cannot read the teacher /teachers/dit_vp \(a vp_discrete "
                                       r"network, prediction 'eps'\): wrapper flow_to_trigflow"):
    Engine(c, teacher=vp)


def test_deterministic_consistency_sampler_spec():
  """`eval.sampler = "tcd(gamma=0.0)"`: the student is sampled by consistency steps that
  re-noise with the *implied* noise instead of fresh noise, x_t' = cos t' x0 + sin t' sigma_d
  eps_hat with eps_hat = (x_t - cos t x0) / (sigma_d sin t), written out here by hand."""
  from distill import evaluation, trainer
  from distill.engine import Engine
  c = trainer.load_config(os.path.join(ROOT, "configs", "toy", "scm.py") + ":gmm",
                          ["train.batch_size=16", "objective.sigma_data=0.5",
                           "eval.sampler=tcd(gamma=0.0)"])
  e = Engine(trainer.prepare_config(c), teacher=_toy_teacher())
  assert trainer.student_sampler(e) == "tcd(gamma=0.0)"
  state, frozen = e.init_state()
  ctx = trainer.context_for(e, state, frozen)
  labels = np.arange(16, dtype=np.int32) % 8
  got, _ = evaluation.generate(ctx, "student", state.params["student"], n=16, seed=3,
                               solver=trainer.student_sampler(e), steps=2, shape=(2,),
                               labels=labels)
  z = e.nets["student"].process.prior(jax.random.split(jax.random.fold_in(
      jax.random.PRNGKey(3), 0))[0], (16, 2))
  cond = {"class_labels": jnp.asarray(labels)}
  f = lambda x, t: ctx.x0("student", x, jnp.full((16,), t), cond)
  x, sd = z, 0.5
  for t, tn in ((np.pi / 2, np.pi / 4), (np.pi / 4, 0.0)):
    x0 = f(x, t)
    eps_hat = (x - np.cos(t) * x0) / (sd * np.sin(t))
    x = np.cos(tn) * x0 + sd * np.sin(tn) * eps_hat
  np.testing.assert_allclose(got, x, rtol=2e-5, atol=2e-5)
  assert evaluation.nfe_of("tcd(gamma=0.0)", 2) == 2 and evaluation.nfe_of("heun(s=1)", 2) == 3
  with pytest.raises(ValueError, match="sampler spec"):
    evaluation.make_sampler(ctx, "student", solver="tcd(gamma=", steps=2)


def test_objective_through_the_engine():
  """Networks, presented processes and sampler as built by the engine; three steps run with the
  warm-up ratio r = step / tangent_warmup; the student starts equal to the teacher."""
  from distill import evaluation, trainer
  from distill.engine import Engine
  c = trainer.load_config(os.path.join(ROOT, "configs", "toy", "scm.py") + ":gmm",
                          ["train.steps=3", "train.batch_size=16", "objective.tangent_warmup=2",
                           "objective.sigma_data=0.5"])
  c = trainer.prepare_config(c)
  e = Engine(c, teacher=_toy_teacher())
  assert [n.name for n in e.objective.networks] == ["teacher", "student", "weight"]
  assert e.objective.sampler == "trigflow" and e.trained == ["student", "weight"]
  s_info, t_info = e.nets["student"], e.nets["teacher"]
  assert (s_info.process.name, s_info.prediction, s_info.process.sigma_data) == ("trigflow",
                                                                                  "trigflow", 0.5)
  assert (t_info.process.name, t_info.prediction) == ("rectified_flow", "flow")
  state, frozen = e.init_state()
  for a, b in zip(jax.tree_util.tree_leaves(state.params["student"]),
                  jax.tree_util.tree_leaves(frozen["teacher"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.any(np.asarray(state.params["weight"]["fc2"]["kernel"]))  # w = 0 at start

  # At init the 1-step student sample is the teacher's 1-step Euler sample from the same noise.
  ctx = trainer.context_for(e, state, frozen)
  labels = np.arange(16, dtype=np.int32) % 8
  one, _ = evaluation.generate(ctx, "student", state.params["student"], n=16, seed=3,
                               solver="trigflow", steps=1, shape=(2,), labels=labels)
  eps = np.asarray(jax.random.normal(jax.random.split(jax.random.fold_in(
      jax.random.PRNGKey(3), 0))[0], (16, 2)))
  euler = eps - np.asarray(ctx.apply("teacher", jnp.asarray(eps), jnp.ones((16,)),
                                     {"class_labels": jnp.asarray(labels)}))
  np.testing.assert_allclose(one, euler, rtol=1e-5, atol=1e-5)

  hist = []
  for step in range(3):
    state, frozen, m = e.train_step(state, frozen, step)
    hist.append({k: float(v) for k, v in jax.device_get(m).items()})
  assert [h["scm/warmup"] for h in hist] == [0.0, 0.5, 1.0]
  assert all(np.isfinite(h["scm/loss"]) and h["scm/nonfinite"] == 0 for h in hist)
  assert all(h["scm/masked"] == 0 for h in hist)
  # Step 0: the student is the teacher and r = 0, so g = -cos^2 t (sd F^- - dx/dt) vanishes.
  assert hist[0]["scm/g_norm"] < 1e-5
  assert hist[1]["scm/g_norm"] > 1e-3 and hist[2]["scm/g_norm"] > 1e-3
  moved = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
           zip(jax.tree_util.tree_leaves(state.params["student"]),
               jax.tree_util.tree_leaves(frozen["teacher"]))]
  assert max(moved) > 0


class _ImplProbe(nn.Module):
  """Output scaled by 1 under attention impl 'xla', by 2 otherwise (which impl ran)."""
  attention: str = "pallas"
  jvp_attention: str = "xla"

  @nn.compact
  def __call__(self, x, timestep, class_labels=None):
    w = self.param("w", nn.initializers.ones, (x.shape[-1],))
    return (1.0 if self.attention == "xla" else 2.0) * w * x * timestep[:, None]


def test_tangent_pass_uses_jvp_attention():
  """The jvp pass runs the model with model.jvp_attention, the gradient pass with attention."""
  tf = procs.make_process("trigflow", sigma_data=1.0)
  module = _ImplProbe()
  ctx = ctx_lib.Context(params={}, ema={}, model_state={},
                        nets={"student": ctx_lib.NetInfo("student", module, "trigflow", tf, 0)})
  params = {"w": jnp.ones((DIM,))}
  x, t = jnp.ones((B, DIM)), jnp.full((B,), 0.5)
  tctx = scm.tangent_context(ctx, "student")
  assert tctx.nets["student"].module.attention == "xla" and ctx.nets["student"].module is module
  np.testing.assert_allclose(np.asarray(ctx.apply("student", x, t, params=params)), 1.0)
  np.testing.assert_allclose(np.asarray(tctx.apply("student", x, t, params=params)), 0.5)
  same = ctx_lib.NetInfo("student", _ImplProbe(attention="xla"), "trigflow", tf, 0)
  ctx2 = ctx.replace(nets={"student": same})
  assert scm.tangent_context(ctx2, "student") is ctx2
  # The shared pass (primal differentiated, tangent stop-gradient) gets the pair of the two.
  shared = scm.tangent_context(ctx, "student", shared=True)
  assert shared.nets["student"].module.attention == "pallas+xla"
  assert scm.tangent_context(ctx2, "student", shared=True) is ctx2


def test_builder_rejects_bad_keys():
  from distill.objective import OBJECTIVES
  import ml_collections
  entry = OBJECTIVES.get("scm")
  cfg = lambda **kw: ml_collections.ConfigDict({**entry.defaults, **kw})
  with pytest.raises(ValueError, match="objective.mode"):
    entry.build(cfg(mode="cd"))
  with pytest.raises(ValueError, match="objective.init"):
    entry.build(cfg(init="random"))  # sCD needs the teacher
  with pytest.raises(ValueError, match="guidance_sampling"):
    entry.build(cfg(guidance_sampling="normal"))
  sct = entry.build(cfg(mode="sct", init="random", adaptive_weight=False))
  assert [n.name for n in sct.networks] == ["student"] and sct.phases[0].trains == ("student",)
  assert entry.build(cfg(ema_decay=0.99)).ema == {"student": {"eval": 0.99}}


# ------------------------------------------------------------------ 5, 6. toy runs


def _env(devices=1):
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTILL_NO_PROGRESS": "1"}
  flags = e.get("XLA_FLAGS", "")
  if devices > 1:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  e["XLA_FLAGS"] = flags
  return e


def _train(config, workdir, *overrides, devices=1, timeout=900):
  cmd = [sys.executable, "-m", "launch.train", "--config", config, "--workdir", str(workdir),
         *overrides]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        env=_env(devices))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


TOY_DATA = "checkerboard"
# sCM differentiates the network in time: the teacher embeds its time s in [0, 1] (dense time
# embedding, model.time_scale = 1 / process.timestep_scale) instead of 1000 s.
TEACHER_SMALL = ["--config.model.hidden=64", "--config.model.depth=2",
                 "--config.model.time_scale=0.001",
                 "--config.train.steps=1500", "--config.train.log_every=500",
                 "--config.checkpoint.every_steps=0", "--config.eval.num_samples=2048",
                 "--config.eval.teacher_steps=32", "--config.sample.num=64"]
SCM_SMALL = ["--config.train.log_every=100", "--config.checkpoint.every_steps=0",
             "--config.eval.num_samples=2048", "--config.eval.teacher_steps=32",
             "--config.eval.steps=(1, 2)", "--config.sample.num=64"]


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
  w = tmp_path_factory.mktemp("scm") / "teacher"
  _train(os.path.join(ROOT, "configs", "toy", "teacher.py") + ":" + TOY_DATA, w, *TEACHER_SMALL)
  return w


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.slow
def test_toy_distillation_closes_the_gap(toy_teacher, tmp_path):
  w = tmp_path / "scm"
  _train(os.path.join(ROOT, "configs", "toy", "scm.py") + ":" + TOY_DATA, w,
         f"--config.teacher.checkpoint={toy_teacher}", "--config.train.steps=1000", *SCM_SMALL)
  report = json.load(open(w / "eval.json"))
  res = {k: v["swd"] for k, v in report["results"].items()}
  t1, tn, s1 = res["teacher_steps_1"], res["teacher_steps_32"], res["student_steps_1"]
  assert t1 > tn  # the teacher's few-step gap exists
  closed = (t1 - s1) / (t1 - tn)
  assert closed > 0.8, (res, closed)  # measured ~0.98 (docs/results_toy.md)
  assert res["student_steps_2"] < t1
  cfg = json.load(open(w / "config.json"))
  assert cfg["resolved"]["sampler"] == "trigflow"
  # The student's own process (its raw output is the teacher's `flow`), presented as TrigFlow.
  assert cfg["resolved"]["processes"]["student"]["name"] == "rectified_flow"
  assert cfg["resolved"]["networks"]["student"]["wrapper"].startswith("flow_to_trigflow")
  rows = _metrics(w)
  assert all(np.isfinite(r["scm/loss"]) and r["scm/nonfinite"] == 0 for r in rows)
  # The student moved away from the teacher.
  from distill import checkpoint as ckpt
  _, tree = ckpt.restore_raw(os.path.join(w, "checkpoints"))
  _, ttree = ckpt.restore_raw(os.path.join(toy_teacher, "checkpoints"))
  s = jax.tree_util.tree_leaves(tree["state"]["params"]["student"])
  t = jax.tree_util.tree_leaves(ttree["state"]["ema"]["model"]["eval"])
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(s, t)) > 1e-3


@pytest.mark.slow
def test_sharded_scm_matches_single_device(toy_teacher, tmp_path):
  common = [f"--config.teacher.checkpoint={toy_teacher}", "--config.train.steps=20",
            "--config.train.log_every=5", "--config.eval.at_end=false",
            "--config.checkpoint.every_steps=0", "--config.train.batch_size=64",
            "--config.objective.tangent_warmup=10"]
    # tangent_warmup < steps: the run exercises both the warm-up and r = 1.
  cfg = os.path.join(ROOT, "configs", "toy", "scm.py") + ":" + TOY_DATA
  one, eight = tmp_path / "one", tmp_path / "eight"
  _train(cfg, one, *common)
  _train(cfg, eight, *common, "--config.mesh.data=4", "--config.mesh.fsdp=2", devices=8)
  a, b = _metrics(one), _metrics(eight)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 10, 15, 20]
  keys = [k for k in a[0] if k.startswith("scm/") and "lr/" not in k]
  assert {"scm/loss", "scm/g_norm", "scm/grad_norm/student"} <= set(keys)
  for ra, rb in zip(a, b):
    for k in keys:
      # Same global draws; only the reduction order differs (sharded sums): rtol 2e-4.
      np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=1e-6, err_msg=k)
  assert json.load(open(eight / "config.json"))["resolved"]["mesh"] == {"data": 4, "fsdp": 2,
                                                                        "tensor": 1}


def test_config_json_records_the_wrapper_and_the_networks_own_process(tmp_path):
  """A wrapped student (flow_to_trigflow) is recorded with its own process (rectified flow, the
  one its raw `flow` output refers to) and its wrapper; loading it as a teacher says why not."""
  from distill import teacher as teacher_lib
  from distill import trainer
  from tests import _matching_utils as mu
  engine, _, _ = mu.make_engine("scm", mu.make_teacher(num_classes=4), batch=8)
  resolved = trainer._resolved(engine)  # pylint: disable=protected-access
  assert resolved["processes"]["student"]["name"] == "rectified_flow"
  assert resolved["models"]["student"]["prediction"] == "flow"
  assert resolved["networks"]["student"]["wrapper"].startswith("flow_to_trigflow")
  assert resolved["networks"]["teacher"]["wrapper"] is None
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text(json.dumps({"resolved": resolved}))
  with pytest.raises(ValueError, match="behind the wrapper 'flow_to_trigflow"):
    teacher_lib.load_teacher(str(tmp_path), "ema")
