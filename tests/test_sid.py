"""`sid`: PyTorch parity of the generator loss (gradients through the teacher's and the fake
network's *inputs*, no stop-gradient on their outputs) and of the fake-score loss (with LSG's
guided-output training), the few-step mixture generator, the guidance modes, the SiD gradient on
Gaussian data against its closed form, a toy run and the sharded run (8 fake CPU devices).
SiDA (the fake network's encoder as discriminator): PyTorch parity of its critic and generator
terms, their gradients on Gaussian data against closed forms, the schedule (generator held
back, GAN term switched on), a discriminator that learns, and the same in the sharded run.

Tolerances: float32 at the highest matmul precision on both sides: values to 1e-5 relative,
gradients (backpropagated through three networks) to 2e-4 relative of the largest entry.
"""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import processes as procs
from distill.objectives import matching as m
from distill.objectives import sid
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree, phase_kwargs, _gauss_expected_abs

torch = pytest.importorskip("torch")

CONFIG = os.path.join(mu.ROOT, "configs", "toy", "sid.py")
B = 16
K_REAL, K_FAKE, K_TRAIN = 2.0, -0.5, 1.5


@pytest.fixture(scope="module")
def setup():
  teacher = mu.make_teacher(num_classes=4, seed=5)
  engine, state, frozen = mu.make_engine(
      "sid", teacher, batch=B, null_label_prob=0.3, guidance_mode="custom",
      real_guidance=K_REAL, fake_guidance=K_FAKE, fake_train_guidance=K_TRAIN,
      fake_label_dropout=0.3, alpha=1.2, num_steps=2, t_min_frac=0.1, t_max_frac=0.9)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 6)
  params["fake_score"] = mu.perturb(params["fake_score"], 7)
  state = state.replace(params=params)
  batch = jax.device_get(engine.global_batch(0))
  return teacher, engine, state, frozen, batch


def test_guidance_modes_and_structure():
  assert sid.guidance_scales("lsg", 3.0, 0, 0, 0) == (3.0, 3.0, 3.0)
  assert sid.guidance_scales("zero", 3.0, 0, 0, 0) == (1.0, 0.0, 0.0)
  assert sid.guidance_scales("anti", 3.0, 0, 0, 0) == (1.0, -2.0, 1.0)
  assert sid.guidance_scales("custom", 3.0, 1.5, 0.5, 2.0) == (1.5, 0.5, 2.0)
  with pytest.raises(ValueError, match="guidance_mode"):
    sid.guidance_scales("nope", 1.0, 1, 1, 1)
  import ml_collections
  from distill.objective import OBJECTIVES
  obj = OBJECTIVES.get("sid").build(ml_collections.ConfigDict(dict(sid.DEFAULTS)))
  assert [p.name for p in obj.phases] == ["critic", "generator"]
  assert obj.phases[1].every == 1 and obj.sampler == "consistency"


def test_guided_prediction(setup):
  """guided(): scale 1 = one conditional pass, 0 = one null pass, s = u + s (c - u) in every
  kind (also per-sample scales)."""
  _, engine, state, frozen, batch = setup
  _, ctx = mu.phase_context(engine, state, frozen, ())
  x = jnp.asarray(batch["x"])
  t = jnp.linspace(0.1, 0.9, B)
  cond = {"class_labels": jnp.asarray(batch["label"])}
  null = {"class_labels": jnp.full((B,), 4, jnp.int32)}
  c = ctx.x0("teacher", x, t, cond)
  u = ctx.x0("teacher", x, t, null)
  np.testing.assert_allclose(m.guided(ctx, "teacher", x, t, cond, 1.0), c, rtol=1e-6)
  np.testing.assert_allclose(m.guided(ctx, "teacher", x, t, cond, 0.0), u, rtol=1e-6)
  np.testing.assert_allclose(m.guided(ctx, "teacher", x, t, cond, 2.5), u + 2.5 * (c - u),
                             rtol=1e-5, atol=1e-6)
  s = jnp.linspace(-1, 3, B)
  np.testing.assert_allclose(m.guided(ctx, "teacher", x, t, cond, s),
                             u + s[:, None] * (c - u), rtol=1e-5, atol=1e-6)
  # eps-space guidance is the same guided prediction seen as eps
  ge = m.guided(ctx, "teacher", x, t, cond, 2.5, "eps")
  gx = m.guided(ctx, "teacher", x, t, cond, 2.5, "x0")
  np.testing.assert_allclose(ge, (x - (1 - t)[:, None] * gx) / t[:, None], rtol=1e-4, atol=1e-5)


