"""`cd`, `ct`, `ect`: PyTorch references of the three losses (value and gradient w.r.t. every
student weight; EMA and online targets, Heun and Euler teacher steps with CFG, squared error and
pseudo-Huber, every weighting used by the recipes, ECT's r = 0 branch), closed forms on
Gaussian data (the EDM reading of flow / TrigFlow networks, the CD loss of the exact
consistency function, CT and ECT equal to Euler CD with the exact score in expectation), the
curricula against the papers' formulas, toy runs and the sharded run (8 fake CPU devices)."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import processes as procs
from distill import solvers
from distill import wrappers
from distill.objectives import consistency as cm
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree

torch = pytest.importorskip("torch")

B = 24
SMIN, SMAX, SD, RHO = 0.002, 80.0, 0.7, 7.0
CONFIGS = {k: os.path.join(mu.ROOT, "configs", "toy", f"{k}.py") for k in ("cd", "ct", "ect")}


# --------------------------------------------------------------------------------------------
# PyTorch reference (written from the CM / iCT / ECT papers, not from our code)
# --------------------------------------------------------------------------------------------


def _torch_denoiser(net, p, x, sig, labels, null=None, w=None):
  """D(x, sigma) of the rectified-flow "flow" MLP read at the same SNR: s = sigma / (1 +
  sigma), x_s = x / (1 + sigma), x0 = x_s - s flow (with CFG on the flow when w is given)."""
  s = sig / (1.0 + sig)
  xs = x / (1.0 + sig)[:, None]
  flow = net(p, xs, 1000.0 * s, labels)
  if w is not None:
    u = net(p, xs, 1000.0 * s, null)
    flow = u + w[:, None] * (flow - u)
  return xs - s[:, None] * flow


def _torch_f(net, p, x, sig, labels):
  """Song et al.'s consistency function of an EDM network F = (D - c_skip^EDM x) / c_out^EDM:
  f = c_skip x + c_out F with the boundary scalings."""
  D = _torch_denoiser(net, p, x, sig, labels)
  c_skip_e = SD ** 2 / (sig ** 2 + SD ** 2)
  c_out_e = sig * SD / torch.sqrt(sig ** 2 + SD ** 2)
  F = (D - c_skip_e[:, None] * x) / c_out_e[:, None]
  c_skip = SD ** 2 / ((sig - SMIN) ** 2 + SD ** 2)
  c_out = (sig - SMIN) * SD / torch.sqrt(sig ** 2 + SD ** 2)
  return c_skip[:, None] * x + c_out[:, None] * F


def _setup(kind, **keys):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine(kind, teacher, batch=B, label_dropout=0.3,
                                         sigma_min=SMIN, sigma_max=SMAX, sigma_data=SD,
                                         rho=RHO, **keys)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  ema = state.ema
  if "target" in state.ema.get("student", {}):
    ema = {"student": {"target": mu.perturb(params["student"], 2)}}
  state = state.replace(params=params, ema=ema)
  return teacher, engine, state, frozen, jax.device_get(engine.global_batch(0))


def _loss_kw(engine):
  kw = dict(engine.objective.phases[0].loss.keywords)
  for k in ("schedule", "grid", "guidance_range", "label_dropout", "double_every", "ect"):
    kw.pop(k, None)
  return kw


CASES = {
    "cd_heun_ema_cfg": ("cd", dict(num_scales=10, target="ema", teacher_solver="heun",
                                   guidance_range=(1.5, 3.0), loss="l2", weighting="uniform")),
    "cd_euler_online_huber": ("cd", dict(num_scales=7, target="online", teacher_solver="euler",
                                         loss="pseudo_huber", huber_c=0.3, weighting="karras")),
    "ct_online_huber_inverse_step": ("ct", dict(curriculum="fixed", num_scales=12,
                                                target="online", loss="pseudo_huber",
                                                huber_c=0.2, weighting="inverse_step")),
    "ct_ema_l2_snr": ("ct", dict(curriculum="fixed", num_scales=12, target="ema", loss="l2",
                                 weighting="snr+1")),
    "ect_norm_inverse_step": ("ect", dict(loss="pseudo_huber", huber_c=0.0,
                                          weighting="inverse_step", q=2.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_matches_torch(case):
  kind, keys = CASES[case]
  teacher, engine, state, frozen, batch = _setup(kind, **keys)
  key = jax.random.PRNGKey(7)
  if kind == "ect":
    draws = cm.ect_draws(key, batch["x"], 1.0, p_mean=-1.1, p_std=2.0, q=2.0, k=8.0, b=1.0,
                         label_dropout=0.3)
  else:
    draws = cm.grid_draws(key, batch["x"], keys["num_scales"], sigma_min=SMIN, sigma_max=SMAX,
                          rho=RHO, guidance=keys.get("guidance_range", (1.0, 1.0)),
                          label_dropout=0.3)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: cm.cm_loss_given(tr, ctx, batch, draws, **_loss_kw(engine))
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  p_m = (mu.torch_params(state.ema["student"]["target"]) if keys.get("target") == "ema"
         else {k: v.detach() for k, v in p_s.items()})
  x0, z = mu.n2t(batch["x"]), mu.n2t(draws["z"])
  labels = mu.step_labels(batch, draws)
  null = torch.full_like(labels, 4)
  assert 0 < int(np.sum(draws["null"])) < B
  if kind == "ect":
    t = mu.n2t(draws["t"])
    r = torch.clamp(t * (1 - 0.5 ** 2 * (1 + 8 * torch.sigmoid(-t))), min=0)
    assert 0 < int((r == 0).sum()) < B        # both branches of the target
    t2 = r
  else:
    n, N = mu.n2t(draws["n"]), keys["num_scales"]
    assert int(n.max()) <= N - 2
    sig = lambda i: (SMAX ** (1 / RHO) + i / (N - 1) * (SMIN ** (1 / RHO) - SMAX ** (1 / RHO))) ** RHO
    t, t2 = sig(n.double()).float(), sig(n.double() + 1).float()
  np.testing.assert_allclose(np.asarray(draws["t2"]), mu.t2n(t2), rtol=1e-5)
  x_t = x0 + t[:, None] * z
  with torch.no_grad():
    if kind == "cd":
      w = mu.n2t(draws["w"]) if "guidance_range" in keys else None
      D = lambda y, s: _torch_denoiser(net, p_t, y, s, labels, null, w)
      d1 = (x_t - D(x_t, t)) / t[:, None]
      x_e = x_t + (t2 - t)[:, None] * d1
      if keys["teacher_solver"] == "heun":
        d2 = (x_e - D(x_e, t2)) / t2[:, None]
        x_t2 = x_t + (t2 - t)[:, None] / 2 * (d1 + d2)
      else:
        x_t2 = x_e
    else:
      x_t2 = x0 + t2[:, None] * z
    tgt = _torch_f(net, p_m, x_t2, torch.where(t2 > 0, t2, torch.ones_like(t2)), labels)
    tgt = torch.where((t2 > 0)[:, None], tgt, x_t2)
  online = _torch_f(net, p_s, x_t, t, labels)
  d = online - tgt
  if keys["loss"] == "l2":
    dist = (d ** 2).mean(dim=1)
  else:
    c = keys["huber_c"] * math.sqrt(2)
    dist = torch.sqrt((d ** 2).sum(dim=1) + c ** 2) - c
  lam = {"uniform": torch.ones_like(t), "karras": 1 / t ** 2 + 1 / SD ** 2,
         "snr+1": 1 / t ** 2 + 1, "inverse_step": 1 / (t - t2)}[keys["weighting"]]
  ref = (lam * dist).mean()
  ref.backward()
  # rtol 1e-3: at the smallest gaps online - target is ~1e-3 of |x|, and the 1 / t^2 and
  # 1 / (t - t2) weights put most of the loss there, so float32 rounding of x (~1e-7 |x|, in
  # either implementation) reaches a few 1e-4 of the loss; other cases agree to ~1e-6.
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-3)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


# --------------------------------------------------------------------------------------------
# Gaussian data: closed forms
# --------------------------------------------------------------------------------------------

MEAN, VAR = jnp.asarray([0.5, -1.0, 2.0]), 0.09


def _edm_posterior(x, sig):
  """E[x0 | x0 + sigma z = x] for x0 ~ N(MEAN, VAR I)."""
  return MEAN + (VAR / (VAR + sig ** 2))[:, None] * (x - MEAN)


def _exact_consistency(x, sig, gain=1.0):
  """The exact PF-ODE map to sigma_min for Gaussian data: (x - m) / sqrt(VAR + sigma^2) is
  constant along the ODE, so f*(x, sigma) = m + sqrt((VAR + smin^2) / (VAR + sigma^2)) (x - m)
  (times `gain`: a one-parameter family around it)."""
  k = jnp.sqrt((VAR + SMIN ** 2) / (VAR + sig ** 2))
  return MEAN + gain * k[:, None] * (x - MEAN)


def _ctx(student_fn, *, process="rectified_flow", boundary=False):
  """Teacher: the exact posterior mean in its own process's coordinates; student: the x0 kind
  `student_fn(params, x_e, sigma)` in EDM coordinates behind edm_consistency(boundary=...)."""
  proc = procs.make_process(process, **({"sigma_data": 0.8} if process == "trigflow" else {}))
  to_edm = {"rectified_flow": lambda x, tt: (x / (1 - tt)[:, None], tt / (1 - tt)),
            "trigflow": lambda x, tt: (x / jnp.cos(tt)[:, None], 0.8 * jnp.tan(tt))}[process]

  def teacher_fn(variables, x, timestep, class_labels=None):
    x_e, sig = to_edm(x, proc_time(timestep))
    return _edm_posterior(x_e, sig)

  def student(variables, x, timestep, class_labels=None):
    x_e, sig = to_edm(x, proc_time(timestep))
    return student_fn(variables["params"], x_e, sig)

  proc_time = (lambda ts: ts / 1000.0) if process == "rectified_flow" else (lambda ts: ts)
  wrapper = wrappers.EDMConsistency(sigma_min=SMIN, sigma_max=SMAX, sigma_data=SD,
                                    boundary=boundary)
  nets = {"teacher": ctx_lib.NetInfo(name="teacher", module=None, prediction="x0",
                                     process=proc, apply_fn=teacher_fn),
          "student": ctx_lib.NetInfo(name="student", module=None, prediction="x0",
                                     process=proc, apply_fn=student, wrapper=wrapper)}
  return ctx_lib.Context(params={"teacher": {}}, ema={}, model_state={}, nets=nets)


@pytest.mark.parametrize("process", ["rectified_flow", "trigflow"])
def test_edm_reading_of_flow_and_trigflow_networks_is_the_gaussian_posterior(process):
  """A network giving the exact posterior mean in its own (rectified-flow or TrigFlow)
  coordinates, read in EDM coordinates, is the EDM posterior mean m + VAR / (VAR + sigma^2)
  (x - m); the boundary wrapper gives f(x, sigma_min) = x exactly and -> D at large sigma."""
  ctx = _ctx(lambda p, x, s: _edm_posterior(x, s), process=process)
  x = MEAN + 3.0 * jax.random.normal(jax.random.PRNGKey(0), (B, 3))
  sig = jnp.exp(jnp.linspace(-5.0, 4.0, B))
  D = cm.teacher_denoiser(ctx, "teacher", x, sig, {}, 1.0, False)
  np.testing.assert_allclose(np.asarray(D), np.asarray(_edm_posterior(x, sig)), rtol=2e-5,
                             atol=2e-6)
  bctx = _ctx(lambda p, x, s: _edm_posterior(x, s), process=process, boundary=True)
  at_min = bctx.x0("student", x, jnp.full((B,), SMIN), {}, params={})
  np.testing.assert_allclose(np.asarray(at_min), np.asarray(x), rtol=1e-6, atol=1e-6)
  far = bctx.x0("student", x, jnp.full((B,), 60.0), {}, params={})
  np.testing.assert_allclose(np.asarray(far), np.asarray(_edm_posterior(x, jnp.full((B,), 60.0))),
                             atol=2e-3 * 60)


def _gauss_batch(n, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x0 = MEAN + math.sqrt(VAR) * jax.random.normal(k1, (n, 3))
  return {"x": x0}, jax.random.normal(k2, (n, 3))


def test_cd_loss_of_the_exact_consistency_function_is_the_heun_error():
  """Exact teacher, student = f* (the ODE's exact map to sigma_min). The teacher's PF-ODE is
  linear: dx/dsigma = a(sigma) (x - m), a = sigma / (VAR + sigma^2), so one Heun step from t to
  t2 scales x - m by H = 1 + h/2 (a(t) + a(t2) (1 + h a(t))) (h = t2 - t) and the loss is
  mean_b (k(t) - k(t2) H)^2 |x_t - m|^2 / D with k(sigma) = sqrt((VAR + smin^2) / (VAR +
  sigma^2)). It vanishes as the grid refines (Heun is second order: the per-step error of the
  factor falls ~ N^-3), while the teacher as student keeps a large loss."""
  batch, z = _gauss_batch(64)
  kw = dict(student="student", teacher="teacher", kind="cd", target="online", loss="l2",
            huber_c=0.0, weighting="uniform", teacher_solver="heun")
  losses = []
  for n_scales in (10, 40):
    n = jnp.arange(64) % (n_scales - 1)
    sig = lambda i: cm.karras_sigma(i, n_scales, SMIN, SMAX, RHO)
    draws = {"t": sig(n), "t2": sig(n + 1), "z": z, "w": jnp.ones((64,)),
             "null": jnp.zeros((64,), bool)}
    ctx = _ctx(lambda p, x, s: _exact_consistency(x, s))
    got = float(cm.cm_loss_given({"student": {}}, ctx, batch, draws, **kw)[0])
    t, t2 = np.asarray(draws["t"], np.float64), np.asarray(draws["t2"], np.float64)
    a = lambda s: s / (VAR + s ** 2)
    h = t2 - t
    H = 1 + h / 2 * (a(t) + a(t2) * (1 + h * a(t)))
    k = lambda s: np.sqrt((VAR + SMIN ** 2) / (VAR + s ** 2))
    x_t = np.asarray(batch["x"], np.float64) + t[:, None] * np.asarray(z, np.float64)
    want = np.mean((k(t) - k(t2) * H) ** 2 * np.sum((x_t - np.asarray(MEAN)) ** 2, 1) / 3)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-12)
    teacher_as_student = float(cm.cm_loss_given(
        {"student": {}}, _ctx(lambda p, x, s: _edm_posterior(x, s)), batch, draws, **kw)[0])
    assert teacher_as_student > 10 * got
    losses.append(got)
  assert losses[1] < losses[0] / 1000


@pytest.mark.parametrize("kind", ["ct", "ect"])
def test_ct_and_ect_gradients_equal_euler_cd_with_the_exact_score_in_expectation(kind):
  """Song et al.'s Theorem 2 on Gaussian data: for a student affine in x (f = m + g k(sigma)
  (x - m)), E[f(x0 + t2 z, t2) | x_t] = f(E[x0 + t2 z | x_t], t2) and E[x0 + t2 z | x_t] is
  the Euler step of the exact PF-ODE, x_t - (t - t2) (x_t - D*(x_t, t)) / t (r = 0: D*). So the
  CT / ECT gradient in g over many samples equals the gradient of the squared error against
  that closed-form target on the same x_t. Tolerance 3%: the difference is zero-mean noise over
  200k samples."""
  n = 200_000
  batch, z = _gauss_batch(n, seed=1)
  if kind == "ect":
    draws = cm.ect_draws(jax.random.PRNGKey(3), batch["x"], 1.0, p_mean=-1.1, p_std=2.0,
                         q=2.0, k=8.0, b=1.0)
  else:
    draws = cm.grid_draws(jax.random.PRNGKey(3), batch["x"], 12, sigma_min=SMIN,
                          sigma_max=SMAX, rho=RHO)
  draws = {**draws, "z": z}
  ctx = _ctx(lambda p, x, s: _exact_consistency(x, s, p["g"]))
  kw = dict(student="student", teacher="teacher", kind=kind, target="online", loss="l2",
            huber_c=0.0, weighting="inverse_step")
  grad = jax.grad(lambda p: cm.cm_loss_given({"student": p}, ctx, batch, draws, **kw)[0])(
      {"g": jnp.asarray(1.2)})["g"]

  t, t2 = draws["t"], draws["t2"]
  x_t = batch["x"] + t[:, None] * z
  euler = x_t - ((t - t2) / t)[:, None] * (x_t - _edm_posterior(x_t, t))
  safe_t2 = jnp.where(t2 > 0, t2, 1.0)
  target = jnp.where((t2 > 0)[:, None], _exact_consistency(euler, safe_t2, 1.2), euler)
  lam = 1.0 / (t - t2)
  closed = jax.grad(lambda g: jnp.mean(lam * jnp.mean(
      jnp.square(_exact_consistency(x_t, t, g) - target), axis=1)))(jnp.asarray(1.2))
  assert abs(float(closed)) > 1e-3
  np.testing.assert_allclose(float(grad), float(closed), rtol=0.03)


# --------------------------------------------------------------------------------------------
# Curricula, grids, structure
# --------------------------------------------------------------------------------------------


def test_curricula_follow_the_papers():
  """CT (Song et al. 2023, progressive + adaptive EMA), iCT (exponential), ECT's r(t), the
  discrete log-normal index proposal, written out here in numpy / math."""
  K, s0, s1, mu0 = 1000, 2, 150, 0.9
  for k in (0, 1, 250, 999, 1000):
    n_pre = max(1, math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0 ** 2) + s0 ** 2) - 1))
    assert int(cm.progressive_scales(k, K, s0, s1)) == n_pre
    np.testing.assert_allclose(float(cm.progressive_decay(k, K, s0, s1, mu0)),
                               math.exp(s0 * math.log(mu0) / n_pre), rtol=1e-6)
  K, s0, s1 = 800_000, 10, 1280
  k_prime = math.floor(K / (math.log2(math.floor(s1 / s0)) + 1))
  for k in (0, k_prime - 1, k_prime, 3 * k_prime + 5, K):
    assert int(cm.exponential_scales(k, K, s0, s1)) == min(s0 * 2 ** (k // k_prime), s1)
  for t in (0.01, 0.5, 3.0, 40.0):
    for stage in (0, 2):
      want = max(0.0, t * (1 - 2.0 ** -(stage + 1) * (1 + 8 / (1 + math.exp(t)))))
      np.testing.assert_allclose(float(cm.ect_r(jnp.asarray(t), stage, 2.0, 8.0, 1.0)), want,
                                 rtol=1e-5, atol=1e-7)
  N, pm, ps = 11, -1.1, 2.0
  logits = cm.lognormal_index_logits(N, 16, SMIN, SMAX, RHO, pm, ps)
  p = np.exp(np.asarray(logits, np.float64))
  sig = procs.karras_sigmas(N, SMIN, SMAX, RHO)
  cdf = lambda s: math.erf((math.log(s) - pm) / (math.sqrt(2) * ps))
  want = np.array([cdf(sig[i]) - cdf(sig[i + 1]) for i in range(N - 1)])
  np.testing.assert_allclose(p[:N - 1], want, rtol=1e-4)
  assert np.all(p[N - 1:] == 0)


def test_cm_sampler_grid():
  process = procs.make_process("edm", sigma_min=SMIN, sigma_max=SMAX)
  np.testing.assert_allclose(solvers.cm_grid(process, 1), [SMAX, 0.0])
  np.testing.assert_allclose(solvers.cm_grid(process, 2),
                             [SMAX, procs.karras_sigmas(3, SMIN, SMAX, RHO)[1], 0.0], rtol=1e-6)
  np.testing.assert_allclose(solvers.cm_grid(process, 2, intermediate=(0.821,)),
                             [SMAX, 0.821, 0.0], rtol=1e-6)


def test_structure_and_bad_keys():
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  e = Engine(mu.tiny_config("cd", ema_decay=0.99), teacher=teacher)
  assert e.objective.sampler == "cm" and dict(e.objective.ema["student"]) == {
      "target": 0.95, "eval": 0.99}
  assert e.nets["student"].process.name == "edm" and e.nets["student"].prediction == "x0"
  assert e.nets["student"].inner_process.name == "rectified_flow"
  ct = Engine(mu.tiny_config("ct", curriculum_steps=100), teacher=teacher)
  decay = ct.objective.ema["student"]["target"]
  assert callable(decay)
  assert not Engine(mu.tiny_config("ect"), teacher=teacher).objective.ema
  bad = [("ct", {}, "curriculum_steps"), ("cd", {"num_scales": 1}, "num_scales"),
         ("cd", {"sigma_min": 0.0}, "sigma_min"), ("cd", {"weighting": "nope"}, "weighting"),
         ("ect", {"q": 1.0}, "objective.q"), ("ct", {"curriculum": "x"}, "curriculum")]
  for kind, keys, msg in bad:
    with pytest.raises(ValueError, match=msg):
      Engine(mu.tiny_config(kind, **keys), teacher=teacher)


def test_ct_progressive_run_grows_the_grid(tmp_path):
  """A short CT run logs N(k) growing along the curriculum and its EMA target moves."""
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  engine = Engine(mu.tiny_config("ct", curriculum_steps=10, end_scales=40), teacher=teacher)
  state, frozen = engine.init_state()
  scales = []
  for step in range(0, 10, 3):
    state, frozen, metrics = engine.train_step(state, frozen, step)
    scales.append(float(metrics["ct/num_scales"]))
  assert scales == sorted(scales) and scales[0] == 2 and scales[-1] > 30
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                 state.ema["student"]["target"], frozen["teacher"])
  assert max(jax.tree_util.tree_leaves(moved)) > 0


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cd", "ect"])
def test_toy_run_one_step_student_closes_the_gap(kind, tmp_path):
  mu.check_toy_run(CONFIGS[kind], tmp_path, 800, student_steps=1, min_fraction=0.6)


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  teacher = mu.shared_tiny_teacher()
  args = [f"--config.teacher.checkpoint={teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.train.batch_size=64",
          "--config.eval.at_end=false", "--config.checkpoint.every_steps=0",
          "--config.objective.guidance_range=(1.0,2.0)"]
  mu.check_sharded_losses(CONFIGS["cd"], tmp_path, args, mu.phase_losses, ["cd/loss"])
