"""Checkpoint robustness: restoring onto a different mesh, falling back past a corrupted latest
checkpoint, ignoring an unfinished (crashed mid-save) one, and keeping stage boundaries."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.test_train_e2e import ROOT, SMALL, TEACHER, env, metrics, run, train_cmd

BASE = ["--config.train.log_every=5", "--config.eval.at_end=false",
        "--config.checkpoint.async_save=false", "--config.checkpoint.every_steps=10"]


def _steps(w):
  return sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit())


@pytest.mark.slow
def test_restore_onto_a_different_mesh(tmp_path):
  w = tmp_path / "run"
  run(w, *BASE, "--config.train.steps=20", "--config.mesh.data=4", "--config.mesh.fsdp=2",
      devices=8)
  # Same run directory, half the devices: Orbax reshards the 8-device state onto 4.
  second = run(w, *BASE, "--config.train.steps=30", "--config.mesh.data=2",
               "--config.mesh.fsdp=2", devices=4)
  assert "resumed from step 20" in second.stdout + second.stderr
  rows = metrics(w)
  assert [r["step"] for r in rows] == list(range(5, 31, 5))
  assert json.load(open(w / "config.json"))["resolved"]["mesh"] == {"data": 2, "fsdp": 2,
                                                                   "tensor": 1}
  # Read (sample, evaluate, export) on this one-device process: the recorded 2 x 2 mesh does
  # not fit, so the run is read on the devices there are.
  import jax
  from distill import trainer
  engine, _, _, step = trainer.open_run(str(w))
  assert step == 30 and engine.mesh.size == jax.device_count() == 1
  # A mesh smaller than the devices trains on a subset, and says so.
  third = run(tmp_path / "part", *BASE, "--config.train.steps=5", "--config.mesh.data=2",
              devices=4)
  assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1} uses 2 of the 4 devices" in third.stderr


def _corrupt(step_dir):
  """Truncates every data file of a saved step (what a torn write or a bad disk leaves)."""
  n = 0
  for root, _, files in os.walk(step_dir / "state"):
    for f in files:
      path = os.path.join(root, f)
      if os.path.getsize(path) > 0:
        with open(path, "r+b") as fh:
          fh.truncate(max(0, os.path.getsize(path) // 3))
        n += 1
  assert n > 0


@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back_to_previous(tmp_path):
  w = tmp_path / "run"
  run(w, *BASE, "--config.train.steps=20")
  assert _steps(w) == [10, 20]
  # Its array data lost (truncated files are the other test's corruption).
  shutil.rmtree(w / "checkpoints" / "20" / "state" / "d")
  # The same command again: it redoes step 20 and saves it (the unreadable step is moved aside,
  # where left in place it blocked its own save and was skipped at every later resume), with
  # one warning line (not Orbax's ~900 lines of closed-event-loop echoes).
  second = run(w, *BASE, "--config.train.steps=20")
  out = second.stdout + second.stderr
  assert "could not be restored" in out and "resumed from step 10" in out
  assert "Event loop is closed" not in out and "never retrieved" not in out, out[-3000:]
  assert (w / "unreadable_checkpoints" / "20").is_dir() and _steps(w) == [10, 20]
  third = run(w, *BASE, "--config.train.steps=30")
  out = third.stdout + third.stderr
  assert "resumed from step 20" in out and "could not be restored" not in out
  assert [r["step"] for r in metrics(w)] == list(range(5, 31, 5))


@pytest.mark.slow
def test_unfinished_save_is_ignored(tmp_path):
  w = tmp_path / "run"
  run(w, *BASE, "--config.train.steps=20")
  # A crash mid-save leaves Orbax's temporary directory; it is never taken for a checkpoint.
  shutil.copytree(w / "checkpoints" / "20", w / "checkpoints" / "30.orbax-checkpoint-tmp-1")
  second = run(w, *BASE, "--config.train.steps=30")
  assert "resumed from step 20" in second.stdout + second.stderr
  assert 30 in _steps(w)


def test_a_killed_runs_temporaries_are_gone_once_the_checkpointer_opens(tmp_path, monkeypatch):
  # Orbax removes them in a background thread; a command that stops before its first save (a
  # refused resume) must not exit while that thread still runs (CI saw it print a page of
  # "cannot schedule new futures after shutdown" after the one-line error). A slow cleanup makes
  # the race certain: the Checkpointer must wait for it.
  import asyncio
  from orbax.checkpoint._src.path import temporary_paths
  from distill import checkpoint as ckpt
  original = temporary_paths.cleanup_temporary_paths

  async def slow_cleanup(*args, **kwargs):
    await asyncio.sleep(0.5)
    return await original(*args, **kwargs)

  monkeypatch.setattr(temporary_paths, "cleanup_temporary_paths", slow_cleanup)
  tmp = tmp_path / "ck" / "30.orbax-checkpoint-tmp-1"
  tmp.mkdir(parents=True)
  c = ckpt.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=3, async_save=False)
  assert not tmp.exists()
  assert c.all_steps() == []
  c.close()


def test_closed_event_loop_echoes_are_dropped_and_nothing_else():
  """What a failed restore's reads print when they finish on Orbax's closed event loop, on
  each channel they can reach (unraisable, a thread's exception, a logged callback error),
  is dropped once checkpoints are opened; other errors on those channels still print."""
  script = textwrap.dedent("""
      import logging, threading
      from distill import checkpoint as ckpt
      ckpt._quiet_closed_loop_echoes()
      logging.basicConfig()

      class Echo:
        def __init__(self, error):
          self.error = error
        def __del__(self):
          raise self.error

      for error in (RuntimeError("Event loop is closed"), ValueError("other unraisable")):
        Echo(error)
      for error in (RuntimeError("Event loop is closed"), ValueError("other in thread")):
        def fail(e=error):
          raise e
        t = threading.Thread(target=fail)
        t.start()
        t.join()
      for error in (RuntimeError("Event loop is closed"), ValueError("other logged")):
        try:
          raise error
        except Exception:
          logging.getLogger("concurrent.futures").exception("exception calling callback")
  """)
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "Event loop is closed" not in p.stderr, p.stderr
  for kept in ("other unraisable", "other in thread", "other logged"):
    assert kept in p.stderr, p.stderr


def test_a_read_only_checkpointer_leaves_an_in_flight_save_alone(tmp_path):
  """How a run is read (sample, evaluate, export) while it may be training elsewhere: the
  training's temporary save directory survives, the newest finished step restores, and
  nothing is created in a directory without checkpoints."""
  import numpy as np
  from distill import checkpoint as ckpt
  state = {"w": np.arange(3, dtype=np.float32)}
  writer = ckpt.Checkpointer(str(tmp_path / "ck"), async_save=False)
  writer.save(1, state, {"step": 1})
  writer.close()
  in_flight = tmp_path / "ck" / "2.orbax-checkpoint-tmp-1"
  in_flight.mkdir()
  reader = ckpt.Checkpointer(str(tmp_path / "ck"), read_only=True)
  step, restored, meta = reader.restore_latest(
      {"w": __import__("jax").ShapeDtypeStruct((3,), np.float32)})
  reader.close()
  assert step == 1 and meta == {"step": 1} and in_flight.is_dir()
  np.testing.assert_array_equal(restored["w"], state["w"])
  empty = ckpt.Checkpointer(str(tmp_path / "none"), read_only=True)
  assert empty.all_steps() == [] and not (tmp_path / "none").exists()
  empty.close()


def test_partial_restore_reads_only_the_selected_subtrees(tmp_path):
  """`restore_raw(select=...)` (how a teacher or an `init.<network>` is taken out of a run) returns
  exactly the selected subtrees, equal to the full restore, from the newest readable step; a
  selection the checkpoint lacks gives an empty state instead of an error."""
  import numpy as np
  from distill import checkpoint as ckpt
  rng = np.random.default_rng(0)
  arr = lambda *s: rng.standard_normal(s).astype(np.float32)
  state = {"params": {"student": {"w": arr(3, 4)}, "fake": {"w": arr(5)}},
           "opt_state": {"student": {"mu": arr(3, 4), "nu": arr(3, 4)}},
           "ema": {"student": {"eval": {"w": arr(3, 4)}}},
           "model_state": {"student": {"stats": arr(2)}}, "step": np.int32(7)}
  c = ckpt.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=3, async_save=False)
  for step in (1, 2):
    c.save(step, {**state, "step": np.int32(step)}, {"step": step})
  c.close()
  wanted = lambda s: [("ema", "student", "eval"), ("model_state", "student"),
                      ("params", "missing")]
  step, tree = ckpt.restore_raw(str(tmp_path / "ck"), select=wanted)
  assert step == 2 and tree["meta"] == {"step": 2}
  got = tree["state"]
  assert set(got) == {"ema", "model_state"} and set(got["ema"]) == {"student"}
  np.testing.assert_array_equal(got["ema"]["student"]["eval"]["w"],
                                state["ema"]["student"]["eval"]["w"])
  np.testing.assert_array_equal(got["model_state"]["student"]["stats"],
                                state["model_state"]["student"]["stats"])
  full = ckpt.restore_raw(str(tmp_path / "ck"))[1]["state"]
  assert set(full) == set(state) and "mu" in full["opt_state"]["student"]
  # An Orbax without partial restore reads everything and returns the same selection.
  import unittest.mock
  with unittest.mock.patch.object(ckpt, "_HAS_PARTIAL_RESTORE", False):
    old = ckpt.restore_raw(str(tmp_path / "ck"), select=wanted)[1]["state"]
  assert set(old) == {"ema", "model_state"}
  np.testing.assert_array_equal(old["ema"]["student"]["eval"]["w"],
                                got["ema"]["student"]["eval"]["w"])
  # A mistake in `select` is the caller's: it propagates instead of skipping every step.
  with pytest.raises(KeyError, match="oops"):
    ckpt.restore_raw(str(tmp_path / "ck"), select=lambda s: {}["oops"])
  step, tree = ckpt.restore_raw(str(tmp_path / "ck"), select=lambda s: [("ema", "fake")])
  assert step == 2 and tree["state"] == {} and tree["meta"] == {"step": 2}
  _corrupt(tmp_path / "ck" / "2")
  step, tree = ckpt.restore_raw(str(tmp_path / "ck"), select=wanted)
  assert step == 1 and "student" in tree["state"]["ema"]


def _cli(workdir, *extra, config=TEACHER):
  cmd = [sys.executable, "-m", "launch.train", "--config", config, "--workdir", str(workdir),
         *SMALL, *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env())


def _snapshot(w):
  return {name: open(w / name, "rb").read() for name in ("config.json", "metrics.jsonl")}, \
      _steps(w)


@pytest.mark.slow
@pytest.mark.parametrize("override,key,values", [
    # a key the first run left to the model's default: compared with that default
    ("--config.model.time_scale=0.001", "model.time_scale", [1.0, 0.001]),
    ("--config.optim.lr=0.01", "optim.lr", [0.001, 0.01]),
])
def test_resume_with_another_config_is_refused_and_changes_nothing(tmp_path, override, key,
                                                                    values):
  w = tmp_path / "run"
  run(w, *BASE, "--config.train.steps=20")
  before = _snapshot(w)
  proc = _cli(w, *BASE, "--config.train.steps=20", override)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  shown = f"{key} is {values[0]!r} there, {values[1]!r} here"
  assert len(lines) == 1 and shown in lines[0] and str(w) in lines[0], proc.stderr
  assert _snapshot(w) == before
  # What a resume may change (length, logging, evaluation, checkpointing) still resumes.
  again = _cli(w, *BASE, "--config.train.steps=30", "--config.train.log_every=10",
               "--config.eval.num_samples=128", "--config.checkpoint.keep=5")
  assert again.returncode == 0, again.stderr[-2000:]
  assert "resumed from step 20" in again.stdout + again.stderr
  assert _steps(w) == [10, 20, 30]
  # Asked for, the change goes on and config.json records it; a later resume keeps the record.
  changed = _cli(w, *BASE, "--config.train.steps=40", override,
                 "--config.train.allow_config_change=true")
  assert changed.returncode == 0, changed.stderr[-2000:]
  record = [{"step": 30, "changes": {key: values}}]
  assert json.load(open(w / "config.json"))["provenance"]["config_changes"] == record
  later = _cli(w, *BASE, "--config.train.steps=50", override)
  assert later.returncode == 0, later.stderr[-2000:]
  assert json.load(open(w / "config.json"))["provenance"]["config_changes"] == record
  # A change the checkpoints cannot take (another width) stops even then, in one line.
  before = _snapshot(w)
  wider = _cli(w, *BASE, "--config.train.steps=50", override, "--config.model.hidden=32",
               "--config.train.allow_config_change=true")
  assert wider.returncode == 2, wider.stderr[-2000:]
  lines = wider.stderr.strip().splitlines()
  assert len(lines) == 1 and "none of its checkpoints" in lines[0], wider.stderr[-2000:]
  assert "in the checkpoint, (32,) in this config" in lines[0]
  assert _snapshot(w) == before


@pytest.mark.slow
def test_resume_refuses_a_frozen_teacher_whose_weights_changed(tmp_path):
  teacher, student = tmp_path / "teacher", tmp_path / "cd"
  run(teacher, *BASE, "--config.train.steps=10")
  distil = [*BASE, "--config.train.steps=10", f"--config.teacher.checkpoint={teacher}"]
  cd = os.path.join(ROOT, "configs", "toy", "cd.py")
  assert _cli(student, *distil, config=cd).returncode == 0
  # The same teacher moved elsewhere hashes the same: the run goes on.
  moved = tmp_path / "moved"
  shutil.copytree(teacher, moved)
  longer = [*BASE, "--config.train.steps=20", f"--config.teacher.checkpoint={moved}"]
  proc = _cli(student, *longer, config=cd)
  assert proc.returncode == 0 and "resumed from step 10" in proc.stdout + proc.stderr, \
      proc.stderr[-2000:]
  # The teacher trained on: its latest weights differ from those the run started with.
  run(moved, *BASE, "--config.train.steps=20")
  before = _snapshot(student)
  proc = _cli(student, *BASE, "--config.train.steps=30", f"--config.teacher.checkpoint={moved}",
              config=cd)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "teacher's weights changed" in lines[0], proc.stderr
  assert "teacher.checkpoint" in lines[0]
  assert _snapshot(student) == before
  # Reading the run (sample, evaluate, export) takes the teacher from the recorded absolute path
  # (where the run last resumed: `moved`, since retrained) and refuses other weights; the
  # teacher it was trained with, given explicitly, reads it.
  from distill import trainer
  with pytest.raises(ValueError, match=f"{moved} is not the teacher the run {student} was "
                                       "trained with"):
    trainer.open_run(str(student))
  assert trainer.open_run(str(student), [f"teacher.checkpoint={teacher}"])[3] == 20
  # config.json keeps teacher.checkpoint as typed, e.g. relative to where the run was trained:
  # the recorded absolute path is what is read.
  cfg = json.loads((student / "config.json").read_text())
  cfg["teacher"]["checkpoint"] = "runs/elsewhere"
  for ref in cfg["resolved"]["frozen"].values():
    ref["path"] = str(teacher)
  (student / "config.json").write_text(json.dumps(cfg))
  assert trainer.open_run(str(student))[3] == 20


def test_layout_mismatch_is_read_from_metadata(tmp_path):
  """Another config's state (a shape, a network more or less) is told apart from a fitting one
  without reading array data, and such a step is skipped by restore_latest (None: no step fits)
  with the difference kept for the error line."""
  import jax
  import numpy as np
  from distill import checkpoint as ckpt
  state = {"params": {"student": {"w": np.zeros((3, 4), np.float32)}},
           "opt_state": ({"mu": np.zeros((3, 4), np.float32)}, ()), "step": np.int32(1)}
  c = ckpt.Checkpointer(str(tmp_path / "ck"), every_steps=1, keep=3, async_save=False)
  c.save(1, state, {"step": 1})
  c.close()
  spec = lambda tree: jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                             tree)
  d = str(tmp_path / "ck")
  assert ckpt.layout_mismatch(d, 1, spec(state)) == ""
  wider = {**state, "params": {"student": {"w": np.zeros((3, 8), np.float32)}}}
  assert ckpt.layout_mismatch(d, 1, spec(wider)) == (
      "params.student.w: shape (3, 4) in the checkpoint, (3, 8) in this config")
  more = {**state, "params": {**state["params"], "fake": {"w": np.zeros(2, np.float32)}}}
  assert ckpt.layout_mismatch(d, 1, spec(more)) == "params.fake.w: not in the checkpoint"
  less = {**state, "opt_state": ((), ())}
  assert ckpt.layout_mismatch(d, 1, spec(less)) == (
      "opt_state.0.mu: in the checkpoint, not in this config")
  c = ckpt.Checkpointer(d, every_steps=1, keep=3, async_save=False)
  assert c.restore_latest(spec(wider)) is None
  assert c.last_restore_error.startswith("step 1: params.student.w: shape (3, 4)")
  assert c.restore_latest(spec(state))[0] == 1
  c.close()


def test_changed_keys_compares_defaults_and_skips_what_a_resume_may_change():
  from distill import resume
  stored = {"model": {"hidden": 64}, "optim": {"lr": 1e-3}, "train": {"steps": 10},
            "eval": {"steps": [1, 2]}, "provenance": {"git_commit": "x"}, "resolved": {}}
  defaults = {"model": {"hidden": 128, "time_scale": 1.0, "blocks": None},
              "optim": {"lr": 1e-4, "b2": 0.999}, "key_of_a_newer_version": 3}
  same = {"model": {"hidden": 64}, "optim": {"lr": 1e-3}, "train": {"steps": 50},
          "eval": {"steps": (1, 2, 4)}, "key_of_a_newer_version": 3}
  assert resume.changed_keys(stored, same, defaults) == []
  # A key the stored run left out stands for its default; one declared without one is skipped.
  assert resume.changed_keys(stored, {**same, "model": {"hidden": 64, "time_scale": 1.0}},
                             defaults) == []
  assert resume.changed_keys(stored, {**same, "model": {"hidden": 64, "time_scale": 0.5}},
                             defaults) == [("model.time_scale", 1.0, 0.5)]
  assert resume.changed_keys(stored, {**same, "model": {"hidden": 64, "blocks": 3}},
                             defaults) == []
  # ... and one the new config leaves out stands for its default too.
  assert resume.changed_keys(stored, {**same, "model": {}}, defaults) == [
      ("model.hidden", 64, 128)]
  assert resume.changed_keys(stored, {**same, "optim": {"lr": 2e-3}}, defaults) == [
      ("optim.lr", 1e-3, 2e-3)]
  # A network's own optimizer key defaults to the run's optim key.
  per_net = lambda **kw: {**same, "optim": {"lr": 1e-3, "networks": {"fake": kw}}}
  assert resume.changed_keys(stored, per_net(lr=1e-3, b2=0.999), defaults) == []
  assert resume.changed_keys(stored, per_net(b2=0.5), defaults) == [
      ("optim.networks.fake.b2", 0.999, 0.5)]
  # A key the schema does not know (an init.<network>) is a change when one side lacks it.
  assert resume.changed_keys(stored, {**same, "init": {"student": "runs/x"}}, defaults) == [
      ("init.student", None, "runs/x")]


def test_changed_frozen_names_networks_whose_hash_changed():
  from distill import resume
  stored = {"resolved": {"frozen": {"teacher": {"path": "/a", "hash": "h1"}}}}
  assert resume.changed_frozen(stored, {"teacher": {"path": "/b", "hash": "h1"}}) == []
  assert resume.changed_frozen(stored, {"teacher": {"path": "/a", "hash": "h2"}}) == [
      ("teacher", "h1", "h2")]
  # A teacher added to (or dropped from) a run is a change; a record without frozen networks
  # (written before they were recorded) is not compared.
  assert resume.changed_frozen({"resolved": {"frozen": {}}}, {"teacher": {"hash": "h2"}}) == [
      ("teacher", None, "h2")]
  assert resume.changed_frozen(stored, {}) == [("teacher", "h1", None)]
  assert resume.changed_frozen({"resolved": {}}, {"teacher": {"hash": "h2"}}) == []


@pytest.mark.slow
def test_a_toy_teacher_is_not_distilled_on_another_toy_distribution(tmp_path):
  teacher = tmp_path / "teacher"
  run(teacher, *BASE, "--config.train.steps=10")
  dmd2 = os.path.join(ROOT, "configs", "toy", "dmd2.py")
  proc = _cli(tmp_path / "dmd2", *BASE, "--config.train.steps=5",
              f"--config.teacher.checkpoint={teacher}", config=dmd2 + ":checkerboard")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "config key 'data.name': 'checkerboard' here" in lines[0]
  assert "data.name='gmm'" in lines[0]
  assert not (tmp_path / "dmd2").exists()


def test_check_records_a_moved_dataset_and_refuses_a_new_init(tmp_path):
  """A dataset staged elsewhere is the same run (recorded); an `init.<network>` added on resume
  is not (it would change the frozen weights the run reads), nor is a teacher it started
  without."""
  from distill import resume
  stored = {"data": {"name": "latents", "path": "/scratch/a"}, "train": {"steps": 10},
            "resolved": {"frozen": {}}}
  (tmp_path / "config.json").write_text(json.dumps(stored))
  moved = {"data": {"name": "latents", "path": "/scratch/b"}, "train": {"steps": 20}}
  assert resume.check(str(tmp_path), moved, {}, {}) == {"data.path": ["/scratch/a", "/scratch/b"]}
  with pytest.raises(ValueError, match=r"init.student is None there, 'runs/x' here"):
    resume.check(str(tmp_path), {**moved, "init": {"student": "runs/x"}}, {}, {})
  with pytest.raises(ValueError, match="the run started without a frozen teacher"):
    resume.check(str(tmp_path), moved, {}, {"teacher": {"hash": "h"}})
  assert resume.check(str(tmp_path), moved, {}, {"teacher": {"hash": "h"}}, allow=True) == {
      "data.path": ["/scratch/a", "/scratch/b"], "frozen.teacher.hash": [None, "h"]}
  # A run that recorded its data's content hash: a move is allowed when the content is the same,
  # other data at the new path (or the old one) is refused, naming the path and both hashes.
  stored["resolved"]["data_hash"] = "a" * 64
  (tmp_path / "config.json").write_text(json.dumps(stored))
  assert resume.check(str(tmp_path), moved, {}, {}, data_hash="a" * 64) == {
      "data.path": ["/scratch/a", "/scratch/b"]}
  with pytest.raises(ValueError, match=r"the data differs .*data.path '/scratch/a' there, "
                                       r"'/scratch/b' here.*hash aaaaaaaaaaaa there, "
                                       r"bbbbbbbbbbbb now"):
    resume.check(str(tmp_path), moved, {}, {}, data_hash="b" * 64)
  same_path = {**moved, "data": stored["data"]}
  with pytest.raises(ValueError, match=r"the data differs from the data the run started with: "):
    resume.check(str(tmp_path), same_path, {}, {}, data_hash="b" * 64)
  assert resume.check(str(tmp_path), same_path, {}, {}, data_hash="b" * 64, allow=True) == {
      "data.hash": ["a" * 64, "b" * 64]}


def test_unretrieved_read_errors_of_a_step_being_read_are_dropped_and_nothing_else(tmp_path):
  """A failed restore's reads that nobody awaits are logged by asyncio as "Task exception was
  never retrieved" or "Future exception was never retrieved" when they are collected, before
  or after the restore raises (CI saw a Future's). Both kinds are dropped for the step being
  read, from the moment its read starts; the same records for other paths still print."""
  script = textwrap.dedent(f"""
      import asyncio, gc, logging, os
      from distill import checkpoint as ckpt
      logging.basicConfig()
      run = {str(tmp_path / "checkpoints")!r}
      ckpt._expect_failed_reads(run, 20)   # registered before the read: nothing has failed yet
      step20 = os.path.join(run, "20", "state", "d", "x")
      other = os.path.join(run, "30", "state", "d", "x")

      async def fail(path):
        raise ValueError(f"NOT_FOUND: Error reading local file {{path!r}}")

      async def main():
        loop = asyncio.get_running_loop()
        for path in (step20, other):
          future = loop.create_future()
          future.set_exception(ValueError(f"NOT_FOUND: Error reading local file {{path!r}}"))
          del future
          task = loop.create_task(fail(path))
          await asyncio.sleep(0)
          del task
          gc.collect()

      asyncio.run(main())
  """)
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "30/state" in p.stderr and "20/state" not in p.stderr, p.stderr
  assert "Future exception was never retrieved" in p.stderr, p.stderr
  assert "Task exception was never retrieved" in p.stderr, p.stderr
