"""Checkpoint robustness: restoring onto a different mesh, falling back past a corrupted latest
checkpoint, ignoring an unfinished (crashed mid-save) one, and keeping stage boundaries."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, TEACHER, env, metrics, run, train_cmd

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
  _corrupt(w / "checkpoints" / "20")
  second = run(w, *BASE, "--config.train.steps=30")
  out = second.stdout + second.stderr
  assert "could not be restored" in out and "resumed from step 10" in out
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
