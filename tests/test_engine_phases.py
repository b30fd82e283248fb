"""The engine's scheduling patterns, each expressed through the public objective API.

DMD2's 5:1 critic/generator TTUR with a critic-side head, SANA-Sprint's strict G/D alternation,
a warm-up gate, progressive N -> N/2 stages with per-stage LR annealing and student-to-teacher
promotion, phases seeing earlier phases' updates within a step, frozen networks never updated,
and non-finite updates skipped and counted.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import config as config_lib
from distill.engine import Engine
from distill.objective import Network, Objective, Phase, Stage, register_objective, OBJECTIVES
import distill.objectives  # noqa: F401
import models.all  # noqa: F401


def tiny_config(objective: str, steps: int = 10, **objective_keys):
  c = config_lib.base_config()
  c.objective.name = objective
  for k, v in objective_keys.items():
    c.objective[k] = v
  c.data.name = "gmm"
  c.model.name = "mlp"
  c.model.hidden = 8
  c.model.depth = 1
  c.model.prediction = "flow"
  c.train.steps = steps
  c.train.batch_size = 8
  c.optim.lr = 1e-2
  return c


def _mean_out(ctx, net, params, batch):
  x = batch["x"]
  return jnp.mean(ctx.call(net, x, jnp.zeros((x.shape[0],)), params=params))


def recording_loss(trainable, ctx, batch, rng, t, *, nets, tag):
  """A quadratic loss on the networks' outputs that records the Time it was called with."""
  loss = sum(jnp.square(_mean_out(ctx, n, trainable[n], batch) - 1.0) for n in nets)
  return loss, {"step": t.step.astype(jnp.float32), "phase_step": t.phase_step.astype(jnp.float32),
                "stage": t.stage.astype(jnp.float32),
                "stage_step": t.stage_step.astype(jnp.float32), f"ran_{tag}": jnp.ones(())}


def _register(name, build):
  if name not in OBJECTIVES:
    register_objective(name)(build)


def build_ttur(cfg):
  critic = functools.partial(recording_loss, nets=("fake", "head"), tag="critic")
  gen = functools.partial(recording_loss, nets=("student",), tag="gen")
  return Objective(
      networks=(Network("student"), Network("fake", init="student"),
                Network("head", init="random")),
      phases=(Phase("critic", critic, trains=("fake", "head"), every=1),
              Phase("generator", gen, trains=("student",), every=5, offset=4)))


def build_alternating(cfg):
  g = functools.partial(recording_loss, nets=("student",), tag="g")
  d = functools.partial(recording_loss, nets=("disc",), tag="d")
  return Objective(networks=(Network("student"), Network("disc")),
                   phases=(Phase("gen", g, trains=("student",), every=2, offset=0),
                           Phase("disc", d, trains=("disc",), every=2, offset=1)))


def build_gate(cfg):
  a = functools.partial(recording_loss, nets=("student",), tag="a")
  b = functools.partial(recording_loss, nets=("student",), tag="b")
  return Objective(networks=(Network("student"),),
                   phases=(Phase("main", a, trains=("student",)),
                           Phase("late", b, trains=("student",), start=3, stop=7)))


def _run(engine, steps):
  state, frozen = engine.init_state()
  history = []
  for step in range(steps):
    stage, stage_step = engine.stage_of(step)
    if stage > 0 and stage_step == 0:
      state, frozen = engine.enter_stage(state, frozen, stage)
    state, frozen, m = engine.train_step(state, frozen, step)
    history.append({k: float(v) for k, v in jax.device_get(m).items()})
  return state, frozen, history


def _opt_count(opt_state):
  counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]
            if "count" in jax.tree_util.keystr(p)]
  return max(counts)