def _torch_x0(net, p, x_t, t, labels):
  return mu.rf_x0(net(p, x_t, 1000.0 * t, labels), x_t, t)


def _torch_cfg(net, p, x_t, t, labels, scale):
  null = torch.full_like(labels, 4)
  if scale == 1.0:
    return _torch_x0(net, p, x_t, t, labels)
  if scale == 0.0:
    return _torch_x0(net, p, x_t, t, null)
  c, u = _torch_x0(net, p, x_t, t, labels), _torch_x0(net, p, x_t, t, null)
  return u + scale * (c - u)


def _torch_generate(net, p_s, z, labels, gen):
  """Two-step mixture: k = 0 -> G(z, 1); k = 1 -> G(0.5 sg(G(z, 1)) + 0.5 n, 0.5)."""
  one = torch.ones(z.shape[0])
  with torch.no_grad():
    x0 = _torch_x0(net, {k: v.detach() for k, v in p_s.items()}, z, one, labels)
    x1 = 0.5 * x0 + 0.5 * mu.n2t(gen["renoise"][0])
  pick = mu.n2t(gen["k"]) == 1
  x_in = torch.where(pick[:, None], x1, z)
  t_in = torch.where(pick, torch.full_like(one, 0.5), one)
  return _torch_x0(net, p_s, x_in, t_in, labels)


def _generator_case(case, key: int, **extra):
  """The generator loss of `case` (setup / sida) in JAX ((value, metrics), student gradients,
  the loss function, its trainable params and draws) and the torch pieces of its reference:
  the networks' params (the student's with gradients), the step's labels, the generated x and
  its noised x_t (no detach: SiD backpropagates through both)."""
  teacher, engine, state, frozen, batch = case
  draw, kw = phase_kwargs(engine, "generator")
  assert (kw["real_guidance"], kw["fake_guidance"]) == (K_REAL, K_FAKE)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(key), batch["x"].shape)
  fn = lambda tr: sid.generator_loss_given(tr, ctx, batch, draws, **extra, **kw)
  out, grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)
  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  p_f = mu.torch_params(state.params["fake_score"])
  labels = mu.step_labels(batch, draws["gen"])
  x = _torch_generate(net, p_s, mu.n2t(draws["gen"]["z"]), labels, draws["gen"])
  t, eps = mu.n2t(draws["t"]), mu.n2t(draws["eps"])
  x_t = (1 - t)[:, None] * x + t[:, None] * eps
  return out, grads, fn, trainable, draws, net, p_s, p_t, p_f, labels, x, x_t


def test_generator_loss_matches_torch(setup, monkeypatch):
  """Value and student gradient; and a DMD-style stop-gradient on the network outputs would
  give a different gradient (so this really checks the path through the networks' inputs)."""
  (loss, metrics), grads, fn, trainable, draws, net, p_s, p_t, p_f, labels, x, x_t = (
      _generator_case(setup, 8))
  assert 0 < np.asarray(draws["gen"]["k"]).sum() < B  # both mixture components present
  assert 0 < int(np.sum(draws["gen"]["null"])) < B  # some labels are null
  t = mu.n2t(draws["t"])
  y_r = _torch_cfg(net, p_t, x_t, t, labels, K_REAL)
  y_f = _torch_cfg(net, p_f, x_t, t, labels, K_FAKE)
  w = torch.clamp(torch.mean(torch.abs(x - y_r), dim=1), min=1e-5).detach()
  per = torch.sum((y_r - y_f) * ((y_r - x) - 1.2 * (y_r - y_f)), dim=1) / w
  ref = per.mean()
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    rtol=2e-4, what="d/dstudent")

  orig = sid.sid_loss
  monkeypatch.setattr(sid, "sid_loss", lambda x, y_r, y_f, alpha: orig(
      x, jax.lax.stop_gradient(y_r), jax.lax.stop_gradient(y_f), alpha))
  g_sg = jax.jit(jax.grad(lambda tr: fn(tr)[0]))(trainable)
  a = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(grads)])
  b = np.concatenate([np.ravel(v) for v in jax.tree_util.tree_leaves(g_sg)])
  assert np.linalg.norm(a - b) > 0.05 * np.linalg.norm(a)


