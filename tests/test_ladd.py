"""LADD (`with_ladd`, `ladd`, `scm_ladd`): the StyleGAN-T heads against PyTorch (torch's own
spectral_norm power iteration and circular Conv1d; BatchNormLocal as StyleGAN-T writes it),
PyTorch references of the generator term and the discriminator loss (values and gradients:
student weights through the frozen teacher's input, head weights; misaligned pairs; R1),
closed forms on Gaussian data (a linear discriminator on identity features: both gradients are
expectations over the re-noising law, computed here by quadrature), the phase schedule, a toy
sCM + LADD run and the sharded run (8 fake CPU devices)."""
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import processes as procs
from distill.objectives import ladd
from models.heads import LaddHeads
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree

torch = pytest.importorskip("torch")

B = 16
SCM_LADD = os.path.join(mu.ROOT, "configs", "toy", "scm_ladd.py")


# --------------------------------------------------------------------------------------------
# PyTorch heads (StyleGAN-T's DiscHead with torch.nn.utils.spectral_norm)
# --------------------------------------------------------------------------------------------


def _bn_local(x, scale, bias, vbs=8, eps=1e-5):
  """StyleGAN-T's BatchNormLocal on (B, C, N)."""
  shape = x.shape
  g = int(np.ceil(x.shape[0] / vbs))
  x = x.view(g, -1, x.shape[-2], x.shape[-1])
  mean = x.mean([1, 3], keepdim=True)
  var = x.var([1, 3], keepdim=True, unbiased=False)
  x = (x - mean) / torch.sqrt(var + eps)
  return (x * scale[None, :, None] + bias[None, :, None]).view(shape)


