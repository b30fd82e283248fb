"""`guided` (Meng et al.): a PyTorch reference of the stage-1 loss (value and gradient w.r.t.
every student weight) and of the w-conditioned stage-2 loss, the stage-1 closed form on
Gaussian data, the stage plan (guidance, then progressive stages promoting into the frozen
w-conditioned teacher), evaluation at a guidance scale, a toy run against the guided teacher
and the sharded run (8 fake CPU devices)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.objectives import guided, progressive
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree
from tests.test_lcm import _torch_flow_cfg, _torch_jump, _torch_x0_eps

torch = pytest.importorskip("torch")

B = 16
CONFIG = os.path.join(mu.ROOT, "configs", "toy", "guided.py")


def _torch_guided_mlp(teacher, p, x, t, labels, w):
  """The student MLP with its guidance embedding (models/mlp.py: a TimestepEmbedding of w) and,
  where its weights have them, the per-block guidance adapters."""
  import math
  F = torch.nn.functional
  net = mu.torch_mlp(teacher)
  half = net.time_embed_dim // 2
  freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
  emb = lambda v: torch.cat([torch.cos(v[:, None] * freqs), torch.sin(v[:, None] * freqs)], -1)
  dense = lambda name, h: h @ p[name + "/kernel"] + p[name + "/bias"]
  c = dense("time_embed/fc2", F.silu(dense("time_embed/fc1", emb(1000.0 * t))))
  c = c + dense("guidance_embed/fc2", F.silu(dense("guidance_embed/fc1", emb(w))))
  c = c + p["class_embed/embedding"][labels]
  h = dense("in_proj", x)
  for i in range(net.depth):
    b = f"block_{i}"
    y = dense(b + "/fc1", net._ln(p, b + "/norm", h)) + dense(b + "/cond", F.silu(c))
    h = h + dense(b + "/fc2", F.silu(y))
    a = f"guidance_adapter_{i}"
    if a + "/fc1/kernel" in p:   # AGD's per-block additive adapter
      h = h + dense(a + "/fc2", F.silu(dense(a + "/fc1", F.silu(c))))
  return dense("out_proj", F.silu(net._ln(p, "out_norm", h)))


def _engine(**keys):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("guided", teacher, batch=B, label_dropout=0.3,
                                         guidance_range=(1.5, 3.0), **keys)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)   # the guidance embedding is nonzero
  state = state.replace(params=params)
  return teacher, engine, state, frozen, jax.device_get(engine.global_batch(0))


def test_guidance_stage_loss_matches_torch():
  teacher, engine, state, frozen, batch = _engine(guidance_steps=3, stage_steps=3,
                                                  student_steps=4, num_stages=2)
  assert engine.objective.phases[0].name == "guidance"
  kw = dict(engine.objective.phases[0].loss.keywords)
  for k in ("guidance_range", "label_dropout"):
    kw.pop(k)
  draws = guided.draw_inputs(engine.nets["teacher"].process, jax.random.PRNGKey(3), batch["x"],
                             guidance_range=(1.5, 3.0), label_dropout=0.3)
  # Times in [0.05, 1]: at the process's smallest times the SNR + 1 weight reaches ~1e5 and
  # amplifies float32 rounding of the x0 difference past the 1e-5 tolerance.
  draws["t"] = 0.05 + 0.95 * draws["t"]
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: guided.guidance_loss_given(tr, ctx, batch, draws, **kw)
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  t, w = mu.n2t(draws["t"]), mu.n2t(draws["w"])
  x0, eps = mu.n2t(batch["x"]), mu.n2t(draws["eps"])
  labels = torch.where(mu.n2t(draws["null"]).bool(), torch.full((B,), 4, dtype=torch.long),
                       mu.n2t(batch["label"]))
  z = (1 - t)[:, None] * x0 + t[:, None] * eps
  with torch.no_grad():
    target = mu.rf_x0(_torch_flow_cfg(net, p_t, z, t, labels, torch.full_like(labels, 4), w),
                      z, t)
  x_hat = mu.rf_x0(_torch_guided_mlp(teacher, p_s, z, t, labels, w), z, t)
  ref = (((1 - t) ** 2 / t ** 2 + 1) * ((x_hat - target) ** 2).mean(dim=1)).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


def test_progressive_stage_with_w_matches_torch():
  """Stage 2: the w-conditioned teacher's two DDIM steps (no CFG pass) and the student, both
  given the drawn w."""
  teacher, engine, state, frozen, batch = _engine(part="progressive", student_steps=4,
                                                  num_stages=2, stage_steps=3)
  # The w-conditioned teacher: the (perturbed) student's weights stand in for a stage-1 result.
  frozen = dict(frozen)
  frozen["teacher"] = mu.perturb(state.params["student"], 4)
  engine.nets = dict(engine.nets)
  engine.nets["teacher"] = engine.nets["student"]
  kw = dict(engine.objective.phases[0].loss.keywords)
  for k in ("guidance_range", "label_dropout"):
    kw.pop(k)
  assert kw["embed_w"] and kw["teacher"] == "teacher"
  draws = progressive.draw_inputs(jax.random.PRNGKey(5), batch["x"], num_steps=4,
                                  label_dropout=0.3, guidance_range=(1.5, 3.0))
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: progressive.progressive_loss_given(tr, ctx, batch, draws, **kw)
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  grid = torch.linspace(1.0, 0.0, 9)
  n = mu.n2t(draws["n"])
  t, tm, te = grid[2 * n], grid[2 * n + 1], grid[2 * n + 2]
  x0, eps, w = mu.n2t(batch["x"]), mu.n2t(draws["eps"]), mu.n2t(draws["w"])
  labels = torch.where(mu.n2t(draws["null"]).bool(), torch.full_like(n, 4), mu.n2t(batch["label"]))
  z = (1 - t)[:, None] * x0 + t[:, None] * eps
  g = lambda p, x, tt: _torch_guided_mlp(teacher, p, x, tt, labels, w)
  with torch.no_grad():
    zm = _torch_jump(*_torch_x0_eps(g(p_t, z, t), z, t), tm)
    ze = _torch_jump(*_torch_x0_eps(g(p_t, zm, tm), zm, tm), te)
    ratio = (te / t)[:, None]
    target = (ze - ratio * z) / ((1 - te)[:, None] - ratio * (1 - t)[:, None])
  x_hat = mu.rf_x0(g(p_s, z, t), z, t)
  ref = (torch.clamp((1 - t) ** 2 / t ** 2, min=1.0) * ((x_hat - target) ** 2).mean(1)).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


def test_guidance_stage_gaussian_closed_form():
  """Two classes with Gaussian data N(+-m, var) and a null class N(0, var + m^2)-moment-matched
  mixture stand-in: the exact conditional and null posteriors give the CFG target in closed
  form; a student predicting it has loss 0, one off by delta has loss
  mean((SNR + 1) delta^2)."""
  dim, b, var = 2, 64, 0.09
  means = jnp.asarray([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]])   # class 0, 1, null
  vars_ = jnp.asarray([var, var, var + 1.25])

  def post(x, t, mean, v):
    a = (1.0 - t)[:, None]
    return mean + a * v[:, None] / (a * a * v[:, None] + t[:, None] ** 2) * (x - a * mean)

  def teacher_fn(variables, x, timestep, class_labels=None):
    return post(x, timestep / 1000.0, means[class_labels], vars_[class_labels])

  def student_fn(variables, x, timestep, class_labels=None, guidance=None):
    t = timestep / 1000.0
    c = post(x, t, means[class_labels], vars_[class_labels])
    u = post(x, t, means[2], jnp.full_like(t, vars_[2]))
    return u + guidance[:, None] * (c - u) + variables["params"]["delta"]

  ctx = mu.closed_form_context(teacher_fn, student_fn, num_classes=2)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  draws = {"t": jax.random.uniform(k[0], (b,), minval=0.05, maxval=1.0),
           "eps": jax.random.normal(k[1], (b, dim)), "w": jnp.linspace(1.0, 4.0, b),
           "null": jnp.zeros((b,), bool)}
  batch = {"x": jax.random.normal(k[2], (b, dim)), "label": jnp.arange(b) % 2}
  loss_of = lambda d: float(guided.guidance_loss_given(
      {"student": {"delta": jnp.float32(d)}}, ctx, batch, draws, student="student",
      teacher="teacher", weighting="snr_plus_one")[0])
  assert loss_of(0.0) < 1e-10
  t = np.asarray(draws["t"])
  np.testing.assert_allclose(loss_of(0.1), np.mean(((1 - t) ** 2 / t ** 2 + 1) * 0.01),
                             rtol=1e-5)


def test_stage_plan():
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  engine = Engine(mu.tiny_config("guided", guidance_steps=5, student_steps=8, num_stages=3,
                                 stage_steps=4), teacher=teacher)
  assert engine.total_steps == 17 and engine.boundary_steps == [5, 9, 13]
  names = [o.phases[0].name for o in engine.stage_objectives]
  assert names == ["guidance", "progressive", "progressive", "progressive"]
  assert [o.phases[0].loss.keywords.get("num_steps") for o in engine.stage_objectives] == [
      None, 8, 4, 2]
  assert [dict(s.promote) for s in engine.stages] == [{}] + [{"w_teacher": "student"}] * 3
  assert engine.stage_objectives[1].phases[0].loss.keywords["teacher"] == "w_teacher"
  assert set(engine.frozen_names) == {"teacher", "w_teacher"}
  one = Engine(mu.tiny_config("guided", part="guidance"), teacher=teacher)
  assert one.stages == () and "w_teacher" not in one.plans
  with pytest.raises(ValueError, match="objective.part"):
    Engine(mu.tiny_config("guided", part="all"), teacher=teacher)


def test_sample_grid_uses_the_evaluations_guidance(tmp_path, monkeypatch):
  """The training's sample grid samples as eval.json's rows do at eval.guidance = 2: the teacher
  with CFG at 2 and the w-embedded student with w = 2 (they were both sampled at w = 1); a
  student without a w input samples as it is. The panel titles say w."""
  from distill import evaluation, images, trainer
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  real = evaluation.generate
  for objective, keys, student_w in (("guided", dict(part="guidance"), 2.0),
                                     ("progressive", dict(num_stages=1, student_steps=2), 1.0)):
    config = mu.tiny_config(objective, **keys)
    config.eval.guidance = 2.0
    config.eval.class_conditional = True
    config.eval.steps = (1,)
    config.eval.teacher_steps = 2
    config.sample.num = 8
    engine = Engine(config, teacher=teacher)
    state, frozen = engine.init_state()
    seen, shown = [], []
    monkeypatch.setattr(evaluation, "generate",
                        lambda ctx, net, *a, **k: seen.append((net, k["guidance"]))
                        or real(ctx, net, *a, **k))
    monkeypatch.setattr(images, "save_panels", lambda path, panels: shown.append(panels))
    trainer.write_samples(engine, state, frozen, 0, str(tmp_path))
    assert seen == [("teacher", 2.0), ("student", student_w)], objective
    titles = [t for t, _ in shown[0]]
    assert titles[1] == "teacher 2 steps w=2"
    assert titles[2] == ("student 1 step w=2" if student_w == 2.0 else "student 1 step")


def test_guidance_distillation_needs_a_conditional_teacher():
  """guided and agd (and lcm / progressive with a guidance scale) on an unconditional teacher
  would distil u + w (c - u) = u, i.e. no guidance, while looking fine: refused at setup. The
  same objectives without guidance, or with a class-conditional teacher, pass."""
  from distill import trainer
  from distill.engine import Engine
  cases = [("guided", {}, True), ("agd", {}, True),
           ("lcm", dict(guidance_range=(2.0, 4.0)), True), ("lcm", {}, False),
           ("progressive", dict(guidance=2.0, student_steps=2, num_stages=1), True),
           ("progressive", dict(student_steps=2, num_stages=1), False)]
  for name, keys, distils in cases:
    for classes, data in ((0, "checkerboard"), (4, "gmm")):
      engine = Engine(mu.tiny_config(name, data=data, **keys),
                      teacher=mu.make_teacher(num_classes=classes))
      if distils and not classes:
        with pytest.raises(ValueError, match="distils classifier-free guidance, but its teacher "
                                             "is unconditional on data 'checkerboard'"):
          trainer._check_guidance_condition(engine)   # pylint: disable=protected-access
      else:
        trainer._check_guidance_condition(engine)   # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.parametrize("config, extra, fragment", [
    (CONFIG, (), "teacher is unconditional"),
    # Any objective evaluated at a guidance scale on an unconditional teacher.
    (os.path.join(mu.ROOT, "configs", "toy", "scm.py"), ("--config.eval.guidance=2.0",),
     "config key 'eval.guidance': 2.0 guides an unconditional teacher")])
def test_guided_run_on_an_unconditional_teacher_stops_in_one_line(tmp_path, config, extra,
                                                                  fragment):
  import subprocess
  teacher = mu.shared_tiny_teacher("checkerboard")
  w = tmp_path / "run"
  p = subprocess.run(mu.train_cmd(f"{config}:checkerboard", w,
                                  f"--config.teacher.checkpoint={teacher}", *extra),
                     cwd=mu.ROOT, capture_output=True, text=True, timeout=600, env=mu.env())
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
  assert fragment in lines[0] and not w.exists()


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_toy_run_closes_the_guided_teachers_gap(tmp_path):
  """gmm (classes), evaluated class-conditionally at w = 2: the 4-step student closes >= 70% of
  the gap between the guided teacher's 1 and 16 Euler steps."""
  import json
  teacher = mu.shared_tiny_teacher("gmm", 800)
  w = tmp_path / "student"
  mu.run_train(f"{CONFIG}:gmm", w, f"--config.teacher.checkpoint={teacher}",
               "--config.objective.guidance_steps=300", "--config.objective.stage_steps=200",
               "--config.train.batch_size=128", "--config.eval.num_samples=1024",
               "--config.eval.teacher_steps=16", "--config.eval.steps=(4,)",
               "--config.sample.num=64", "--config.checkpoint.every_steps=0")
  with open(w / "eval.json") as f:
    report = json.load(f)
  r = report["results"]
  assert report["guidance"] == 2.0 and report["class_conditional"]
  t1, tn, s4 = (r["teacher_steps_1"]["swd"], r["teacher_steps_16"]["swd"],
                r["student_steps_4"]["swd"])
  assert (t1 - s4) / (t1 - tn) >= 0.7, r


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  teacher = mu.shared_tiny_teacher()
  args = [f"--config.teacher.checkpoint={teacher}", "--config.train.log_every=5",
          "--config.train.batch_size=64", "--config.eval.at_end=false",
          "--config.checkpoint.every_steps=0", "--config.objective.guidance_steps=5",
          "--config.objective.student_steps=4", "--config.objective.num_stages=1",
          "--config.objective.stage_steps=5"]
  mu.check_sharded_losses(CONFIG, tmp_path, args, mu.phase_losses, [])