def _critic_case(case, key: int):
  """The critic loss of `case` (setup / sida) in JAX (value, metrics, fake gradients) and the
  torch pieces of its reference: the fake network's params, the generated x, the fake loss's
  t, eps and (label-dropped) labels."""
  teacher, engine, state, frozen, batch = case
  draw, kw = phase_kwargs(engine, "critic")
  assert kw["train_guidance"] == K_TRAIN
  trainable, ctx = mu.phase_context(engine, state, frozen, ("fake_score",))
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(key), batch["x"].shape)
  fn = lambda tr: sid.critic_loss_given(tr, ctx, batch, draws, **kw)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)
  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"])
  p_f = mu.torch_params(state.params["fake_score"], requires_grad=True)
  labels = mu.step_labels(batch, draws["gen"])
  with torch.no_grad():
    x = _torch_generate(net, p_s, mu.n2t(draws["gen"]["z"]), labels, draws["gen"])
  f = draws["fake"]
  t, eps = mu.n2t(f["t"]), mu.n2t(f["eps"])
  lab = torch.where(mu.n2t(f["drop"]).bool(), torch.full_like(labels, 4), labels)
  return loss, metrics, grads, net, p_f, x, t, eps, lab


def test_fake_loss_matches_torch(setup):
  """The fake score's loss with LSG's guided-output training (k_train) and label dropout."""
  loss, _, grads, net, p_f, x, t, eps, lab = _critic_case(setup, 9)
  x_t = (1 - t)[:, None] * x + t[:, None] * eps
  c = net(p_f, x_t, 1000.0 * t, lab)
  u = net(p_f, x_t, 1000.0 * t, torch.full_like(lab, 4))
  pred = u + K_TRAIN * (c - u)
  ref = torch.mean(torch.mean((pred - (eps - x)) ** 2, dim=1))
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["fake_score"]),
                    {k: mu.t2n(v.grad) for k, v in p_f.items()}, rtol=2e-4, what="d/dfake")


# --------------------------------------------------------------------------------------------
# SiDA: the fake network's encoder as the discriminator
# --------------------------------------------------------------------------------------------

GAN_W, GAN_D_W, GAN_START, BLOCK = 0.05, 0.7, 3, 0


@pytest.fixture(scope="module")
def sida(setup):
  teacher, _, state, _, _ = setup
  engine, _, frozen = mu.make_engine(
      "sid", teacher, batch=B, null_label_prob=0.3, guidance_mode="custom",
      real_guidance=K_REAL, fake_guidance=K_FAKE, fake_train_guidance=K_TRAIN,
      fake_label_dropout=0.3, alpha=1.0, num_steps=2, t_min_frac=0.1, t_max_frac=0.9,
      gan_weight=GAN_W, gan_d_weight=GAN_D_W, discriminator="encoder", gan_feature_block=BLOCK,
      gan_start_step=GAN_START, generator_start_step=2)
  batch = jax.device_get(engine.global_batch(0))
  return teacher, engine, state, frozen, batch


def test_sida_structure_and_schedule(sida):
  """No head network (the discriminator is the fake network itself); the critic trains from
  step 0, the generator from `generator_start_step` (its optimizer counts only those steps)."""
  _, engine, state, frozen, _ = sida
  state, frozen = jax.tree_util.tree_map(jnp.array, (state, frozen))   # steps donate buffers
  assert [n.name for n in engine.objective.networks] == ["teacher", "student", "fake_score"]
  critic, gen = engine.objective.phases
  assert critic.trains == ("fake_score",) and gen.start == 2
  ran = []
  for step in range(4):
    state, frozen, metrics = engine.train_step(state, frozen, step)
    ran.append("generator/loss" in metrics)
    assert {"critic/d", "critic/p_real", "critic/p_fake"} <= set(metrics)
  assert ran == [False, False, True, True]
  from tests.test_dmd2 import _opt_count
  assert (_opt_count(state.opt_state["fake_score"]), _opt_count(state.opt_state["student"])) == (
      4, 2)
  import ml_collections
  from distill.objective import OBJECTIVES
  for key, value, match in [("discriminator", "nope", "objective.discriminator"),
                            ("gan_start_step", -1, "objective.gan_start_step")]:
    cfg = ml_collections.ConfigDict(dict(sid.DEFAULTS))
    cfg[key] = value
    with pytest.raises(ValueError, match=match):
      OBJECTIVES.get("sid").build(cfg)