def test_dmd2_ttur_five_to_one():
  _register("test_ttur", build_ttur)
  engine = Engine(tiny_config("test_ttur"))
  state, _, hist = _run(engine, 10)
  gen_steps = [h["generator/step"] for h in hist if "generator/step" in h]
  assert gen_steps == [4.0, 9.0]
  assert [h["generator/phase_step"] for h in hist if "generator/phase_step" in h] == [0.0, 1.0]
  assert all("critic/step" in h for h in hist)
  # Optimizer states advance per update of their own network: 10 critic, 2 generator updates.
  assert _opt_count(state.opt_state["fake"]) == 10
  assert _opt_count(state.opt_state["head"]) == 10
  assert _opt_count(state.opt_state["student"]) == 2


def test_strict_alternation():
  _register("test_alt", build_alternating)
  engine = Engine(tiny_config("test_alt"))
  state, _, hist = _run(engine, 6)
  ran = [("g" if "gen/step" in h else "") + ("d" if "disc/step" in h else "") for h in hist]
  assert ran == ["g", "d", "g", "d", "g", "d"]
  assert _opt_count(state.opt_state["student"]) == 3
  assert _opt_count(state.opt_state["disc"]) == 3


def test_warmup_gate_and_stop():
  _register("test_gate", build_gate)
  engine = Engine(tiny_config("test_gate"))
  _, _, hist = _run(engine, 9)
  late = [int(h["late/step"]) for h in hist if "late/step" in h]
  assert late == [3, 4, 5, 6]
  assert [int(h["late/phase_step"]) for h in hist if "late/phase_step" in h] == [0, 1, 2, 3]


def build_progressive(cfg):
  def loss(trainable, ctx, batch, rng, t):
    # Distil the frozen teacher's output into the student (a stand-in for N -> N/2 targets).
    x = batch["x"]
    ts = jnp.zeros((x.shape[0],))
    target = jax.lax.stop_gradient(ctx.call("teacher", x, ts))
    out = ctx.call("student", x, ts, params=trainable["student"])
    return jnp.mean(jnp.square(out - target - 1.0)), {"stage": t.stage.astype(jnp.float32)}
  stages = tuple(Stage(steps=4, promote={"teacher": "student"} if i else {}, reset_opt=True)
                 for i in range(3))
  return Objective(networks=(Network("teacher", init="random", trainable=None),
                             Network("student", init="teacher")),
                   phases=(Phase("distill", loss, trains=("student",)),), stages=stages)


def test_progressive_stages_promote_and_anneal():
  _register("test_prog", build_progressive)
  c = tiny_config("test_prog", steps=12)
  c.optim.schedule = "cosine"
  engine = Engine(c)
  assert engine.total_steps == 12 and engine.boundary_steps == [4, 8]
  state, frozen = engine.init_state()
  teacher0 = jax.device_get(frozen["teacher"])
  lrs, stages = [], []
  for step in range(12):
    stage, stage_step = engine.stage_of(step)
    if stage > 0 and stage_step == 0:
      before = jax.device_get(state.params["student"])
      state, frozen = engine.enter_stage(state, frozen, stage)
      # The student of the finished stage became the teacher.
      jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["teacher"]),
                             before)
      assert _opt_count(state.opt_state["student"]) == 0  # reset_opt
    state, frozen, m = engine.train_step(state, frozen, step)
    lrs.append(float(m["distill/lr/student"]))
    stages.append(int(m["distill/stage"]))
  assert stages == [0] * 4 + [1] * 4 + [2] * 4
  # Cosine annealing restarts at every stage: same lr at the same stage step.
  np.testing.assert_allclose(lrs[0:4], lrs[4:8], rtol=1e-6)
  np.testing.assert_allclose(lrs[0:4], lrs[8:12], rtol=1e-6)
  assert lrs[0] > lrs[1] > lrs[2] > lrs[3]
  # The teacher differs from the initial one after promotion.
  diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                jax.device_get(frozen["teacher"]), teacher0)
  assert max(jax.tree_util.tree_leaves(diff)) > 0


