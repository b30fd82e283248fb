"""`lcm` and `segmented_cm`: PyTorch references of both losses (value and gradient w.r.t. every
student weight, EMA and online targets, squared error and pseudo-Huber), the discrete teacher
solver's consistency function as the loss's exact fixed point on Gaussian data, a toy run whose
4-step student closes the teacher's gap, staged (8 -> 4 -> 2 -> 1 segment) training, and the
sharded run (8 fake CPU devices)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import processes as procs
from distill.objectives import lcm
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree

torch = pytest.importorskip("torch")

B = 16
LCM_CONFIG = os.path.join(mu.ROOT, "configs", "toy", "lcm.py")
SEG_CONFIG = os.path.join(mu.ROOT, "configs", "toy", "segmented_cm.py")


def _setup(kind, **keys):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine(kind, teacher, batch=B, label_dropout=0.3,
                                         guidance_range=(1.5, 3.0), **keys)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  ema = {"student": {"eval": mu.perturb(params["student"], 2)}} if state.ema else state.ema
  state = state.replace(params=params, ema=ema)
  return teacher, engine, state, frozen, jax.device_get(engine.global_batch(0))


def _torch_flow_cfg(net, p, x, t, labels, null, w):
  c = net(p, x, 1000.0 * t, labels)
  u = net(p, x, 1000.0 * t, null)
  return u + w[:, None] * (c - u)


def _torch_x0_eps(flow, x, t):
  return mu.rf_x0(flow, x, t), mu.rf_eps(flow, x, t)


def _torch_jump(x0, eps, s):
  return (1 - s)[:, None] * x0 + s[:, None] * eps


def _torch_trajectory(net, p, noise, grid, n, labels, null, w):
  """x at grid index n (per sample) of the CFG teacher's DDIM steps from `noise` at grid[0]."""
  x = noise.clone()
  with torch.no_grad():
    for i in range(len(grid) - 1):
      t, tn = grid[i].expand(len(x)), grid[i + 1].expand(len(x))
      step = _torch_jump(*_torch_x0_eps(_torch_flow_cfg(net, p, x, t, labels, null, w), x, t), tn)
      x = torch.where((i < n)[:, None], step, x)
  return x


@pytest.mark.parametrize("kind,loss,target,states", [
    ("lcm", "l2", "ema", "data"), ("lcm", "huber", "online", "teacher"),
    ("segmented_cm", "l2", "ema", "data"), ("segmented_cm", "huber", "online", "teacher")])
