"""`agd`: a PyTorch reference of the loss (value and gradient w.r.t. the adapter, on CFG
trajectory states and on noised data), the closed form on Gaussian data, a train step that
changes only the adapter, a toy run whose one-pass student matches the two-pass CFG teacher,
and the sharded run (8 fake CPU devices)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.objectives import agd, lcm
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree
from tests.test_guided import _torch_guided_mlp
from tests.test_lcm import _torch_flow_cfg, _torch_trajectory

torch = pytest.importorskip("torch")

B = 16
CONFIG = os.path.join(mu.ROOT, "configs", "toy", "agd.py")


def _setup(**keys):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("agd", teacher, batch=B, label_dropout=0.3,
                                         guidance_range=(1.5, 3.0), trajectory_steps=6, **keys)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  return teacher, engine, state.replace(params=params), frozen, jax.device_get(
      engine.global_batch(0))


@pytest.mark.parametrize("states", ["teacher", "data"])
def test_loss_matches_torch(states):
  teacher, engine, state, frozen, batch = _setup(states=states)
  kw = dict(engine.objective.phases[0].loss.keywords)
  for k in ("guidance_range", "label_dropout"):
    kw.pop(k)
  draws = lcm.draw_inputs(jax.random.PRNGKey(5), batch["x"], num_steps=6,
                          guidance_range=(1.5, 3.0), label_dropout=0.3)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: agd.agd_loss_given(tr, ctx, batch, draws, **kw)
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  grid = torch.linspace(1.0, 0.0, 7)
  n = mu.n2t(draws["n"])
  t = grid[n]
  eps, w = mu.n2t(draws["eps"]), mu.n2t(draws["w"])
  labels = torch.where(mu.n2t(draws["null"]).bool(), torch.full_like(n, 4), mu.n2t(batch["label"]))
  null = torch.full_like(labels, 4)
  if states == "teacher":
    x = _torch_trajectory(net, p_t, eps, grid, n, labels, null, w)
  else:
    x = (1 - t)[:, None] * mu.n2t(batch["x"]) + t[:, None] * eps
  with torch.no_grad():
    target = mu.rf_eps(_torch_flow_cfg(net, p_t, x, t, labels, null, w), x, t)
  out = mu.rf_eps(_torch_guided_mlp(teacher, p_s, x, t, labels, w), x, t)
  ref = ((out - target) ** 2).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


def test_gaussian_closed_form():
  """Classes N(+-m, var), null class moment-matched, networks predicting the exact posterior
  x0 (rectified flow). CFG is linear, so the CFG eps target is the eps of the CFG x0; a student
  whose x0 is exactly that has loss 0, and one whose x0 is off by delta has eps off by
  -(1 - t) delta / t: loss mean_b ((1 - t_b) / t_b)^2 delta^2."""
  var = 0.09
  means = jnp.asarray([[1.0, 0.5], [-1.0, -0.5], [0.0, 0.0]])
  vars_ = jnp.asarray([var, var, var + 1.25])

  def post(x, t, mean, v):
    a = (1.0 - t)[:, None]
    return mean + a * v / (a * a * v + t[:, None] ** 2) * (x - a * mean)

  def teacher_fn(variables, x, timestep, class_labels=None):
    return post(x, timestep / 1000.0, means[class_labels], vars_[class_labels][:, None])

  def student_fn(variables, x, timestep, class_labels=None, guidance=None):
    t = timestep / 1000.0
    c = post(x, t, means[class_labels], vars_[class_labels][:, None])
    u = post(x, t, means[2], vars_[2])
    return u + guidance[:, None] * (c - u) + variables["params"]["delta"]

  ctx = mu.closed_form_context(teacher_fn, student_fn, num_classes=2)
  b = 48
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  draws = {"n": jnp.arange(b) % 6, "eps": jax.random.normal(k[0], (b, 2)),
           "w": jnp.linspace(1.0, 4.0, b), "null": jnp.zeros((b,), bool)}
  batch = {"x": jax.random.normal(k[1], (b, 2)), "label": jnp.arange(b) % 2}
  t = np.linspace(1.0, 0.0, 7)[np.arange(b) % 6]
  for states in ("teacher", "data"):
    loss_of = lambda d: float(agd.agd_loss_given(
        {"student": {"delta": jnp.float32(d)}}, ctx, batch, draws, student="student",
        teacher="teacher", num_steps=6, states=states)[0])
    assert loss_of(0.0) < 1e-10
    np.testing.assert_allclose(loss_of(0.1), np.mean(((1 - t) / t) ** 2) * 0.01, rtol=1e-5)


def test_train_step_changes_only_the_adapter():
  teacher, engine, state, frozen, _ = _setup()
  before = mu.flat_params(jax.device_get(state.params["student"]))
  state, frozen, _ = engine.train_step(state, frozen, 0)
  after = mu.flat_params(jax.device_get(state.params["student"]))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any(k.startswith("guidance_adapter_") for k in changed), sorted(changed)
  assert all(k.startswith(("guidance_embed/", "guidance_adapter_")) for k in changed), changed
  assert engine.objective.sampler == "euler"


def test_student_starts_as_the_conditional_teacher():
  """The adapter's output layers are zero-initialised: at any w the fresh student is the
  teacher's conditional model; and a model without the adapter option is refused."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("agd", teacher, batch=B, adapter_hidden=8)
  _, ctx = mu.phase_context(engine, state, frozen, ())
  x = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
  t = jnp.linspace(0.1, 1.0, B)
  cond = {"class_labels": jnp.arange(B) % 4}
  want = ctx.apply("teacher", x, t, cond)
  got = ctx.apply("student", x, t, cond, guidance=jnp.linspace(1.0, 5.0, B))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  assert any(k.startswith("guidance_adapter_") for k in mu.flat_params(state.params["student"]))
  from distill.engine import check_network_kwargs
  from distill.objective import Network
  with pytest.raises(ValueError, match=r"network 'student': model 'sana' has no option "
                                       r"\['guidance_adapter'\]"):
    check_network_kwargs(Network("student", kwargs={"guidance_adapter": 8}), "sana")