def build_sees_update(cfg):
  def first(trainable, ctx, batch, rng, t):
    # Pushes every parameter of `a` up (gradient of -sum(params)).
    return -sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(trainable["a"])), {}

  def second(trainable, ctx, batch, rng, t):
    seen = sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(ctx.params["a"]))
    frozen_sum = sum(jnp.sum(p) for p in jax.tree_util.tree_leaves(ctx.params["f"]))
    loss = jnp.square(_mean_out(ctx, "b", trainable["b"], batch))
    return loss, {"seen_a": seen, "frozen": frozen_sum}
  return Objective(networks=(Network("a"), Network("b"), Network("f", trainable=None)),
                   phases=(Phase("first", first, trains=("a",)),
                           Phase("second", second, trains=("b",))))


def test_later_phase_sees_earlier_update_and_frozen_untouched():
  _register("test_order", build_sees_update)
  c = tiny_config("test_order", steps=2)
  c.optim.name = "sgd"
  c.optim.b1 = 0.0
  engine = Engine(c)
  state, frozen = engine.init_state()
  a0 = float(sum(np.sum(p) for p in jax.tree_util.tree_leaves(jax.device_get(state.params["a"]))))
  f0 = jax.device_get(frozen["f"])
  state, frozen, m = engine.train_step(state, frozen, 0)
  n_params = sum(np.size(p) for p in jax.tree_util.tree_leaves(jax.device_get(state.params["a"])))
  # SGD with lr 1e-2 on -sum(params) adds 1e-2 to every parameter of `a` before phase 2 runs.
  np.testing.assert_allclose(float(m["second/seen_a"]), a0 + 1e-2 * n_params, rtol=1e-5)
  assert "f" not in state.params and "f" not in state.opt_state
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["f"]), f0)


def build_nan_at(cfg):
  bad_step = int(cfg.bad_step)

  def loss(trainable, ctx, batch, rng, t):
    base = jnp.square(_mean_out(ctx, "student", trainable["student"], batch) - 1.0)
    return base * jnp.where(t.step == bad_step, jnp.nan, 1.0), {}
  return Objective(networks=(Network("student"),),
                   phases=(Phase("p", loss, trains=("student",)),),
                   ema={"student": {"eval": 0.5}})


def test_nonfinite_update_is_skipped_and_counted():
  if "test_nan" not in OBJECTIVES:
    register_objective("test_nan", defaults={"bad_step": 1})(build_nan_at)
  c = tiny_config("test_nan", steps=3, bad_step=1)
  engine = Engine(c)
  state, frozen = engine.init_state()
  state, frozen, _ = engine.train_step(state, frozen, 0)
  p1 = jax.device_get(state.params["student"])
  e1 = jax.device_get(state.ema["student"]["eval"])
  state, frozen, m = engine.train_step(state, frozen, 1)
  assert float(m["p/nonfinite"]) == 1.0 and int(state.skipped) == 1
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params["student"]), p1)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(state.ema["student"]["eval"]), e1)
  state, frozen, m = engine.train_step(state, frozen, 2)
  assert float(m["p/nonfinite"]) == 0.0 and int(state.skipped) == 0
  assert int(state.skipped_total) == 1


def test_grad_accumulation_matches_full_batch_for_deterministic_loss():
  """With a loss that uses no randomness, k micro-batches give the full-batch gradient."""
  def build(cfg):
    def loss(trainable, ctx, batch, rng, t):
      return jnp.mean(jnp.square(ctx.call("student", batch["x"], jnp.zeros(batch["x"].shape[:1]),
                                          params=trainable["student"]) - batch["x"])), {}
    return Objective(networks=(Network("student"),),
                     phases=(Phase("p", loss, trains=("student",)),))
  _register("test_accum", build)
  results = []
  for accum in (1, 4):
    c = tiny_config("test_accum", steps=2)
    c.train.grad_accum = accum
    c.optim.name = "sgd"
    c.optim.b1 = 0.0
    engine = Engine(c)
    state, frozen = engine.init_state()
    for s in range(2):
      state, frozen, _ = engine.train_step(state, frozen, s)
    results.append(jax.device_get(state.params["student"]))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                         *results)