def test_loss_matches_torch(kind, loss, target, states):
  """A PyTorch port (the MLP read from the same weights; rectified flow, x_t = (1 - t) x0 +
  t eps, grid linspace(1, 0, N + 1); LCM's scalings from diffusers' LCMScheduler; MLCM's
  states: the CFG teacher's DDIM trajectory from the noise)."""
  keys = dict(num_ddim_steps=12, loss=loss, target=target, huber_c=0.05, states=states)
  if kind == "segmented_cm":
    keys["num_segments"] = 3
  teacher, engine, state, frozen, batch = _setup(kind, **keys)
  kw = dict(engine.objective.phases[0].loss.keywords)
  kw.pop("guidance_range"), kw.pop("label_dropout")
  draws = lcm.draw_inputs(jax.random.PRNGKey(5), batch["x"], num_steps=12,
                          guidance_range=(1.5, 3.0), label_dropout=0.3)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: lcm.discrete_cm_loss_given(tr, ctx, batch, draws, **kw)
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  p_m = (mu.torch_params(state.ema["student"]["eval"]) if target == "ema"
         else {k: v.detach() for k, v in p_s.items()})
  grid = torch.linspace(1.0, 0.0, 13)
  n = mu.n2t(draws["n"])
  t, tn = grid[n], grid[n + 1]
  x0, eps, w = mu.n2t(batch["x"]), mu.n2t(draws["eps"]), mu.n2t(draws["w"])
  labels = torch.where(mu.n2t(draws["null"]).bool(), torch.full_like(n, 4), mu.n2t(batch["label"]))
  null = torch.full_like(labels, 4)
  assert 0 < int(np.sum(draws["null"])) < B
  if states == "teacher":
    x_t = _torch_trajectory(net, p_t, eps, grid, n, labels, null, w)
  else:
    x_t = (1 - t)[:, None] * x0 + t[:, None] * eps
  with torch.no_grad():
    x_next = _torch_jump(*_torch_x0_eps(_torch_flow_cfg(net, p_t, x_t, t, labels, null, w),
                                        x_t, t), tn)
  if kind == "lcm":
    from diffusers import LCMScheduler
    sch = LCMScheduler()

    def f(p, x, tt):
      c_skip, c_out = sch.get_scalings_for_boundary_condition_discrete(1000.0 * tt)
      return c_skip[:, None] * x + c_out[:, None] * mu.rf_x0(net(p, x, 1000.0 * tt, labels),
                                                             x, tt)
    online = f(p_s, x_t, t)
    with torch.no_grad():
      tgt = f(p_m, x_next, tn)
  else:
    k = 12 // 3
    edge = (n // k + 1) * k
    s = grid[edge]
    at_edge = (n + 1) == edge
    assert 0 < int(at_edge.sum()) < B   # both branches of the target are exercised
    online = _torch_jump(*_torch_x0_eps(net(p_s, x_t, 1000.0 * t, labels), x_t, t), s)
    with torch.no_grad():
      jump = _torch_jump(*_torch_x0_eps(net(p_m, x_next, 1000.0 * tn, labels), x_next, tn), s)
      tgt = torch.where(at_edge[:, None], x_next, jump)
  d = online - tgt
  per = (d ** 2 if loss == "l2" else torch.sqrt(d ** 2 + 0.05 ** 2) - 0.05).mean(dim=1)
  ref = per.mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


# --------------------------------------------------------------------------------------------
# Gaussian data: the teacher solver's consistency function is the loss's fixed point
# --------------------------------------------------------------------------------------------


def _gauss_step(x, t, t_next, mean, var):
  """One DDIM step of the exact teacher for x0 ~ N(mean, var I) under rectified flow."""
  a = (1.0 - t)[:, None]
  k = a * var / (a * a * var + t[:, None] ** 2)
  x0 = mean + k * (x - a * mean)
  eps = jnp.where(t[:, None] > 0, (x - a * x0) / jnp.maximum(t[:, None], 1e-12), 0.0)
  return (1.0 - t_next)[:, None] * x0 + t_next[:, None] * eps


def _gauss_chain(x, idx, edge, grid, mean, var):
  """The teacher's DDIM steps from grid index idx down to grid index edge (per sample)."""
  for i in range(len(grid) - 1):
    active = ((idx <= i) & (i < edge))[:, None]
    step = _gauss_step(x, jnp.full(x.shape[:1], grid[i]), jnp.full(x.shape[:1], grid[i + 1]),
                       mean, var)
    x = jnp.where(active, step, x)
  return x


def _gauss_ctx(kind, n_steps, segments, mean, var, exact: bool):
  """Teacher: the exact posterior mean (x0 kind). Student (x0 kind): with `exact`, the x0 that
  makes the method's consistency function equal the teacher's DDIM chain to the segment edge
  (to t_end for lcm, through LCM's c_skip / c_out); else the teacher itself."""
  grid = np.linspace(1.0, 0.0, n_steps + 1).astype(np.float32)
  k = n_steps // segments

  def teacher_fn(variables, x, timestep, class_labels=None):
    t = timestep / 1000.0
    a = (1.0 - t)[:, None]
    return mean + a * var / (a * a * var + t[:, None] ** 2) * (x - a * mean)

  def student_fn(variables, x, timestep, class_labels=None):
    if not exact:
      return teacher_fn(variables, x, timestep)
    t = timestep / 1000.0
    idx = jnp.round((1.0 - t) * n_steps).astype(jnp.int32)
    edge = (idx // k + 1) * k if kind == "segmented_cm" else jnp.full_like(idx, n_steps)
    chain = _gauss_chain(x, idx, edge, grid, mean, var)
    s = jnp.asarray(grid)[jnp.minimum(edge, n_steps)]
    if kind == "lcm":   # f = c_skip x + c_out x0  =>  x0 = (chain - c_skip x) / c_out
      c_skip, c_out = procs.lcm_boundary_scalings(timestep, 0.5, 10.0)
      return jnp.where(c_out[:, None] > 0, (chain - c_skip[:, None] * x) /
                       jnp.maximum(c_out[:, None], 1e-12), 0.0)
    # DDIM jump of an x0 prediction: chain = (a_s - s_s a / s) x0 + (s_s / s) x
    a, sg = (1.0 - t)[:, None], t[:, None]
    a_s, s_s = (1.0 - s)[:, None], s[:, None]
    return (chain - s_s / sg * x) / (a_s - s_s * a / sg)

  return mu.closed_form_context(teacher_fn, student_fn, ema=True)


@pytest.mark.parametrize("kind,segments", [("lcm", 1), ("segmented_cm", 1),
                                           ("segmented_cm", 4)])
def test_teacher_solver_consistency_function_is_the_fixed_point_on_gaussian_data(kind,
                                                                                  segments):
  """Data N(mean, 0.3^2 I) with the exact teacher. The consistency function of the teacher's
  discrete DDIM solver (its chain of steps down to the segment edge, computed here in closed
  form) makes the loss vanish at every grid index, and the teacher itself (one jump) does not."""
  n_steps, dim = 8, 3
  mean, var = jnp.asarray([0.5, -1.0, 2.0]), 0.09
  b = 4 * n_steps
  draws = {"n": jnp.tile(jnp.arange(n_steps), 4),
           "eps": jax.random.normal(jax.random.PRNGKey(0), (b, dim)),
           "w": jnp.ones((b,)), "null": jnp.zeros((b,), bool)}
  batch = {"x": mean + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (b, dim))}
  kw = dict(student="student", teacher="teacher", kind=kind, num_steps=n_steps,
            num_segments=segments, guidance=False, guidance_embed=False, target="ema",
            loss="l2", huber_c=0.0, states="data")
  if kind == "lcm":
    kw.update(sigma_data=0.5, timestep_scaling=10.0)
  for exact in (True, False):
    ctx = _gauss_ctx(kind, n_steps, segments, mean, var, exact)
    loss = float(lcm.discrete_cm_loss_given({"student": {}}, ctx, batch, draws, **kw)[0])
    if exact:
      assert loss < 1e-10, loss
    else:
      assert loss > 1e-4, loss


def test_segment_edges_and_bad_split():
  np.testing.assert_array_equal(lcm.segment_edges(8, 4), [2, 2, 4, 4, 6, 6, 8, 8])
  np.testing.assert_array_equal(lcm.segment_edges(6, 1), [6] * 6)
  with pytest.raises(ValueError, match="7 grid steps must split into 2 equal segments"):
    lcm.segment_edges(7, 2)


def test_teacher_trajectory_states_follow_the_teacher():
  """MLCM states: x at grid index n equals n DDIM steps of the guided teacher from the noise."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("segmented_cm", teacher, batch=B, num_ddim_steps=6,
                                         num_segments=2)
  _, ctx = mu.phase_context(engine, state, frozen, ("student",))
  grid = jnp.asarray(np.linspace(1, 0, 7), jnp.float32)
  noise = jax.random.normal(jax.random.PRNGKey(0), (B, 2))
  n = jnp.arange(B) % 6
  cond = {"class_labels": jnp.arange(B) % 4}
  w = jnp.full((B,), 2.0)
  got = lcm.teacher_trajectory_state(ctx, "teacher", noise, grid, n, cond, w, True)
  for i in range(B):
    x = noise[i:i + 1]
    c = {"class_labels": cond["class_labels"][i:i + 1]}
    for j in range(int(n[i])):
      x = lcm.teacher_ddim_step(ctx, "teacher", x, grid[j:j + 1], grid[j + 1:j + 2], c,
                                w[:1], True)
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(x[0]), rtol=1e-5, atol=1e-6)


def test_structure_and_stages():
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  c = mu.tiny_config("segmented_cm", batch=B, num_ddim_steps=8, segment_stages=(8, 4, 2, 1),
                     stage_steps=3)
  engine = Engine(c, teacher=teacher)
  assert engine.total_steps == 12 and engine.boundary_steps == [3, 6, 9]
  segs = [o.phases[0].loss.keywords["num_segments"] for o in engine.stage_objectives]
  assert segs == [8, 4, 2, 1]
  # The default EMA target: the evaluated average goes on as teacher and student.
  ema_chain = {"teacher": "student@eval", "student": "student@eval"}
  assert [dict(s.promote) for s in engine.stages] == [{}] + [ema_chain] * 3
  online = Engine(mu.tiny_config("segmented_cm", batch=B, num_ddim_steps=8, target="online",
                                 segment_stages=(4, 2), stage_steps=3), teacher=teacher)
  assert [dict(s.promote) for s in online.stages] == [{}, {"teacher": "student"}]
  assert engine.objective.sampler == "ddim"
  with pytest.raises(ValueError, match="stage_steps"):
    Engine(mu.tiny_config("segmented_cm", segment_stages=(4, 2)), teacher=teacher)
  lcm_engine = Engine(mu.tiny_config("lcm", target="online"), teacher=teacher)
  assert lcm_engine.objective.sampler == "lcm" and not lcm_engine.objective.ema
  with pytest.raises(ValueError, match="target='online'"):
    Engine(mu.tiny_config("lcm", lora_rank=4), teacher=teacher)


def test_lora_student_trains_only_the_adapter_against_the_online_target():
  """LCM-LoRA: the student is a LoRA over the frozen teacher's shared weights; its loss equals
  the full-copy loss of the merged weights (online target), and a step changes only the
  adapter."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("lcm", teacher, batch=B, lora_rank=4, target="online",
                                         num_ddim_steps=8, lora_pattern=r"block_\d+")
  assert engine.nets["student"].base == "teacher"
  lp = mu.perturb(state.params["student"], 3)
  assert any("lora" in k for k in mu.flat_params(lp))
  state = state.replace(params={**state.params, "student": lp})
  batch = jax.device_get(engine.global_batch(0))
  kw = dict(engine.objective.phases[0].loss.keywords)
  kw.pop("guidance_range"), kw.pop("label_dropout")
  draws = lcm.draw_inputs(jax.random.PRNGKey(1), batch["x"], num_steps=8)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  got = float(lcm.discrete_cm_loss_given(trainable, ctx, batch, draws, **kw)[0])
  # The same loss with a full student holding the merged weights.
  full, fstate, ffrozen = mu.make_engine("lcm", teacher, batch=B, target="online",
                                         num_ddim_steps=8)
  merged = ctx_lib.merge_params(engine.nets["student"], lp, frozen)
  ftrain, fctx = mu.phase_context(full, fstate.replace(params={"student": merged}), ffrozen,
                                  ("student",))
  fkw = dict(full.objective.phases[0].loss.keywords)
  fkw.pop("guidance_range"), fkw.pop("label_dropout")
  want = float(lcm.discrete_cm_loss_given(ftrain, fctx, batch, draws, **fkw)[0])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  before, lp_before = jax.device_get(frozen["teacher"]), mu.flat_params(jax.device_get(lp))
  state, frozen, _ = engine.train_step(state, frozen, 0)   # (donates the state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["teacher"]), before)
  changed = [k for k, v in mu.flat_params(jax.device_get(state.params["student"])).items()
             if not np.array_equal(v, lp_before[k])]
  assert changed and all("lora" in k for k in changed)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("config,teacher_steps", [(LCM_CONFIG, 1500), (SEG_CONFIG, 600)])