def test_sida_discriminator_learns_real_from_fake():
  """The critic alone (generator held back) on real gmm points against the untrained student's
  samples: the fake network's channel-mean logits come to separate them (over the last 40 of
  100 steps at lr 1e-2 the D loss is below log 2 and p_real above p_fake; measured ~0.64 and
  0.52 vs 0.44), while the fake score's own loss falls."""
  c = mu.tiny_config("sid", "gmm", 64, gan_weight=0.01, gan_d_weight=1.0,
                     discriminator="encoder", gan_feature_block=0, generator_start_step=10**6,
                     null_label_prob=0.0)
  c.optim.lr = 1e-2
  from distill.engine import Engine
  engine = Engine(c, teacher=mu.make_teacher(4))
  state, frozen = engine.init_state()
  rows = []
  for step in range(100):
    state, frozen, metrics = engine.train_step(state, frozen, step)
    rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
  assert not any("generator/loss" in r for r in rows)
  mean = lambda k: float(np.mean([r[k] for r in rows[-40:]]))
  assert mean("critic/d") < math.log(2) - 0.02, mean("critic/d")
  assert mean("critic/p_real") - mean("critic/p_fake") > 0.04
  assert mean("critic/fake") < float(np.mean([r["critic/fake"] for r in rows[:10]]))


def _torch_cfg_features(net, p, x_t, t, labels, scale):
  """CFG x0 prediction and the conditional pass's block-BLOCK features."""
  c, feats = net(p, x_t, 1000.0 * t, labels, feature_block=BLOCK)
  u = net(p, x_t, 1000.0 * t, torch.full_like(labels, 4))
  return mu.rf_x0(u + scale * (c - u), x_t, t), feats


@pytest.mark.parametrize("step", [GAN_START - 1, GAN_START])
def test_sida_generator_loss_matches_torch(sida, step):
  """Before `gan_start_step` the SiD loss alone; from it 0.5 L_G + 0.5 gan_weight L_GAN with
  L_GAN = dim(x) mean_b(1/w_b) BCE(clip(mean_channels h_fake(x_t)), 1), h from the very forward
  that gives y_fake (CFG's conditional half). Value and student gradient."""
  (loss, metrics), grads, _, _, draws, net, p_s, p_t, p_f, labels, x, x_t = _generator_case(
      sida, 18, step=step)
  t = mu.n2t(draws["t"])
  y_r = _torch_cfg(net, p_t, x_t, t, labels, K_REAL)
  y_f, feats = _torch_cfg_features(net, p_f, x_t, t, labels, K_FAKE)
  w = torch.clamp(torch.mean(torch.abs(x - y_r), dim=1), min=1e-5).detach()
  l_sid = (torch.sum((y_r - y_f) * ((y_r - x) - 1.0 * (y_r - y_f)), dim=1) / w).mean()
  logits = torch.clamp(feats.mean(dim=-1), -10, 10)
  bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
  l_gan = x.shape[1] * (1.0 / w).mean() * bce
  ref = 0.5 * l_sid + 0.5 * GAN_W * l_gan if step >= GAN_START else l_sid
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["gan"]), float(l_gan.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    rtol=2e-4, what="d/dstudent")


