"""`dmd2`: PyTorch parity of both losses (value and gradients), the DMD gradient on Gaussian data
against its closed form, the 5:1 TTUR (optimizer counts; exact resume after SIGKILL mid-cycle),
a toy run that closes the teacher's 1-step gap, and the sharded run (8 fake CPU devices).

Tolerances: float32 at the highest matmul precision on both sides; the networks are the same
weights run by two frameworks, so values agree to ~1e-6 relative; gradients (sums over the
batch of products through 2-3 networks) to 1e-4 relative of the largest entry.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.objectives import dmd2
from tests import _matching_utils as mu
from tests.test_train_e2e import kill_after_checkpoint

torch = pytest.importorskip("torch")

CONFIG = os.path.join(mu.ROOT, "configs", "toy", "dmd2.py")
B = 16


def assert_close_tree(ours: dict, ref: dict, rtol=1e-4, what=""):
  assert set(ours) == set(ref), (sorted(ours), sorted(ref))
  scale = max(max(np.max(np.abs(v)) for v in ref.values()), 1e-12)
  for k in ours:
    np.testing.assert_allclose(ours[k], ref[k], rtol=rtol, atol=rtol * scale,
                               err_msg=f"{what} {k}")


@pytest.fixture(scope="module")
def setup():
  """A class-conditional random teacher; student and fake perturbed away from it; GAN on."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine(
      "dmd2", teacher, batch=B, null_label_prob=0.3, gan_weight=0.3, gan_d_weight=0.7,
      gan_feature_dim=16, gan_hidden=8, real_guidance=2.5, fake_label_dropout=0.25,
      regression_weight=0.5, regression_pairs=10, regression_batch=4, regression_teacher_steps=3)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  params["fake_score"] = mu.perturb(params["fake_score"], 2)
  state = state.replace(params=params)
  batch = jax.device_get(engine.global_batch(0))
  return teacher, engine, state, frozen, batch


def phase_kwargs(engine, name):
  phase = [p for p in engine.objective.phases if p.name == name][0]
  kw = dict(phase.loss.keywords)
  return kw.pop("draw"), kw


def test_objective_structure():
  teacher = mu.make_teacher(num_classes=4)
  from distill.objective import OBJECTIVES
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(OBJECTIVES.get("dmd2").defaults))
  obj = OBJECTIVES.get("dmd2").build(cfg)
  assert [n.name for n in obj.networks] == ["teacher", "student", "fake_score"]
  assert obj.network("teacher").frozen and obj.sampler == "consistency"
  critic, gen = obj.phases
  assert (critic.name, critic.trains, critic.every) == ("critic", ("fake_score",), 1)
  assert (gen.name, gen.trains, gen.every, gen.offset) == ("generator", ("student",), 5, 4)
  cfg.gan_weight = 1e-3
  cfg.fake_updates = 3
  obj = OBJECTIVES.get("dmd2").build(cfg)
  assert obj.phases[0].trains == ("fake_score", "gan_head")
  assert (obj.phases[1].every, obj.phases[1].offset) == (3, 2)
  assert obj.real_data is True and obj.phases[0].streams == ("train",)
  cfg.real_stream = "real"   # the GAN's real images from data_streams.real
  obj = OBJECTIVES.get("dmd2").build(cfg)
  assert obj.real_data == "real" and obj.phases[0].streams == ("train", "real")
  assert obj.phases[1].streams == ("train",)
  cfg.gan_weight = 0.0
  with pytest.raises(ValueError, match="'objective.real_stream': 'real' holds the GAN's real "
                                       r"images, but the GAN term is off"):
    OBJECTIVES.get("dmd2").build(cfg)
  cfg.gan_weight, cfg.real_stream = 1e-3, ""
  cfg.t_min_frac = 0.99
  with pytest.raises(ValueError, match="objective.t_min_frac"):
    OBJECTIVES.get("dmd2").build(cfg)
  del teacher


def test_mlp_return_features(setup):
  """models/mlp.py's `return_features` (read by the GAN head): the output is unchanged and the
  features are the residual stream after the requested blocks (negative from the end)."""
  teacher, _, _, frozen, batch = setup
  x, t = jnp.asarray(batch["x"]), jnp.linspace(0.0, 900.0, B)
  variables = {"params": frozen["teacher"]}
  plain = teacher.module.apply(variables, x, t)
  out, feats = teacher.module.apply(variables, x, t, return_features=(0, -1))
  np.testing.assert_array_equal(out, plain)
  assert set(feats) == {0, -1} and feats[0].shape == (B, 16)
  _, last = teacher.module.apply(variables, x, t, return_features=(1,))
  np.testing.assert_array_equal(feats[-1], last[1])
  with pytest.raises(ValueError, match="out of range"):
    teacher.module.apply(variables, x, t, return_features=(2,))