def test_toy_run_four_step_student_closes_the_gap(config, teacher_steps, tmp_path):
  """LCM's multistep sampler re-noises with fresh noise, so its 4-step samples need a teacher
  whose ODE is learned well (a 600-step spiral teacher gave 56%, a 1500-step one 88%, at 500
  LCM steps); segments are walked deterministically."""
  mu.check_toy_run(config, tmp_path, 600, student_steps=4, min_fraction=0.8,
                   teacher_steps=teacher_steps)


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  teacher = mu.shared_tiny_teacher()
  args = [f"--config.teacher.checkpoint={teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.train.batch_size=64",
          "--config.eval.at_end=false", "--config.checkpoint.every_steps=0",
          "--config.objective.guidance_range=(1.0,2.0)",
          "--config.objective.segment_stages=(4,2)", "--config.objective.stage_steps=5"]
  mu.check_sharded_losses(SEG_CONFIG, tmp_path, args, mu.phase_losses, ["segmented_cm/loss"])


def test_ema_target_stages_promote_the_evaluated_average():
  """Hyper-SD / PCM stages with the EMA target: the student that was evaluated at the end of a
  stage is the EMA, so the next stage's teacher is that average, not the online weights, and
  the next stage's student (and its reset EMA) starts from it too. A promotion naming an EMA
  role the network does not keep is refused in one line."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("segmented_cm", teacher, batch=B, target="ema",
                                         target_decay=0.5, num_ddim_steps=8,
                                         segment_stages=(4, 2), stage_steps=2)
  for step in range(2):
    state, frozen, _ = engine.train_step(state, frozen, step)
  online, average = jax.device_get((state.params["student"], state.ema["student"]["eval"]))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(online),
                                                      jax.tree_util.tree_leaves(average)))
  state, frozen = engine.enter_stage(state, frozen, 1)
  for got in (frozen["teacher"], state.params["student"], state.ema["student"]["eval"]):
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(got), average)
  engine.stages = (engine.stages[0],
                   dataclasses.replace(engine.stages[1], promote={"teacher": "student@slow"}))
  with pytest.raises(ValueError, match="network 'student' has no EMA role 'slow' \\(it has eval"):
    engine._check_promotions()  # pylint: disable=protected-access


def test_lora_stages_promote_the_merged_student_and_keep_the_original_base():
  """Hyper-SD with a LoRA: each stage's teacher is the previous stage's merged student (base +
  adapter), while the adapter keeps the original weights as its own frozen base; promoting a
  LoRA network into its own base is refused."""
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("segmented_cm", teacher, batch=B, lora_rank=4,
                                         target="online", num_ddim_steps=8,
                                         lora_pattern=r"block_\d+", segment_stages=(4, 2),
                                         stage_steps=1)
  assert engine.nets["student"].base == "base" and set(frozen) == {"teacher", "base"}
  original = jax.device_get(frozen["base"])
  state, frozen, _ = engine.train_step(state, frozen, 0)
  lora_after = jax.device_get(state.params["student"])
  state, frozen = engine.enter_stage(state, frozen, 1)
  want = ctx_lib.merge_params(engine.nets["student"], lora_after, {"base": original})
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["teacher"]),
                         jax.device_get(want))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(frozen["base"]), original)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(jax.device_get(frozen["teacher"])),
      jax.tree_util.tree_leaves(original)))
  engine.nets["student"] = dataclasses.replace(engine.nets["student"], base="teacher")
  with pytest.raises(ValueError, match="is the base of the LoRA network 'student'"):
    engine._check_promotions()  # pylint: disable=protected-access


@pytest.mark.slow
@pytest.mark.parametrize("student,kill_steps", [
    pytest.param(["--config.objective.lora_rank=4", "--config.objective.target=online",
                  "--config.checkpoint.every_steps=0"], (3, 6), id="lora_online"),
    # Killed inside stages (checkpoints every 4 steps besides the boundaries 3 and 6): the
    # resume re-reads each teacher from its boundary checkpoint's EMA.
    pytest.param(["--config.objective.target=ema", "--config.objective.target_decay=0.5",
                  "--config.checkpoint.every_steps=4"], (4, 8), id="full_ema")])
def test_stages_killed_resume_exactly(tmp_path, student, kill_steps):
  """Hyper-SD's chaining (one LoRA over the original base, or a full student under the EMA
  target; each stage's evaluated student the next teacher) survives a SIGKILL right after a
  stage-boundary checkpoint or inside a stage: the resumed run re-reads the promoted teacher
  (base + the boundary's adapter, or the boundary's EMA) and logs exactly the losses of an
  uninterrupted run through every stage; its evaluated teacher rows are the original's."""
  teacher = mu.shared_tiny_teacher()
  args = [f"--config.teacher.checkpoint={teacher}", "--config.train.batch_size=32",
          "--config.eval.num_samples=128", "--config.eval.teacher_steps=8",
          "--config.sample.num=0", "--config.checkpoint.async_save=false",
          "--config.train.log_every=1", "--config.objective.num_ddim_steps=8", *student,
          "--config.objective.segment_stages=(4,2,1)", "--config.objective.stage_steps=3",
          "--config.eval.steps=(1,)"]
  mu.check_killed_stages_resume_exactly(SEG_CONFIG, tmp_path, args, kill_steps,
                                        "segmented_cm/loss",
                                        [0] * 3 + [1] * 3 + [2] * 3)
  import json
  swd = {n: {k: r["swd"] for k, r in json.load(open(tmp_path / n / "eval.json"))["results"].items()}
         for n in ("ref", "killed")}
  assert swd["killed"] == swd["ref"]
