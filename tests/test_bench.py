"""launch.bench: phase steps of a config timed through the training step builder."""
import json
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, TEACHER, env


@pytest.mark.slow
def test_bench_reports_json_per_phase_and_compares_settings():
  p = subprocess.run([sys.executable, "-m", "launch.bench", "--config", TEACHER, "--steps", "2",
                      "--warmup", "1", "--config.model.hidden=32", "--config.model.depth=1",
                      "--compare", "train.batch_size=16,32"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900, env=env())
  assert p.returncode == 0, p.stderr[-2000:]
  rows = json.loads(p.stdout.strip().splitlines()[-1])
  assert [r["settings"] for r in rows] == [["train.batch_size=16"], ["train.batch_size=32"]]
  for r, bs in zip(rows, (16, 32)):
    d = r["phases"]["denoise"]
    assert r["batch_size"] == bs and d["step_ms"] > 0
    assert d["img_per_s"] == pytest.approx(bs / (d["step_ms"] / 1000), rel=1e-6)
    # XLA's count of the whole compiled step is at least the model's matmul FLOPs (it adds the
    # optimizer update, the loss and elementwise work; models' counts are checked against XLA
    # in their own tests).
    assert d["xla_tflops"] * 1e3 >= 0.95 * d["model_gflops_per_step"] > 0
  assert "| train.batch_size=16 | denoise |" in p.stdout


def test_synthetic_source_shapes():
  from distill.data import sources
  s = sources.make_source({"name": "synthetic", "height": 4, "width": 6, "channels": 3,
                           "num_classes": 5}, seed=0)
  b = s.batch(3, 8)
  assert b["x"].shape == (8, 4, 6, 3) and b["label"].max() < 5
  assert (s.batch(3, 8)["x"] == b["x"]).all()
  flat = sources.make_source({"name": "synthetic", "height": 0, "channels": 7,
                              "num_classes": 0}, seed=0)
  assert flat.batch(0, 2)["x"].shape == (2, 7) and "label" not in flat.batch(0, 2)