def _torch_generator(x_in, labels, p_student, net):
  one = torch.ones(x_in.shape[0])
  return mu.rf_x0(net(p_student, x_in, 1000.0 * one, labels), x_in, one)


def _torch_cfg_x0(net, p, x_t, t, labels, null, scale):
  c = mu.rf_x0(net(p, x_t, 1000.0 * t, labels), x_t, t)
  u = mu.rf_x0(net(p, x_t, 1000.0 * t, null), x_t, t)
  return u + scale * (c - u)


def test_generator_loss_matches_torch(setup):
  """L_G = L_DM + w_gan L_GAN + w_reg L_reg: value and gradient w.r.t. every student weight."""
  teacher, engine, state, frozen, batch = setup
  draw, kw = phase_kwargs(engine, "generator")
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(3), batch["x"].shape)
  fn = lambda tr: dmd2.generator_loss_given(tr, ctx, batch, draws, **kw)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  p_f = mu.torch_params(state.params["fake_score"])
  p_h = mu.torch_params(state.params["gan_head"])
  z = mu.n2t(draws["gen"]["z"])
  labels = mu.step_labels(batch, draws["gen"])
  assert 0 < int(np.sum(draws["gen"]["null"])) < B  # some labels are null
  null = torch.full_like(labels, 4)
  t = mu.n2t(draws["t"])
  eps = mu.n2t(draws["eps"])
  x = _torch_generator(z, labels, p_s, net)
  with torch.no_grad():
    x_t = (1 - t)[:, None] * x + t[:, None] * eps
    mu_r = _torch_cfg_x0(net, p_t, x_t, t, labels, null, 2.5)
    mu_f = mu.rf_x0(net(p_f, x_t, 1000.0 * t, labels), x_t, t)
    w = torch.mean(torch.abs(x - mu_r), dim=1, keepdim=True)
    g = (mu_f - mu_r) / w
  l_dm = 0.5 * torch.mean((x - (x - g).detach()) ** 2)
  td, ed = mu.n2t(draws["gan"]["t"]), mu.n2t(draws["gan"]["eps"])
  x_d = (1 - td)[:, None] * x + td[:, None] * ed
  _, feats = net(p_f, x_d, 1000.0 * td, labels, feature_block=-1)
  l_gan = torch.nn.functional.softplus(-mu.torch_head(p_h, feats)).mean()
  # DMD1 regression: the pairs' noises are the implementation's fixed, index-keyed inputs.
  idx = jax.random.randint(draws["reg"], (4,), 0, 10)
  zr = jax.vmap(lambda i: engine.nets["student"].process.prior(
      jax.random.fold_in(jax.random.PRNGKey(0), i), (2,)))(idx)
  lr_ = mu.n2t(np.asarray(idx) % 4)
  zr = mu.n2t(zr)
  with torch.no_grad():  # 3 Euler steps of the guided teacher ODE: x += (t_n - t) * flow
    y = zr.clone()
    for tc, tn in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:
      tt = torch.full((4,), tc)
      c = net(p_t, y, 1000.0 * tt, lr_)
      u = net(p_t, y, 1000.0 * tt, torch.full_like(lr_, 4))
      y = y + (tn - tc) * (u + 2.5 * (c - u))
  l_reg = torch.mean(torch.sum((_torch_generator(zr, lr_, p_s, net) - y) ** 2, dim=1))
  ref = l_dm + 0.3 * l_gan + 0.5 * l_reg
  ref.backward()

  np.testing.assert_allclose(float(metrics["dm"]), float(l_dm.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["gan"]), float(l_gan.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["regression"]), float(l_reg.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  ours = mu.flat_params(grads["student"])
  assert_close_tree(ours, {k: mu.t2n(v.grad) for k, v in p_s.items()}, what="d/dstudent")


@pytest.mark.parametrize("real_stream", ["", "real"])
def test_critic_loss_matches_torch(setup, real_stream):
  """L_fake + w_D L_D: value and gradients w.r.t. the fake network and the GAN head. With
  `real_stream` the discriminator's real images are another stream's (another batch size),
  read under their own labels, as DMD2's text-to-image runs read images with their captions."""
  teacher, engine, state, frozen, batch = setup
  draw, kw = phase_kwargs(engine, "critic")
  trainable, ctx = mu.phase_context(engine, state, frozen, ("fake_score", "gan_head"))
  real_x, real_labels = batch["x"], None
  if real_stream:
    rng = np.random.default_rng(7)
    real_x = rng.normal(size=(B // 2, batch["x"].shape[1])).astype(np.float32) + 2.0
    real_labels = rng.integers(0, 4, B // 2).astype(np.int32)
    batch = {**batch, real_stream: {"x": real_x, "label": real_labels}}
    kw = {**kw, "real_stream": real_stream}
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(4), batch["x"].shape,
               real_shape=real_x.shape)
  assert draws["gan_real"]["eps"].shape == real_x.shape
  fn = lambda tr: dmd2.critic_loss_given(tr, ctx, batch, draws, **kw)
  (loss, metrics), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)
  assert float(jnp.mean(draws["fake"]["drop"])) > 0  # some labels are dropped

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"])
  p_f = mu.torch_params(state.params["fake_score"], requires_grad=True)
  p_h = mu.torch_params(state.params["gan_head"], requires_grad=True)
  labels = mu.step_labels(batch, draws["gen"])
  with torch.no_grad():
    x = _torch_generator(mu.n2t(draws["gen"]["z"]), labels, p_s, net)
  f = draws["fake"]
  t, eps = mu.n2t(f["t"]), mu.n2t(f["eps"])
  lab = torch.where(mu.n2t(f["drop"]).bool(), torch.full_like(labels, 4), labels)
  x_t = (1 - t)[:, None] * x + t[:, None] * eps
  l_fake = torch.mean(torch.mean((net(p_f, x_t, 1000.0 * t, lab) - (eps - x)) ** 2, dim=1))

  def logits(x0, d, lab):
    td, ed = mu.n2t(d["t"]), mu.n2t(d["eps"])
    xd = (1 - td)[:, None] * x0 + td[:, None] * ed
    _, feats = net(p_f, xd, 1000.0 * td, lab, feature_block=-1)
    return mu.torch_head(p_h, feats)
  sp = torch.nn.functional.softplus
  own = labels if real_labels is None else torch.as_tensor(real_labels).long()
  l_d = sp(logits(x, draws["gan_fake"], labels)).mean() + sp(
      -logits(mu.n2t(real_x), draws["gan_real"], own)).mean()
  ref = l_fake + 0.7 * l_d
  ref.backward()
  np.testing.assert_allclose(float(metrics["fake"]), float(l_fake.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["d"]), float(l_d.detach()), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["fake_score"]),
                    {k: mu.t2n(v.grad) for k, v in p_f.items()}, what="d/dfake")
  assert_close_tree(mu.flat_params(grads["gan_head"]),
                    {k: mu.t2n(v.grad) for k, v in p_h.items()}, what="d/dhead")


def _gauss_expected_abs(a, b):
  """E|N(a, b^2)|."""
  return b * math.sqrt(2 / math.pi) * math.exp(-a * a / (2 * b * b)) + a * math.erf(
      a / (b * math.sqrt(2)))


@pytest.mark.parametrize("t_value,delta,v", [(0.3, 0.4, 1.5), (0.7, -0.3, 0.5)])
def test_dm_gradient_gaussian_closed_form(t_value, delta, v):
  """DMD's generator gradient for Gaussian data, where both scores are exact.

  Data x0 ~ N(mu, s^2 I_D); generator x = m + v z (params m, log v), m = mu + delta 1; fake score
  exact for N(m, v^2). Rectified flow at time t: x_t = a x + sig eps, a = 1 - t, sig = t, and
  E[x0 | x_t] = mean + k (x_t - a mean) with k = a var / (a^2 var + sig^2). So

    mu_f - mu_r = (1 - a k_f) m - (1 - a k_r) mu + (k_f - k_r) x_t,
    E[mu_f - mu_r] = (1 - a k_r)(m - mu),     E[(mu_f - mu_r) z] = (k_f - k_r) a v.

  The normaliser w = mean_dims |x - mu_r|: per dimension x - mu_r ~ N(A, C^2) with
  A = (1 - a k_r) delta, C^2 = (1 - a k_r)^2 v^2 + k_r^2 sig^2, so for large D, w -> E|N(A, C^2)|
  = w_bar. With L = 1/2 mean (x - sg(x - g))^2, g = (mu_f - mu_r) / w over N = B D entries:

    dL/dm_d     -> (1 - a k_r) delta / (D w_bar)           (descent moves m towards mu)
    dL/dlog v   -> (k_f - k_r) a v^2 / w_bar               (> 0 iff v > s: descent shrinks v
                                                            towards s, and vice versa)
  """
  dim, b, s = 1024, 128, 1.0
  mu_vec = np.linspace(-1, 1, dim).astype(np.float32)
  nets, params = mu.gaussian_context(mu_vec, s, dim=dim, fake=(mu_vec + delta, v))
  from distill import context as ctx_lib
  ctx = ctx_lib.Context(params=params, ema={}, model_state={}, nets=nets)
  trainable = {"student": {"m": jnp.asarray(mu_vec + delta), "log_v": jnp.log(jnp.float32(v))}}
  key = jax.random.PRNGKey(0)
  k1, k2 = jax.random.split(key)
  draws = {"gen": {"z": jax.random.normal(k1, (b, dim))}, "t": jnp.full((b,), t_value),
           "eps": jax.random.normal(k2, (b, dim))}
  batch = {"x": jnp.zeros((b, dim))}
  fn = lambda tr: dmd2.generator_loss_given(tr, ctx, batch, draws, num_steps=1,
                                            real_guidance=1.0, dm_weight=1.0, gan_weight=0.0,
                                            gan_feature_block=-1)[0]
  grads = jax.jit(jax.grad(fn))(trainable)["student"]
  a, sig = 1 - t_value, t_value
  k_r = a * s * s / (a * a * s * s + sig * sig)
  k_f = a * v * v / (a * a * v * v + sig * sig)
  w_bar = _gauss_expected_abs((1 - a * k_r) * delta,
                              math.sqrt((1 - a * k_r) ** 2 * v * v + k_r ** 2 * sig ** 2))
  want_m = (1 - a * k_r) * delta / (dim * w_bar)
  want_v = (k_f - k_r) * a * v * v / w_bar
  gm = np.asarray(grads["m"])
  # (nearly) every coordinate moves towards the data mean (per coordinate: B Monte-Carlo draws)
  assert np.mean(np.sign(gm) == np.sign(delta)) > 0.9
  np.testing.assert_allclose(gm.mean(), want_m, rtol=0.03)
  assert np.sign(float(grads["log_v"])) == np.sign(v - s)
  np.testing.assert_allclose(float(grads["log_v"]), want_v, rtol=0.08)


def _opt_count(opt_state):
  return max(int(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
             if "count" in jax.tree_util.keystr(p))


def test_ttur_counts_in_engine():
  """10 steps at 5:1: critic (fake + head) 10 updates, generator 2, at steps 4 and 9."""
  engine, state, frozen = mu.make_engine("dmd2", mu.make_teacher(4), batch=8, gan_weight=0.1,
                                         gan_feature_dim=16, gan_hidden=8)
  student0 = jax.device_get(state.params["student"])
  ran = []
  for s in range(10):
    state, frozen, metrics = engine.train_step(state, frozen, s)
    ran.append("generator/loss" in metrics)
    if s == 3:  # before the first generator step the student is untouched
      jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(
          state.params["student"]), student0)
  assert [i for i, r in enumerate(ran) if r] == [4, 9]
  assert _opt_count(state.opt_state["fake_score"]) == 10
  assert _opt_count(state.opt_state["gan_head"]) == 10
  assert _opt_count(state.opt_state["student"]) == 2


@pytest.mark.parametrize("objective", ["dmd2", "sid"])
def test_fake_score_as_lora_trains_only_its_adapter(objective):
  """`fake_lora_rank` > 0: the fake score is a LoRA over the frozen teacher (no second full
  copy); the critic step changes only adapter leaves, the GAN head reads the merged network's
  features, and the fresh fake equals the teacher."""
  teacher = mu.make_teacher(4)
  engine, state, frozen = mu.make_engine(objective, teacher, batch=8, fake_lora_rank=4,
                                         gan_weight=0.1, gan_feature_dim=16, gan_hidden=8)
  fake = engine.nets["fake_score"]
  assert fake.base == "teacher" and "fake_score" in state.params
  _, ctx = mu.phase_context(engine, state, frozen, ())
  x, t = jax.random.normal(jax.random.PRNGKey(0), (8, 2)), jnp.linspace(0.1, 0.9, 8)
  cond = {"class_labels": jnp.arange(8) % 4}
  np.testing.assert_allclose(ctx.apply("fake_score", x, t, cond), ctx.apply("teacher", x, t, cond),
                             rtol=1e-6, atol=1e-6)
  before = mu.flat_params(jax.device_get(state.params["fake_score"]))
  state, frozen, metrics = engine.train_step(state, frozen, 0)
  assert "critic/loss" in metrics
  after = mu.flat_params(jax.device_get(state.params["fake_score"]))
  assert set(after) == set(before) and all("lora" in k for k in after)
  assert any(not np.array_equal(before[k], after[k]) for k in after)


# --------------------------------------------------------------------------------------------
# Subprocess runs (slow)
# --------------------------------------------------------------------------------------------

SMALL = ["--config.train.batch_size=64", "--config.eval.num_samples=256",
         "--config.eval.teacher_steps=8", "--config.sample.num=64",
         "--config.objective.gan_feature_dim=32", "--config.objective.gan_hidden=16",
         "--config.checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  return mu.shared_tiny_teacher("gmm", 20)


def losses(rows):
  return [{k: v for k, v in r.items()
           if k == "step" or k.endswith("/loss") or k.endswith("/dm") or k.endswith("/d")}
          for r in rows]


@pytest.mark.slow
def test_sigkill_mid_cycle_resumes_exactly(tiny_teacher, tmp_path):
  """Checkpoints every 7 steps (not a multiple of k = 5): a run killed after a checkpoint and
  rerun logs exactly the metrics of an uninterrupted run."""
  args = [*SMALL, f"--config.teacher.checkpoint={tiny_teacher}", "--config.train.steps=21",
          "--config.train.log_every=1", "--config.checkpoint.every_steps=7",
          "--config.eval.at_end=false"]
  ref = tmp_path / "ref"
  mu.run_train(CONFIG, ref, *args)
  w = tmp_path / "killed"
  kill_after_checkpoint(mu.train_cmd(CONFIG, w, *args), w, 7)
  second = mu.run_train(CONFIG, w, *args)
  assert "resumed from step" in second.stdout + second.stderr
  got, want = losses(mu.metrics(w)), losses(mu.metrics(ref))
  assert [r["step"] for r in want] == list(range(1, 22))
  assert sum("generator/loss" in r for r in want) == 4  # steps 4, 9, 14, 19 (logged at +1)
  assert got == want


@pytest.mark.slow
def test_sharded_run_matches_single_device(tiny_teacher, tmp_path):
  """Also the GAN's real images from a stream of their own (`objective.real_stream`, another
  batch size), through launch.train on 1 and on 8 devices."""
  args = [*SMALL, f"--config.teacher.checkpoint={tiny_teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.checkpoint.every_steps=0",
          "--config.eval.at_end=false", "--config.objective.fake_updates=2",
          "--config.objective.real_stream=real", "--config.data_streams.real.name=gmm",
          "--config.data_streams.real.batch_size=32"]
  mu.check_sharded_losses(CONFIG, tmp_path, args, losses, ("generator/loss", "critic/d"))


@pytest.mark.slow
def test_toy_run_closes_the_one_step_gap(tmp_path):
  """A small spiral teacher, then 600 DMD2 steps (GAN on): >= 60% of the teacher's 1-step vs
  16-step SWD gap closed; the student's weights moved away from the teacher's."""
  mu.check_toy_run(f"{CONFIG}", tmp_path, 600, "--config.objective.gan_feature_dim=64")


def test_a_feature_block_the_network_lacks_names_its_key():
  """A GAN head reading block 7 of a 2-block network (SiDA's block 13 on a shrunk DiT) stops
  at the setup trace with one line naming objective.gan_feature_block."""
  from distill import trainer
  engine, state, frozen = mu.make_engine("dmd2", mu.make_teacher(num_classes=4), gan_weight=0.1,
                                         gan_feature_dim=16, gan_hidden=8, gan_feature_block=7)
  with pytest.raises(trainer.SetupError, match=r"^config key 'objective.gan_feature_block': "
                                               r"return_features index 7 out of range"):
    trainer._trace(engine, state, frozen, 0)   # pylint: disable=protected-access
