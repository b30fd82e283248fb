"""`progressive`: a PyTorch reference of the loss (value and gradient w.r.t. every student
weight, CFG teacher), the closed form on Gaussian data (the target is the x0 whose one student
DDIM step lands on the exact teacher's two steps; max(1, SNR) weighting), the stage schedule
(16 -> 8 -> 4 with promotion), a toy run whose 4-step student closes the teacher's gap, a kill
between and inside stages resumed exactly, and the sharded run (8 fake CPU devices)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.objectives import progressive
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree
from tests.test_lcm import _gauss_step, _torch_flow_cfg, _torch_jump, _torch_x0_eps

torch = pytest.importorskip("torch")

B = 16
CONFIG = os.path.join(mu.ROOT, "configs", "toy", "progressive.py")


@pytest.mark.parametrize("weighting", ["snr_trunc", "snr_plus_one"])
def test_loss_matches_torch(weighting):
  teacher = mu.make_teacher(num_classes=4, seed=0)
  engine, state, frozen = mu.make_engine("progressive", teacher, batch=B, student_steps=4,
                                         num_stages=2, stage_steps=5, guidance=2.0,
                                         label_dropout=0.3, weighting=weighting)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 1)
  state = state.replace(params=params)
  batch = jax.device_get(engine.global_batch(0))
  kw = dict(engine.objective.phases[0].loss.keywords)
  kw.pop("label_dropout")
  draws = progressive.draw_inputs(jax.random.PRNGKey(5), batch["x"], num_steps=4,
                                  label_dropout=0.3)
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  fn = lambda tr: progressive.progressive_loss_given(tr, ctx, batch, draws, **kw)
  (value, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  grid = torch.linspace(1.0, 0.0, 9)   # the teacher's 8-step grid
  n = mu.n2t(draws["n"])
  t, tm, te = grid[2 * n], grid[2 * n + 1], grid[2 * n + 2]
  x0, eps = mu.n2t(batch["x"]), mu.n2t(draws["eps"])
  labels = torch.where(mu.n2t(draws["null"]).bool(), torch.full_like(n, 4), mu.n2t(batch["label"]))
  null, w = torch.full_like(labels, 4), torch.full((B,), 2.0)
  z = (1 - t)[:, None] * x0 + t[:, None] * eps
  with torch.no_grad():
    zm = _torch_jump(*_torch_x0_eps(_torch_flow_cfg(net, p_t, z, t, labels, null, w), z, t), tm)
    ze = _torch_jump(*_torch_x0_eps(_torch_flow_cfg(net, p_t, zm, tm, labels, null, w), zm, tm),
                     te)
    ratio = (te / t)[:, None]
    target = (ze - ratio * z) / ((1 - te)[:, None] - ratio * (1 - t)[:, None])
  x_hat = mu.rf_x0(net(p_s, z, 1000.0 * t, labels), z, t)
  snr = (1 - t) ** 2 / t ** 2
  weight = torch.clamp(snr, min=1.0) if weighting == "snr_trunc" else snr + 1
  ref = (weight * ((x_hat - target) ** 2).mean(dim=1)).mean()
  ref.backward()
  np.testing.assert_allclose(float(value), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k: mu.t2n(v.grad) for k, v in p_s.items()},
                    what="d/dstudent")


def test_gaussian_closed_form():
  """Data N(mean, var I), the exact teacher. The exact teacher's two DDIM steps are an affine
  map of z_t (closed form); the target is the x0 with which one student DDIM step lands there.
  A student predicting that x0 has loss 0, and one off by delta has loss
  mean(max(1, SNR(t)) delta^2)."""
  n_steps, dim, b = 4, 3, 32
  mean, var = jnp.asarray([0.5, -1.0, 2.0]), 0.09
  grid = np.linspace(1.0, 0.0, 2 * n_steps + 1).astype(np.float32)

  def teacher_fn(variables, x, timestep, class_labels=None):
    t = timestep / 1000.0
    a = (1.0 - t)[:, None]
    return mean + a * var / (a * a * var + t[:, None] ** 2) * (x - a * mean)

  def student_fn(variables, z, timestep, class_labels=None):
    t = timestep / 1000.0
    i = jnp.round((1.0 - t) * 2 * n_steps).astype(jnp.int32)
    tm, te = jnp.asarray(grid)[i + 1], jnp.asarray(grid)[i + 2]
    ze = _gauss_step(_gauss_step(z, t, tm, mean, var), tm, te, mean, var)
    # one DDIM step with x0 = x: (1 - te) x + te (z - (1 - t) x) / t = ze
    a, s, ae, se = (1 - t)[:, None], t[:, None], (1 - te)[:, None], te[:, None]
    return (ze - se / s * z) / (ae - se * a / s) + variables["params"]["delta"]

  ctx = mu.closed_form_context(teacher_fn, student_fn)
  draws = {"n": jnp.arange(b) % n_steps,
           "eps": jax.random.normal(jax.random.PRNGKey(0), (b, dim)),
           "null": jnp.zeros((b,), bool)}
  batch = {"x": mean + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (b, dim))}
  kw = dict(student="student", teacher="teacher", num_steps=n_steps, weighting="snr_trunc",
            guidance=1.0)
  loss_of = lambda delta: float(progressive.progressive_loss_given(
      {"student": {"delta": jnp.float32(delta)}}, ctx, batch, draws, **kw)[0])
  assert loss_of(0.0) < 1e-10
  delta = 0.1
  loss = loss_of(delta)
  t = grid[2 * (np.arange(b) % n_steps)]
  want = np.mean(np.maximum(1.0, (1 - t) ** 2 / t ** 2) * delta ** 2)
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_stages_halve_the_steps_and_promote():
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  engine = Engine(mu.tiny_config("progressive", student_steps=16, num_stages=3,
                                 stage_steps=4), teacher=teacher)
  assert engine.total_steps == 12 and engine.boundary_steps == [4, 8]
  assert [o.phases[0].loss.keywords["num_steps"] for o in engine.stage_objectives] == [16, 8, 4]
  assert [dict(s.promote) for s in engine.stages] == [{}, {"teacher": "student"},
                                                      {"teacher": "student"}]
  assert [s.reset_opt for s in engine.stages] == [False, True, True]
  assert engine.promoted("teacher", 1) and not engine.promoted("teacher", 0)
  with pytest.raises(ValueError, match="cannot be halved 3 times"):
    Engine(mu.tiny_config("progressive", student_steps=4, num_stages=4), teacher=teacher)


def test_default_sample_steps_are_the_current_stages_student_steps():
  """launch.sample's default --steps is what the student is trained for at the run's stage
  (it was eval.steps[0] = 1: a 4-step progressive student sampled in one step by default)."""
  from distill import trainer
  from distill.engine import Engine
  teacher = mu.make_teacher(num_classes=4)
  cases = [("progressive", dict(student_steps=16, num_stages=3, stage_steps=4), [16, 8, 4]),
           ("segmented_cm", dict(num_ddim_steps=8, segment_stages=(8, 4, 2, 1), stage_steps=2),
            [8, 4, 2, 1]),
           ("segmented_cm", dict(num_ddim_steps=8, num_segments=4), [4]),
           # guided: the guidance stage's student has no fixed count (eval.steps[0]).
           ("guided", dict(student_steps=8, num_stages=2, stage_steps=2, guidance_steps=2),
            [1, 8, 4]),
           ("lcm", {}, [1])]
  for name, keys, want in cases:
    config = mu.tiny_config(name, **keys)
    engine = Engine(config, teacher=teacher)
    state, _ = engine.init_state()
    got = [trainer.student_steps(engine, state.replace(stage=jnp.int32(s)))
           for s in range(len(want))]
    assert got == want, (name, keys, got)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------

SMALL = ["--config.train.batch_size=64", "--config.eval.num_samples=256",
         "--config.eval.teacher_steps=8", "--config.sample.num=64",
         "--config.checkpoint.async_save=false", "--config.objective.student_steps=8"]


@pytest.mark.slow
def test_toy_run_four_step_student_closes_the_gap(tmp_path):
  mu.check_toy_run(CONFIG, tmp_path, 600, "--config.objective.student_steps=16",
                   "--config.objective.num_stages=3", "--config.objective.stage_steps=200",
                   student_steps=4, min_fraction=0.8)


@pytest.mark.slow
def test_kill_between_and_inside_stages_resumes_exactly(tmp_path):
  """Three stages of 6 steps (8 -> 4 -> 2), checkpoints every 4 steps plus the boundaries 6
  and 12. One run is killed after the boundary checkpoint of step 6 (between stages), resumed,
  killed again after step 16 (inside stage 2, past a promotion), resumed: it logs exactly the
  losses of an uninterrupted run, and its eval teacher rows are the original teacher's."""
  teacher = mu.shared_tiny_teacher()
  args = [*SMALL, f"--config.teacher.checkpoint={teacher}", "--config.objective.num_stages=3",
          "--config.objective.stage_steps=6", "--config.train.log_every=1",
          "--config.checkpoint.every_steps=4"]
  mu.check_killed_stages_resume_exactly(CONFIG, tmp_path, args, (6, 16), "progressive/loss",
                                        [0] * 6 + [1] * 6 + [2] * 6)
  w = tmp_path / "killed"
  # Teacher rows after two promotions are the checkpoint's: equal to a run without stages.
  one = tmp_path / "one_stage"
  mu.run_train(CONFIG, one, *args, "--config.objective.num_stages=1",
               "--config.objective.stage_steps=1")
  import json
  swd = {}
  for name in ("ref", "one_stage", "killed"):
    with open(tmp_path / name / "eval.json") as f:
      swd[name] = {k: r["swd"] for k, r in json.load(f)["results"].items()}
  for k in ("teacher_steps_1", "teacher_steps_8"):
    assert swd["ref"][k] == swd["one_stage"][k]
  assert swd["killed"] == swd["ref"]
  # Without the boundary checkpoint a promoted teacher is re-read from, a resume is one line
  # (it printed a FileNotFoundError traceback) and writes nothing.
  import shutil
  import subprocess
  shutil.rmtree(w / "checkpoints" / "12")
  before = (w / "config.json").read_bytes()
  p = subprocess.run(mu.train_cmd(CONFIG, w, *args, "--config.train.steps=24"), cwd=mu.ROOT,
                     capture_output=True, text=True, timeout=600, env=mu.env())
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
  assert "the checkpoint of stage 2's first step 12" in lines[0] and "missing" in lines[0]
  assert (w / "config.json").read_bytes() == before


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  teacher = mu.shared_tiny_teacher()
  args = [f"--config.teacher.checkpoint={teacher}", "--config.train.log_every=5",
          "--config.train.batch_size=64", "--config.eval.at_end=false",
          "--config.checkpoint.every_steps=0", "--config.objective.student_steps=4",
          "--config.objective.num_stages=2", "--config.objective.stage_steps=5",
          "--config.objective.guidance=2.0"]
  mu.check_sharded_losses(CONFIG, tmp_path, args, mu.phase_losses, ["progressive/loss"])