class TorchHead:
  """One DiscHead from flax params p (flat paths) and stats s (flat paths), in train mode."""

  def __init__(self, p, s, prefix, spectral=True):
    self.p, self.prefix = p, prefix
    self.convs = {}
    for name, k in (("block0_conv", 1), ("residual_conv", 9), ("cls", 1)):
      kernel = p[f"{prefix}/{name}/kernel"]           # (k, in, out) flax
      conv = torch.nn.Conv1d(kernel.shape[1], kernel.shape[2], k, padding=0)
      with torch.no_grad():
        conv.weight.copy_(kernel.detach().permute(2, 1, 0))
        conv.bias.copy_(p[f"{prefix}/{name}/bias"].detach())
      if spectral:
        conv = torch.nn.utils.spectral_norm(conv)
        with torch.no_grad():
          conv.weight_u.copy_(s[f"{prefix}/{name}/u"])
      self.convs[name] = conv

  def params(self):
    out = {}
    for name, conv in self.convs.items():
      w = conv.weight_orig if hasattr(conv, "weight_orig") else conv.weight
      out[f"{self.prefix}/{name}/kernel"] = (w, (2, 1, 0))
      out[f"{self.prefix}/{name}/bias"] = (conv.bias, None)
    return out

  def __call__(self, x):                                # x (B, C, N)
    def conv(name, h):
      k = self.convs[name].kernel_size[0]
      n = h.shape[-1]
      idx = torch.arange(-(k // 2), n + k // 2) % n     # circular padding
      return self.convs[name](h[..., idx])
    def block(name, h, norm):
      h = conv(name, h)
      h = _bn_local(h, self.p[f"{self.prefix}/{norm}/scale"], self.p[f"{self.prefix}/{norm}/bias"])
      return torch.nn.functional.leaky_relu(h, 0.2)
    h = block("block0_conv", x, "block0_norm")
    h = (h + block("residual_conv", h, "residual_norm")) / math.sqrt(2)
    return conv("cls", h)[:, 0]                         # (B, N)


def _flat(tree):
  return mu.flat_params(tree)


def test_heads_match_torch_spectral_norm_and_batchnorm_local():
  """Logits of two heads on token features (B, N, C) and on a (B, C) feature, the gradient
  w.r.t. every head weight and the power-iteration state after a training call equal torch's
  (spectral_norm in train mode from the same u; circular Conv1d)."""
  heads = LaddHeads(feature_dims=(12, 6))
  x = jnp.zeros((B, 2))
  variables = nn.unbox(heads.init(jax.random.PRNGKey(0), x))
  params = mu.perturb(variables["params"], 3, scale=0.2)
  stats = variables["batch_stats"]
  feats = (jax.random.normal(jax.random.PRNGKey(1), (B, 7, 12)),
           jax.random.normal(jax.random.PRNGKey(2), (B, 6)))

  def f(p):
    out, upd = heads.apply({"params": p, "batch_stats": stats}, x, features=feats,
                           update_stats=True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(out)), (out, upd)
  (_, (logits, upd)), grads = jax.value_and_grad(f, has_aux=True)(params)

  tp = mu.torch_params(params, requires_grad=False)
  ts = {k: torch.tensor(np.asarray(v)) for k, v in _flat(stats).items()}
  t_heads = [TorchHead(tp, ts, f"head_{i}") for i in range(2)]
  t_feats = [mu.n2t(feats[0]).permute(0, 2, 1), mu.n2t(feats[1])[:, :, None]]
  ref = torch.cat([h(fe) for h, fe in zip(t_heads, t_feats)], dim=1)
  np.testing.assert_allclose(np.asarray(logits), mu.t2n(ref), rtol=1e-4, atol=1e-5)
  torch.sin(ref).sum().backward()
  for i, h in enumerate(t_heads):
    for path, (tensor, perm) in h.params().items():
      g = tensor.grad.permute(*perm) if perm else tensor.grad
      np.testing.assert_allclose(np.asarray(_flat(grads)[path]), mu.t2n(g), rtol=1e-4,
                                 atol=1e-5, err_msg=path)
    for name, conv in h.convs.items():
      np.testing.assert_allclose(np.asarray(_flat(upd["batch_stats"])[f"head_{i}/{name}/u"]),
                                 mu.t2n(conv.weight_u), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The two LADD terms against PyTorch
# --------------------------------------------------------------------------------------------


def _setup(**keys):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine(
      "scm_ladd", teacher, batch=B, feature_dim=16, feature_blocks=(0, -1), sigma_data=1.0,
      label_dropout=0.3, **keys)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  params["disc_heads"] = mu.perturb(params["disc_heads"], 2, scale=0.2)
  state = state.replace(params=params)
  return teacher, engine, state, frozen, jax.device_get(engine.global_batch(0))


def _torch_student_x0(net, p, x_real, t, noise, labels):
  """TrigFlow student (sigma_d = 1) over the flow MLP: x_t = cos t x + sin t n; the flow net
  read at s = sin t / (cos t + sin t), x_s = x_t / (cos t + sin t); F = cos t eps - sin t x0;
  x0_hat = cos t x_t - sin t F."""
  c, s_ = torch.cos(t)[:, None], torch.sin(t)[:, None]
  x_t = c * x_real + s_ * noise
  k = c + s_
  s = (s_ / k)[:, 0]
  xs = x_t / k
  flow = net(p, xs, 1000.0 * s, labels)
  x0, eps = mu.rf_x0(flow, xs, s), mu.rf_eps(flow, xs, s)
  F = c * eps - s_ * x0
  return c * x_t - s_ * F


def _torch_features(net, p, x0, sigma, eps, labels, blocks=(0, -1)):
  """The flow teacher's block outputs at x0 + sigma eps read at s = sigma / (1 + sigma)."""
  s = sigma / (1 + sigma)
  xs = (x0 + sigma[:, None] * eps) / (1 + sigma)[:, None]
  return [net(p, xs, 1000.0 * s, labels, feature_block=b)[1] for b in blocks]


def _torch_logits(heads, feats):
  return torch.cat([h(f[:, :, None]) for h, f in zip(heads, feats)], dim=1)


def _draws(engine, batch, seed):
  process = engine.nets["student"].process
  keys = dict(max_time_prob=0.5, num_steps=0, p_mean=-0.6, p_std=1.0, null_prob=0.3)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  shape = np.shape(batch["x"])
  return {"fake": ladd.sample_draws(process, k1, shape, **keys),
          "real": ladd.renoise_draws(k2, shape, -0.6, 1.0),
          "misaligned": ladd.renoise_draws(k3, shape, -0.6, 1.0)}


@pytest.mark.parametrize("adv_loss", ["hinge", "softplus"])
def test_generator_term_matches_torch(adv_loss):
  teacher, engine, state, frozen, batch = _setup(adv_loss=adv_loss)
  draws = _draws(engine, batch, 5)["fake"]
  at_max = np.asarray(draws["t"]) == np.float32(np.pi / 2)
  assert 0 < at_max.sum() < B
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda p: ladd.generator_term_given(p, ctx, batch, draws, blocks=(0, -1),
                                           adv_loss=adv_loss)[0]
  value, grads = jax.value_and_grad(fn)(trainable["student"])

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  hp = mu.torch_params(state.params["disc_heads"])
  hs = {k: torch.tensor(np.asarray(v)) for k, v in _flat(state.model_state["disc_heads"]).items()}
  # Train mode: one power iteration from the stored u, whose sigma our generator phase
  # recomputes (it only does not store the new u).
  heads = [TorchHead(hp, {k.replace("batch_stats/", ""): v for k, v in hs.items()}, f"head_{i}")
           for i in range(2)]
  labels = mu.step_labels(batch, draws)
  x0_hat = _torch_student_x0(net, p_s, mu.n2t(batch["x"]), mu.n2t(draws["t"]),
                             mu.n2t(draws["noise"]), labels)
  d = draws["d"]
  feats = _torch_features(net, p_t, x0_hat, mu.n2t(d["sigma"]), mu.n2t(d["eps"]), labels)
  logits = _torch_logits(heads, feats)
  ref = -logits.mean() if adv_loss == "hinge" else torch.nn.functional.softplus(-logits).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-4, atol=1e-6)
  assert_close_tree(_flat(grads), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


@pytest.mark.parametrize("adv_loss,misaligned,r1", [("hinge", True, 0.0),
                                                    ("softplus", False, 0.3)])
def test_disc_loss_matches_torch(adv_loss, misaligned, r1):
  teacher, engine, state, frozen, batch = _setup(adv_loss=adv_loss)
  draws = _draws(engine, batch, 6)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("disc_heads",))
  fn = lambda tr: ladd.disc_loss_given(tr, ctx, batch, draws, blocks=(0, -1), adv_loss=adv_loss,
                                       misaligned_pairs=misaligned, r1_weight=r1)
  (value, (metrics, upd)), grads = jax.value_and_grad(
      lambda tr: (lambda o: (o[0], (o[1], o[2])))(fn(tr)), has_aux=True)(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"])
  p_t = mu.torch_params(frozen["teacher"])
  hp = mu.torch_params(state.params["disc_heads"], requires_grad=True)
  hs = {k.replace("batch_stats/", ""): torch.tensor(np.asarray(v))
        for k, v in _flat(state.model_state["disc_heads"]).items()}
  heads = [TorchHead(hp, hs, f"head_{i}") for i in range(2)]
  fd = draws["fake"]
  labels = mu.step_labels(batch, fd)
  x_real = mu.n2t(batch["x"])
  with torch.no_grad():
    fake = _torch_student_x0(net, p_s, x_real, mu.n2t(fd["t"]), mu.n2t(fd["noise"]), labels)
  sig, eps = mu.n2t(fd["d"]["sigma"]), mu.n2t(fd["d"]["eps"])
  f_labels = labels
  if misaligned:
    fake = torch.cat([fake, torch.roll(x_real, 1, 0)])
    sig = torch.cat([sig, mu.n2t(draws["misaligned"]["sigma"])])
    eps = torch.cat([eps, mu.n2t(draws["misaligned"]["eps"])])
    f_labels = torch.cat([labels, labels])
  with torch.no_grad():
    f_feats = _torch_features(net, p_t, fake, sig, eps, f_labels)
  r_feats = _torch_features(net, p_t, x_real, mu.n2t(draws["real"]["sigma"]),
                            mu.n2t(draws["real"]["eps"]), labels)
  r_feats = [f.detach().requires_grad_(True) for f in r_feats]
  # One call on [fake; real] as ours (BatchNormLocal groups never mix the two halves).
  logits = _torch_logits(heads, [torch.cat([a, b]) for a, b in zip(f_feats, r_feats)])
  n = fake.shape[0]
  lf, lr = logits[:n], logits[n:]
  if adv_loss == "hinge":
    ref = 0.5 * (torch.relu(1 - lr).mean() + torch.relu(1 + lf).mean())
  else:
    ref = 0.5 * (torch.nn.functional.softplus(-lr).mean() +
                 torch.nn.functional.softplus(lf).mean())
  if r1:
    # R1 on the heads' inputs: the heads in eval mode (no power-iteration update, as ours).
    for h in heads:
      for conv in h.convs.values():
        conv.eval()
    real_only = _torch_logits(heads, r_feats).sum()
    g = torch.autograd.grad(real_only, r_feats, create_graph=True)
    ref = ref + r1 * sum((gi ** 2).sum(dim=1) for gi in g).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-4, atol=1e-6)
  want = {}
  for h in heads:
    for path, (tensor, perm) in h.params().items():
      want[path] = mu.t2n(tensor.grad.permute(*perm) if perm else tensor.grad)
  for path, tensor in hp.items():
    if "norm" in path:
      want[path] = mu.t2n(tensor.grad)
  assert_close_tree(_flat(grads["disc_heads"]), want, what="d/dheads")
  for i, h in enumerate(heads):
    for name, conv in h.convs.items():
      np.testing.assert_allclose(np.asarray(_flat(upd["disc_heads"])[f"batch_stats/head_{i}/{name}/u"]),
                                 mu.t2n(conv.weight_u), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Gaussian closed forms
# --------------------------------------------------------------------------------------------


def _expected_alpha(p_mean, p_std):
  """E[1 / (1 + sigma)], sigma = exp(N(p_mean, p_std^2)): the rectified-flow alpha of the
  re-noising level, by Gauss-Hermite quadrature."""
  x, w = np.polynomial.hermite_e.hermegauss(80)
  return float(np.sum(w / (1 + np.exp(p_mean + p_std * x))) / np.sqrt(2 * np.pi))


def _linear_ctx(m_real):
  """Teacher (rectified flow): its features are its input x_s itself; heads: D = a . f; student
  (x0 kind): the constant params["m"]."""
  process = procs.make_process("rectified_flow")

  def teacher_fn(variables, x, timestep, class_labels=None, return_features=()):
    return x, {b: x for b in return_features}

  def heads_fn(variables, x, timestep=None, features=(), update_stats=False, mutable=None):
    out = sum(f @ variables["params"]["a"] for f in features)[:, None]
    return (out, {}) if mutable else out

  def student_fn(variables, x, timestep, class_labels=None):
    return jnp.broadcast_to(variables["params"]["m"], x.shape)

  nets = {"teacher": ctx_lib.NetInfo(name="teacher", module=None, prediction="x0",
                                     process=process, apply_fn=teacher_fn),
          "student": ctx_lib.NetInfo(name="student", module=None, prediction="x0",
                                     process=process, apply_fn=student_fn),
          "disc_heads": ctx_lib.NetInfo(name="disc_heads", module=None, prediction="raw",
                                        process=process, apply_fn=heads_fn)}
  return nets


def test_adversarial_gradients_on_gaussian_data_are_the_renoising_expectations():
  """Linear D(x) = a . x_s on the teacher's input x_s = (x0 + sigma eps) / (1 + sigma). With
  logits inside (-1, 1), hinge terms are linear, so in expectation dL_G / dm = -E[alpha] a
  (the generator moves along a) and dL_D / da = E[alpha] (m - mu) / 2 (D separates the fake
  mean m from the data mean mu), alpha = 1 / (1 + sigma) at sigma = exp(N(-0.6, 1)).
  500k samples: the Monte-Carlo error of dL_D / da is ~4e-4 (tolerance 1.5e-3 absolute, 2%)."""
  n, mu_real, m = 500_000, np.asarray([0.3, -0.2]), np.asarray([0.1, 0.25])
  nets = _linear_ctx(mu_real)
  a = jnp.asarray([0.05, -0.08])
  x_real = jnp.asarray(mu_real) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  batch = {"x": x_real}
  process = nets["student"].process
  draws = _draws_for(process, n)
  e_alpha = _expected_alpha(-0.6, 1.0)

  ctx = ctx_lib.Context(params={"teacher": {}, "disc_heads": {"a": a}}, ema={},
                        model_state={}, nets=nets)
  g_m = jax.grad(lambda p: ladd.generator_term_given(p, ctx, batch, draws["fake"], blocks=(-1,),
                                                     adv_loss="hinge")[0])(
      {"m": jnp.asarray(m, jnp.float32)})["m"]
  np.testing.assert_allclose(np.asarray(g_m), -e_alpha * np.asarray(a), rtol=0.02)

  dctx = ctx_lib.Context(params={"teacher": {}, "student": {"m": jnp.asarray(m, jnp.float32)}},
                         ema={}, model_state={}, nets=nets)
  g_a = jax.grad(lambda tr: ladd.disc_loss_given(tr, dctx, batch, draws, blocks=(-1,),
                                                 adv_loss="hinge", misaligned_pairs=False,
                                                 r1_weight=0.0)[0])({"disc_heads": {"a": a}})
  np.testing.assert_allclose(np.asarray(g_a["disc_heads"]["a"]),
                             e_alpha * (m - mu_real) / 2, rtol=0.02, atol=1.5e-3)


def _draws_for(process, n):
  keys = dict(max_time_prob=0.5, num_steps=0, p_mean=-0.6, p_std=1.0)
  k1, k2 = jax.random.split(jax.random.PRNGKey(4))
  return {"fake": ladd.sample_draws(process, k1, (n, 2), **keys),
          "real": ladd.renoise_draws(k2, (n, 2), -0.6, 1.0)}


# --------------------------------------------------------------------------------------------
# Structure, schedule, runs
# --------------------------------------------------------------------------------------------


def test_structure_schedule_and_bad_keys():
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  e = Engine(mu.tiny_config("scm_ladd", feature_dim=16), teacher=teacher)
  phases = {p.name: p for p in e.objective.phases}
  assert [(p.every, p.offset) for p in phases.values()] == [(2, 0), (2, 1)]
  assert [p.name for p in e.objective.phases if p.active(6)] == ["scm"]
  assert [p.name for p in e.objective.phases if p.active(7)] == ["disc"]
  assert phases["disc"].trains == ("disc_heads",) and e.objective.sampler == "trigflow"
  both = Engine(mu.tiny_config("scm_ladd", feature_dim=16, alternate=False), teacher=teacher)
  assert [p.name for p in both.objective.phases if p.active(7)] == ["scm", "disc"]
  solo = Engine(mu.tiny_config("ladd", feature_dim=16, num_steps=2), teacher=teacher)
  assert solo.objective.sampler == "consistency"
  times = ladd.generator_input_times(solo.nets["student"].process, jax.random.PRNGKey(0), 4000,
                                     0.7, 2)
  grid = np.asarray(solo.nets["student"].process.timesteps(2))[:2]
  frac = np.mean(np.isclose(np.asarray(times), grid[0]))
  assert set(np.round(np.unique(times), 5)) == set(np.round(grid, 5)) and abs(frac - 0.7) < 0.03
  for keys, msg in [({"adv_loss": "x"}, "adv_loss"), ({"feature_blocks": ()}, "feature_blocks"),
                    ({"max_time_prob": 1.5}, "max_time_prob")]:
    with pytest.raises(ValueError, match=msg):
      Engine(mu.tiny_config("scm_ladd", **keys), teacher=teacher)
  with pytest.raises(ValueError, match="feature_dim"):
    engine, state, frozen = mu.make_engine("scm_ladd", teacher, feature_dim=7)
    engine.train_step(state, frozen, 1)


TEACHER_SMALL = ["--config.model.hidden=64", "--config.model.depth=2",
                 "--config.model.time_scale=0.001", "--config.train.steps=1500",
                 "--config.train.log_every=500", "--config.checkpoint.every_steps=0",
                 "--config.eval.num_samples=2048", "--config.eval.teacher_steps=32",
                 "--config.sample.num=64"]


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
  w = tmp_path_factory.mktemp("ladd") / "teacher"
  mu.run_train(os.path.join(mu.ROOT, "configs", "toy", "teacher.py") + ":checkerboard", w,
               *TEACHER_SMALL)
  return str(w)


@pytest.mark.slow
def test_toy_scm_ladd_run_closes_the_gap(toy_teacher, tmp_path):
  import json
  w = tmp_path / "student"
  mu.run_train(f"{SCM_LADD}:checkerboard", w, f"--config.teacher.checkpoint={toy_teacher}",
               "--config.train.steps=1600", "--config.objective.feature_dim=64",
               "--config.eval.num_samples=2048", "--config.eval.teacher_steps=32",
               "--config.eval.steps=(1, 2)", "--config.sample.num=64",
               "--config.checkpoint.every_steps=0", "--config.train.log_every=100")
  r = {k: v["swd"] for k, v in json.load(open(w / "eval.json"))["results"].items()}
  t1, tn = r["teacher_steps_1"], r["teacher_steps_32"]
  assert (t1 - r["student_steps_1"]) / (t1 - tn) >= 0.8, r
  assert r["student_steps_2"] < t1
  rows = mu.metrics(w)
  for key in ("scm/adv_g", "scm/base", "disc/adv_d"):
    vals = [x[key] for x in rows if key in x]
    assert vals and np.all(np.isfinite(vals)), key


@pytest.mark.slow
def test_sharded_run_matches_single_device(toy_teacher, tmp_path):
  args = [f"--config.teacher.checkpoint={toy_teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.train.batch_size=64",
          "--config.eval.at_end=false", "--config.checkpoint.every_steps=0",
          "--config.objective.feature_dim=64", "--config.objective.misaligned_pairs=true",
          "--config.objective.r1_weight=0.1", "--config.objective.alternate=false"]
  mu.check_sharded_losses(SCM_LADD + ":checkerboard", tmp_path, args, mu.phase_losses,
                          ["scm/loss", "disc/loss"])