def test_sida_critic_loss_matches_torch(sida):
  """L_fake + gan_d_weight 1/2 [BCE(D(x_real), 1) + BCE(D(x_g), 0)]: D(x_g) from the fake
  loss's own (guided, label-dropped) forward, x_real noised with the same t and eps under the
  same condition. Value and fake-network gradient."""
  loss, metrics, grads, net, p_f, x, t, eps, lab = _critic_case(sida, 19)
  batch = sida[4]
  x_t = (1 - t)[:, None] * x + t[:, None] * eps
  c, feats_fake = net(p_f, x_t, 1000.0 * t, lab, feature_block=BLOCK)
  u = net(p_f, x_t, 1000.0 * t, torch.full_like(lab, 4))
  l_fake = torch.mean(torch.mean((u + K_TRAIN * (c - u) - (eps - x)) ** 2, dim=1))
  x_real = mu.n2t(batch["x"])
  _, feats_real = net(p_f, (1 - t)[:, None] * x_real + t[:, None] * eps, 1000.0 * t, lab,
                      feature_block=BLOCK)
  bce = torch.nn.functional.binary_cross_entropy_with_logits
  lr, lf = feats_real.mean(-1), feats_fake.mean(-1)
  l_d = 0.5 * (bce(lr, torch.ones_like(lr)) + bce(lf, torch.zeros_like(lf)))
  ref = l_fake + GAN_D_W * l_d
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["d"]), float(l_d.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["fake_score"]),
                    {k: mu.t2n(v.grad) for k, v in p_f.items()}, rtol=2e-4, what="d/dfake")


def _sida_linear_ctx(c, student_m=None, A=None):
  """Rectified flow, x0 networks: the teacher and the fake score both predict the constant c
  (so y_r = y_f and the SiD term has no gradient, and the fake's denoising loss does not depend
  on its features' weights); the fake network's block-0 features are x_t A (B, 3), so SiDA's
  logit is x_t . a with a = A's row means; the student is the constant params["m"]."""
  process = procs.make_process("rectified_flow")

  def const_fn(variables, x, timestep, return_features=()):
    out = jnp.broadcast_to(jnp.asarray(c, jnp.float32), x.shape)
    return (out, {b: x @ variables["params"]["A"] for b in return_features}) if (
        return_features) else out

  def student_fn(variables, x, timestep):
    return jnp.broadcast_to(variables["params"]["m"], x.shape)

  info = lambda name, fn: ctx_lib.NetInfo(name=name, module=None, prediction="x0",
                                          process=process, apply_fn=fn)
  nets = {"teacher": info("teacher", const_fn), "fake_score": info("fake_score", const_fn),
          "student": info("student", student_fn)}
  params = {"teacher": {"A": jnp.zeros((2, 3))}}
  if student_m is not None:
    params["student"] = {"m": jnp.asarray(student_m, jnp.float32)}
  if A is not None:
    params["fake_score"] = {"A": jnp.asarray(A, jnp.float32)}
  return process, ctx_lib.Context(params=params, ema={}, model_state={}, nets=nets)