@pytest.mark.slow
def test_toy_run_one_pass_student_matches_the_cfg_teacher(tmp_path):
  """gmm at w = 2, 32 Euler steps each: the student (32 calls) is within 10% of the CFG
  teacher's (64 calls) SWD, and for one class its samples are much closer to the CFG teacher's
  than the unguided teacher's are (measured: 0.023 against 0.164 with the full toy teacher)."""
  teacher = mu.shared_tiny_teacher("gmm", 800)
  w = tmp_path / "student"
  mu.run_train(f"{CONFIG}:gmm", w, f"--config.teacher.checkpoint={teacher}",
               "--config.train.batch_size=128", "--config.eval.num_samples=1024",
               "--config.sample.num=64", "--config.checkpoint.every_steps=0")
  with open(w / "eval.json") as f:
    r = json.load(f)["results"]
  s, t = r["student_steps_32"]["swd"], r["teacher_steps_32"]["swd"]
  assert abs(s - t) <= 0.1 * t, r
  # One class: the student's samples against the CFG teacher's (same noise), next to the
  # unguided teacher's (how far guidance moves the samples).
  from distill import evaluation, trainer
  from distill.metrics.swd import swd
  engine, state, frozen, _ = trainer.open_run(str(w), [])
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)
  labels = np.zeros(1024, np.int32)
  gen = lambda net, g: evaluation.generate(ctx, net, params[net], n=1024, seed=3, solver="euler",
                                           steps=32, shape=engine.source.shape, guidance=g,
                                           labels=labels)[0]
  guided_teacher = gen("teacher", 2.0)
  assert swd(gen("student", 2.0), guided_teacher) < 0.4 * swd(gen("teacher", 1.0),
                                                               guided_teacher)