@pytest.mark.slow
def test_launch_sample_defaults_to_the_students_steps_finished_and_mid_stage(tmp_path):
  """A finished 8 -> 4 -> 2 run samples 2 steps by default, one stopped in its second stage 4,
  each equal to --steps given explicitly."""
  import shutil
  import subprocess
  import sys
  teacher = mu.shared_tiny_teacher()
  w = tmp_path / "pd"
  mu.run_train(CONFIG, w, *SMALL, f"--config.teacher.checkpoint={teacher}",
               "--config.objective.num_stages=3", "--config.objective.stage_steps=3",
               "--config.checkpoint.every_steps=4", "--config.checkpoint.keep=10",
               "--config.eval.at_end=false")

  def sample(*args):
    p = subprocess.run([sys.executable, "-m", "launch.sample", "--workdir", str(w), "--num",
                        "16", *args], cwd=mu.ROOT, capture_output=True, text=True, timeout=600,
                       env=mu.env())
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout

  for steps in (2, 4):   # the finished run (stage 2: 2 steps), then stopped at step 4 (stage 1)
    assert (w / "checkpoints" / "4").is_dir()
    out = sample("--out", str(tmp_path / f"default{steps}.png"))
    assert "wrote" in out
    sample("--steps", str(steps), "--out", str(tmp_path / f"explicit{steps}.png"))
    np.testing.assert_array_equal(np.load(tmp_path / f"default{steps}.npy"),
                                  np.load(tmp_path / f"explicit{steps}.npy"))
    for step in (9, 8, 6):
      shutil.rmtree(w / "checkpoints" / str(step), ignore_errors=True)