@pytest.mark.parametrize("real_stream", ["", "real"])
def test_sida_gradients_on_gaussian_data_closed_form(real_stream):
  """Real x ~ N(mu, 0.1^2 I), generator x_g = m, x_t = (1 - t) x + t eps, linear logit a . x_t.
  Critic at a = 0 (every sigmoid is 1/2): d L_D / d a = E[alpha] (m - mu) / 4 (real and fake
  share t and eps, so the noise cancels), spread evenly over the 3 feature channels.
  Generator (from gan_start_step; y_r = y_f, so only the GAN term moves m): with
  w = mean|m - c| and a ~ 1e-3 (sigmoid(-a . x_t) = 1/2 to 1e-3),
  d L / d m = 0.5 gan_weight dim(x) / w * (-1/2) E[alpha] a. 200k samples (the Monte-Carlo
  error of the critic's gradient is ~2e-4 relative). With `real_stream` the real images come
  from that stream (the train batch only carries the shape, as the `prompts` source's does),
  the same gradient; a real batch of another size is refused in one line."""
  n, mu, m, c, gw = 200_000, np.float32([0.3, -0.2]), np.float32([0.1, 0.25]), 0.7, 0.05
  x_real = jnp.asarray(mu) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  batch = {"x": x_real}
  if real_stream:
    batch = {"x": jnp.zeros((n, 2)), real_stream: {"x": x_real}}
  process, ctx = _sida_linear_ctx(c, student_m=m)
  draws = sid.critic_draws(process, jax.random.PRNGKey(1), (n, 2), num_steps=1, null_prob=0.0,
                           label_dropout=0.0, gan_window=(0.0, 1.0))
  crit = lambda tr, b=batch: sid.critic_loss_given(tr, ctx, b, draws, num_steps=1,
                                                   fake_weighting="none", train_guidance=1.0,
                                                   gan_d_weight=1.0, gan_feature_block=0,
                                                   discriminator="encoder", gan=True,
                                                   real_stream=real_stream)[0]
  g_a = jax.grad(crit)({"fake_score": {"A": jnp.zeros((2, 3))}})["fake_score"]["A"]
  if real_stream:
    half = {"x": batch["x"], real_stream: {"x": x_real[: n // 2]}}
    with pytest.raises(ValueError, match=r"'data_streams.real.batch_size': SiDA noises the real "
                                         r"images with the generator samples' t and eps"):
      crit({"fake_score": {"A": jnp.zeros((2, 3))}}, half)
  e_alpha = 1.0 - float(np.mean(draws["fake"]["t"]))
  want = e_alpha * (m - mu) / 4 / 3
  np.testing.assert_allclose(np.asarray(g_a), np.repeat(want[:, None], 3, axis=1), rtol=0.01)

  A = 1e-3 * np.float32([[1.0, 2.0, 0.0], [-1.5, 0.5, -2.0]])
  process, gctx = _sida_linear_ctx(c, A=A)
  gdraws = sid.generator_draws(process, jax.random.PRNGKey(2), (n, 2), num_steps=1,
                               null_prob=0.0, time=functools.partial(
                                   sid.sample_time, time_dist="window", t_min_frac=0.02,
                                   t_max_frac=0.98, logit_mean=0.0, logit_std=1.0),
                               gan_window=(0.0, 1.0))
  gen = lambda tr: sid.generator_loss_given(
      tr, gctx, batch, gdraws, num_steps=1, alpha=1.0, real_guidance=1.0, fake_guidance=1.0,
      loss_scale=1.0, gan_weight=gw, gan_feature_block=0, discriminator="encoder",
      gan_start=0, step=0)[0]
  g_m = jax.grad(gen)({"student": {"m": jnp.asarray(m)}})["student"]["m"]
  w = float(np.mean(np.abs(m - c)))
  e_alpha = 1.0 - float(np.mean(gdraws["t"]))
  want = 0.5 * gw * 2 / w * (-0.5) * e_alpha * A.mean(axis=1)
  np.testing.assert_allclose(np.asarray(g_m), want, rtol=0.01)


def test_grad_clip_value_clips_each_entry():
  """`optim.grad_clip_value` (SiDA clips the fake network's gradients at 1): entries beyond
  the bound are clipped before the optimizer, the rest pass unchanged."""
  from distill import optim
  s = {k: 0.0 for k in optim.OPTIMIZER_KEYS} | {"name": "sgd", "lr": 1.0, "b1": 0.0,
                                                "grad_clip_value": 1.0}
  tx = optim.make_optimizer(s)
  g = {"w": jnp.array([-3.0, -0.5, 0.2, 7.0])}
  updates, _ = tx.update(g, tx.init(g), g)
  np.testing.assert_array_equal(updates["w"], np.float32([1.0, 0.5, -0.2, -1.0]))  # -lr clip(g)


@pytest.mark.parametrize("t_value,delta,v", [(0.3, 0.4, 1.0), (0.6, -0.3, 1.6), (0.5, 0.2, 0.6)])
def test_sid_gradient_gaussian_closed_form(t_value, delta, v):
  """SiD's generator gradient for Gaussian data (exact teacher and fake scores).

  Data N(mu, s^2 I_D), generator x = m + v z with m = mu + delta, fake exact for N(m, v^2).
  Rectified flow at t: a = 1 - t, sig = t, x_t = a x + sig eps; y = (1 - a k) mean + k x_t with
  k_r = a s^2 / (a^2 s^2 + sig^2), k_f = a v^2 / (a^2 v^2 + sig^2). Per element,
  L = d ((y_r - x) - alpha d) / w with d = y_r - y_f and the gradient through x_t
  (dx_t/dx = a): with D = a (k_r - k_f), dd/dx = D, dy_r/dx = a k_r,

    w dL/dx = D ((y_r - x) - alpha d) + d (a k_r - 1 - alpha D).

  It is linear in (z, eps); E[y_r - x] = E[d] = (1 - a k_r)(mu - m), so

    dL/dm_d   -> (1 - a k_r) delta (1 - a k_r - D (1 - 2 alpha)) / w_bar,
    dL/dlog v -> Dim * (-2 D v^2 ((1 - a k_r) + alpha D)) / w_bar     (the z-coefficient of
                                                                      w dL/dx times v),

  with w_bar = E|N(A, C^2)|, A = (1 - a k_r) delta, C^2 = (1 - a k_r)^2 v^2 + k_r^2 sig^2 (the
  normaliser concentrates for large Dim). With v = s (D = 0) dL/dm = (1 - a k_r)^2 delta / w:
  descent moves m to mu; v > s gives dL/dlog v > 0 (descent shrinks v) and vice versa.
  """
  dim, b, s, alpha = 1024, 128, 1.0, 1.2
  mu_vec = np.linspace(-1, 1, dim).astype(np.float32)
  nets, params = mu.gaussian_context(mu_vec, s, dim=dim, fake=(mu_vec + delta, v))
  ctx = ctx_lib.Context(params=params, ema={}, model_state={}, nets=nets)
  trainable = {"student": {"m": jnp.asarray(mu_vec + delta), "log_v": jnp.log(jnp.float32(v))}}
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  draws = {"gen": {"z": jax.random.normal(k1, (b, dim))}, "t": jnp.full((b,), t_value),
           "eps": jax.random.normal(k2, (b, dim))}
  fn = lambda tr: sid.generator_loss_given(tr, ctx, {"x": jnp.zeros((b, dim))}, draws,
                                           num_steps=1, alpha=alpha, real_guidance=1.0,
                                           fake_guidance=1.0, loss_scale=1.0)[0]
  g = jax.jit(jax.grad(fn))(trainable)["student"]
  a, sig = 1 - t_value, t_value
  k_r = a * s * s / (a * a * s * s + sig * sig)
  k_f = a * v * v / (a * a * v * v + sig * sig)
  big_d = a * (k_r - k_f)
  w_bar = _gauss_expected_abs((1 - a * k_r) * delta,
                              math.sqrt((1 - a * k_r) ** 2 * v * v + k_r ** 2 * sig ** 2))
  want_m = (1 - a * k_r) * delta * (1 - a * k_r - big_d * (1 - 2 * alpha)) / w_bar
  want_v = dim * (-2 * big_d * v * v * ((1 - a * k_r) + alpha * big_d)) / w_bar
  gm = np.asarray(g["m"])
  assert np.mean(np.sign(gm) == np.sign(delta)) > 0.9  # per coordinate: B Monte-Carlo draws
  np.testing.assert_allclose(gm.mean(), want_m, rtol=0.03)
  if v == s:
    assert abs(float(g["log_v"])) < 0.05 * abs(gm.mean()) * dim
  else:
    assert np.sign(float(g["log_v"])) == np.sign(v - s)
    np.testing.assert_allclose(float(g["log_v"]), want_v, rtol=0.08)


# --------------------------------------------------------------------------------------------
# Subprocess runs (slow)
# --------------------------------------------------------------------------------------------

SMALL = ["--config.train.batch_size=64", "--config.eval.num_samples=256",
         "--config.eval.teacher_steps=8", "--config.sample.num=64",
         "--config.checkpoint.async_save=false"]


def losses(rows):
  return [{k: v for k, v in r.items()
           if k == "step" or k.endswith(("/loss", "/sid", "/fake", "/gan", "/d"))} for r in rows]


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  """The few-step mixture with SiDA's discriminator (its BCE means over the global batch, the
  generator's GAN term switched on at step 3) logs the same losses on 8 devices as on 1."""
  teacher = mu.shared_tiny_teacher("gmm", 20)
  args = [*SMALL, f"--config.teacher.checkpoint={teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.checkpoint.every_steps=0",
          "--config.eval.at_end=false", "--config.objective.num_steps=2",
          "--config.objective.gan_weight=0.05", "--config.objective.discriminator=encoder",
          "--config.objective.gan_feature_block=0", "--config.objective.gan_d_weight=1.0",
          "--config.objective.gan_start_step=3"]
  mu.check_sharded_losses(CONFIG, tmp_path, args, losses, ("generator/sid", "critic/d",
                                                           "generator/gan"))


@pytest.mark.slow
def test_toy_run_closes_the_one_step_gap(tmp_path):
  """A small spiral teacher, then 600 SiD steps: >= 60% of the 1-step gap closed; the student's
  weights moved away from the teacher's."""
  mu.check_toy_run(CONFIG, tmp_path, 600)
