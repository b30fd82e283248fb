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