@pytest.mark.slow
def test_resume_refuses_other_lengths_of_the_stages_it_passed(tmp_path):
  """A run stopped in its second stage (8 -> 4 -> 2, stages of 3 steps, stopped at step 4) and
  resumed with stages of 2 steps under allow_config_change stops in one line and writes
  nothing: it went on in stage 2 from a state of stage 1, its teacher re-read from the step-2
  checkpoint (a half-trained first-stage student), and never promoted the second stage's
  student. Adding a stage to the finished run is a later boundary: it goes on and promotes."""
  import shutil
  import subprocess
  teacher = mu.shared_tiny_teacher()
  w = tmp_path / "pd"
  args = [*SMALL, f"--config.teacher.checkpoint={teacher}", "--config.objective.num_stages=3",
          "--config.objective.stage_steps=3", "--config.checkpoint.every_steps=1",
          "--config.checkpoint.keep=100", "--config.eval.at_end=false",
          "--config.train.allow_config_change=true"]
  mu.run_train(CONFIG, w, *args)
  finished = tmp_path / "finished"
  shutil.copytree(w, finished)
  for step in range(5, 10):
    shutil.rmtree(w / "checkpoints" / str(step))
  before = (w / "config.json").read_bytes()
  p = subprocess.run(mu.train_cmd(CONFIG, w, *args, "--config.objective.stage_steps=2"),
                     cwd=mu.ROOT, capture_output=True, text=True, timeout=600, env=mu.env())
  lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
  assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
  assert "stage boundaries at steps [3], this config puts them at [2]" in lines[0]
  assert (w / "config.json").read_bytes() == before
  assert sorted(int(s) for s in os.listdir(w / "checkpoints")) == [1, 2, 3, 4]
  # A fourth stage (2 -> 1 steps) after the finished three: resumed, entered and promoted.
  p = mu.run_train(CONFIG, finished, *args, "--config.objective.num_stages=4")
  assert "resumed from step 9" in p.stdout and "stage 3 begins at step 9" in p.stdout
  last = mu.metrics(finished)[-1]
  assert (last["step"], last["stage"]) == (12, 3)