def test_dit_student_gets_block_adapters_and_starts_as_the_teacher():
  """AGD on a DiT: the student gains the guidance embedding and an adapter in every block
  (`guidance_adapter`, zero-initialised output), so at any w the fresh student is the
  conditional teacher; a train step changes only those parameters; the adapters' FLOPs count."""
  from distill import config as config_lib
  from distill.engine import Engine
  from launch.bench import random_teacher
  from models.dit import DiT
  c = mu.tiny_config("agd", batch=4, adapter_hidden=8, trajectory_steps=4)
  c.data = config_lib.ConfigDict(dict(name="synthetic", height=8, width=8, channels=4,
                                      num_classes=4))
  c.model = config_lib.ConfigDict(dict(name="dit", prediction="flow", num_attention_heads=2,
                                       attention_head_dim=8, in_channels=4, num_layers=2,
                                       sample_size=8, patch_size=2, num_embeds_ada_norm=4))
  teacher = random_teacher(c)
  teacher.params = jax.device_get(mu.perturb(teacher.params, 0, scale=0.2))
  engine = Engine(c, teacher=teacher)
  state, frozen = engine.init_state()
  student = engine.nets["student"].module
  assert student.guidance_adapter == 8 and student.guidance_embed
  _, ctx = mu.phase_context(engine, state, frozen, ())
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 4))
  t, cond = jnp.linspace(0.1, 0.9, 4), {"class_labels": jnp.arange(4)}
  want = ctx.apply("teacher", x, t, cond)
  got = ctx.apply("student", x, t, cond, **ctx.guidance_inputs("student", jnp.linspace(1, 5, 4)))
  assert float(jnp.abs(want).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  before = mu.flat_params(jax.device_get(state.params["student"]))
  state, frozen, _ = engine.train_step(state, frozen, 0)
  after = mu.flat_params(jax.device_get(state.params["student"]))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any("/guidance_adapter/" in k for k in changed), sorted(changed)
  assert all("guidance_embedder/" in k or "/guidance_adapter/" in k for k in changed), changed
  plain = DiT(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8)
  adapted = plain.clone(guidance_adapter=8)
  assert adapted.flops_per_example() - plain.flops_per_example() == 2 * 2 * 2 * 16 * 8


def test_unet_student_gets_resnet_adapters_and_starts_as_the_teacher():
  """AGD on an SD UNet: the student gains LCM's w input (`time_cond_proj_dim`, its projection
  zero-initialised) and an adapter of the time embedding in every resnet, so at any w the
  fresh student is the teacher; a train step changes only the w projection and the adapters,
  and the trained student's output then depends on w; the adapters do not export."""
  from distill import config as config_lib
  from distill.engine import Engine
  from launch.bench import random_teacher
  from models.convert.unet import diffusers_config
  c = mu.tiny_config("agd", batch=4, adapter_hidden=8, trajectory_steps=4,
                     adapter_params="cond_proj|guidance_adapter")
  c.data = config_lib.ConfigDict(dict(name="synthetic", height=8, width=8, channels=4,
                                      num_classes=0, text_tokens=5, text_dim=24))
  c.model = config_lib.ConfigDict(dict(
      name="unet", prediction="eps", sample_size=8, block_out_channels=(16,),
      layers_per_block=1, norm_num_groups=8, cross_attention_dim=24, num_attention_heads=2,
      down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",)))
  c.process.name = "vp_discrete"
  teacher = random_teacher(c)
  teacher.params = jax.device_get(mu.perturb(teacher.params, 0, scale=0.2))
  engine = Engine(c, teacher=teacher)
  state, frozen = engine.init_state()
  student = engine.nets["student"].module
  assert student.guidance_adapter == 8 and student.time_cond_proj_dim == 256
  _, ctx = mu.phase_context(engine, state, frozen, ())
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 4))
  t = jnp.asarray([100.0, 400.0, 700.0, 950.0])
  cond = {"encoder_hidden_states": jax.random.normal(jax.random.PRNGKey(1), (4, 5, 24))}
  w = jnp.linspace(1.0, 5.0, 4)
  want = ctx.apply("teacher", x, t, cond)
  got = ctx.apply("student", x, t, cond, **ctx.guidance_inputs("student", w))
  assert float(jnp.abs(want).max()) > 1e-2
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  before = mu.flat_params(jax.device_get(state.params["student"]))
  for step in range(2):
    state, frozen, _ = engine.train_step(state, frozen, step)
  after = mu.flat_params(jax.device_get(state.params["student"]))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert any("/guidance_adapter/" in k for k in changed), sorted(changed)
  assert any("cond_proj" in k for k in changed), sorted(changed)
  assert all("cond_proj" in k or "/guidance_adapter/" in k for k in changed), changed
  _, ctx = mu.phase_context(engine, state, frozen, ())
  one = ctx.apply("student", x, t, cond, **ctx.guidance_inputs("student", jnp.ones(4)))
  five = ctx.apply("student", x, t, cond, **ctx.guidance_inputs("student", 5.0 * jnp.ones(4)))
  assert float(jnp.abs(one - five).max()) > 1e-7
  with pytest.raises(ValueError, match="'guidance_adapter'.*no diffusers"):
    diffusers_config(student)