def build_lora(cfg):
  from distill.objective import LoRA

  def loss(trainable, ctx, batch, rng, t):
    x = batch["x"]
    ts = jnp.zeros((x.shape[0],))
    out = ctx.call("student", x, ts, params=trainable["student"])
    base = ctx.call("base", x, ts)
    return jnp.mean(jnp.square(out - 1.0)), {"diff_from_base": jnp.max(jnp.abs(out - base))}
  return Objective(networks=(Network("base", init="random", trainable=None),
                             Network("student", init="base", base="base",
                                     adapter=LoRA(r"block_\d+", rank=2, alpha=4.0))),
                   phases=(Phase("p", loss, trains=("student",)),))


def test_lora_student_shares_frozen_base_and_trains_only_adapters():
  _register("test_lora_net", build_lora)
  engine = Engine(tiny_config("test_lora_net", steps=3))
  state, frozen = engine.init_state()
  base0 = jax.device_get(frozen["base"])
  leaves = jax.tree_util.tree_flatten_with_path(state.params["student"])[0]
  # Only adapter matrices live in the state, and only under the selected blocks.
  assert leaves and all("block_" in jax.tree_util.keystr(p) for p, _ in leaves)
  n_lora = sum(np.size(v) for _, v in leaves)
  n_base = sum(np.size(v) for v in jax.tree_util.tree_leaves(base0))
  assert n_lora < n_base / 4
  state, frozen, m = engine.train_step(state, frozen, 0)
  # B starts at zero: the student is the base (to float32 rounding: the merged and the plain
  # forward are compiled separately and may tile their matmuls differently)
  first = float(m["p/diff_from_base"])
  assert first <= 1e-6
  state, frozen, m = engine.train_step(state, frozen, 1)
  assert float(m["p/diff_from_base"]) > 100 * max(first, 1e-7)  # the adapters moved
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["base"]), base0)


def test_per_network_param_dtype():
  _register("test_ttur", build_ttur)
  c = tiny_config("test_ttur", steps=1)
  c.optim.networks = {"fake": {"param_dtype": "bfloat16", "lr": 1e-3}}
  engine = Engine(c)
  state, frozen = engine.init_state()
  dtypes = lambda n: {x.dtype for x in jax.tree_util.tree_leaves(state.params[n])}
  assert dtypes("fake") == {jnp.dtype("bfloat16")}
  assert dtypes("student") == {jnp.dtype("float32")}
  state, frozen, m = engine.train_step(state, frozen, 0)
  assert {x.dtype for x in jax.tree_util.tree_leaves(state.params["fake"])} == {
      jnp.dtype("bfloat16")}
  assert float(m["critic/lr/fake"]) == pytest.approx(1e-3)
  assert float(m["critic/lr/head"]) == pytest.approx(1e-2)


def test_fine_tune_from_the_teacher_can_change_the_parameterisation():
  """denoise with init "teacher": the teacher's weights; with `reparameterize` trained in the
  config's process and prediction kind (a VP eps teacher into a flow model, or here a flow
  teacher into VP eps), without it in the teacher's own."""
  from tests._matching_utils import make_teacher, tiny_config
  teacher = make_teacher(4)
  for reparam, process, kind in ((True, "vp_discrete", "eps"), (False, "rectified_flow", "flow")):
    c = tiny_config("denoise", init="teacher", reparameterize=reparam)
    c.process.name = "vp_discrete"
    c.model.prediction = "eps"
    engine = Engine(c, teacher=teacher)
    info = engine.nets["model"]
    assert (info.process.name, info.prediction) == (process, kind)
    state, _ = engine.init_state()
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params["model"]),
                           teacher.params)


def test_reading_ahead_changes_no_batch():
  """global_batch reads step s + 1 on a background thread while step s runs; consecutive steps,
  jumps (a resume) and going back all give exactly the source's batch of the step."""
  from tests._matching_utils import tiny_config as objective_config
  engine = Engine(objective_config("denoise"))
  bs = int(engine.config.train.batch_size)
  for step in (0, 1, 2, 7, 8, 3):
    got = jax.device_get(engine.global_batch(step))
    want = engine.source.batch(step, bs)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert engine._next["train"][0][0] == 4   # the batch after the last one asked for is being read
