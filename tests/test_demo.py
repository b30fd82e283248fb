"""`python -m launch.demo` end to end on a shrunken teacher and student: it trains and ships a
missing teacher (converted Orbax + data hash + eval cache), distils it, reuses the cached
teacher rows, writes eval.json, report.md and the sample grid, and a failed retrain loses
nothing. The shipped teacher itself is checked in tests/test_demo_teacher.py."""
import json
import os
import subprocess
import sys

import pytest

from tests.test_train_e2e import ROOT, env

EVAL = ["eval.num_samples=64", "eval.teacher_steps=4", "sample.num=20"]
TINY_TEACHER = [f"--teacher_config.{o}" for o in [
    "train.steps=30", "train.batch_size=32", "train.log_every=10", "model.num_layers=1",
    "model.attention_head_dim=16", "checkpoint.every_steps=0", "optim.warmup_steps=2", *EVAL]]
TINY_STUDENT = [f"--config.{o}" for o in [
    "train.steps=4", "train.batch_size=16", "train.log_every=2", "checkpoint.every_steps=0",
    "eval.steps=(1,2)", "eval.ideal_steps=(1,2)", *EVAL]]


def demo(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.demo", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, env=env())


@pytest.mark.slow
def test_demo_ships_a_missing_teacher_then_distils_and_reports(tmp_path):
  teacher, work = tmp_path / "teacher_ckpt", tmp_path / "demo"
  p = demo("--teacher", str(teacher), "--workdir", str(work), "--objective", "scm",
           *TINY_TEACHER, *TINY_STUDENT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "training the demo teacher (no teacher at" in p.stdout

  shipped = json.load(open(teacher / "config.json"))
  from configs.demo import common
  from distill.config import base_config
  from distill.data import sources
  data = sources.make_source(common.demo_eval(base_config()).data, 0)
  assert shipped["provenance"]["data_hash"] == data.content_hash()
  assert shipped["provenance"]["trained_by"] == "configs/demo/teacher.py"
  assert shipped["provenance"]["config"]["model"]["num_layers"] == 1
  cache = json.load(open(teacher / "teacher_eval.json"))
  assert all(json.loads(k)["num_samples"] == 64 for k in cache)
  teacher_rows = {k: r for k, r in cache.items() if r["solver"] == "euler"}
  assert len(teacher_rows) == 2

  report = json.load(open(work / "scm" / "eval.json"))
  results = report["results"]
  assert report["metric"] == "fd" and report["class_conditional"]
  assert set(results) == {"teacher_steps_1", "teacher_steps_4", "student_steps_1",
                          "student_steps_2", "ideal_steps_1", "ideal_steps_2"}
  # The teacher rows are the shipped cache's, timings included (not recomputed).
  cached_rows = sorted(teacher_rows.values(), key=lambda r: r["nfe"])
  assert [results["teacher_steps_1"], results["teacher_steps_4"]] == cached_rows
  # Ideal rows: the student's sampler with the teacher's 4-step ODE as its denoiser. One step
  # from pure noise is the teacher's own 4-step sample (same noise, labels and grid; the fd
  # agrees to float32 rounding of the time match); they were computed for this run and written
  # into the shipped cache (eval.update_teacher_cache), so the next run reads them.
  assert (results["ideal_steps_1"]["nfe"], results["ideal_steps_2"]["nfe"]) == (4, 8)
  assert results["ideal_steps_1"]["fd"] == pytest.approx(results["teacher_steps_4"]["fd"],
                                                         rel=1e-4)
  assert results["ideal_steps_2"]["fd"] != results["ideal_steps_1"]["fd"]
  assert len(cache) == 4
  assert sorted(r["nfe"] for k, r in cache.items() if k not in teacher_rows) == [4, 8]
  for row in report["results"].values():
    assert row["fd"] > 0 and 0 <= row["coverage"] <= 1 and row["num_samples"] == 64
  assert report["data_floor"] > 0
  text = open(work / "scm" / "report.md").read()
  assert "| student | 2 | 2 |" in text and "| real data (floor) |" in text
  assert "| student | 2 | 2 |" in p.stdout
  assert any(f.endswith(".png") for f in os.listdir(work / "scm" / "samples"))
  cfg = json.load(open(work / "scm" / "config.json"))
  assert cfg["teacher"]["checkpoint"] == str(teacher)

  # A retrain that fails (here: a bad teacher override) exits 2 with one line and leaves the
  # shipped teacher as it was.
  before = {f: os.path.getmtime(teacher / f) for f in ("config.json", "teacher_eval.json")}
  bad = demo("--teacher", str(teacher), "--workdir", str(work), "--retrain_teacher",
             "--teacher_config.train.steps=abc")
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert "train.steps" in bad.stderr
  assert {f: os.path.getmtime(teacher / f) for f in before} == before
  assert not (tmp_path / "teacher_ckpt.new").exists()


def test_demo_rejects_unknown_arguments():
  p = demo("--objectiv", "scm")
  assert p.returncode == 2 and "unrecognized argument" in p.stderr
  p = demo("--objective", "nosuch")
  assert p.returncode == 2 and "invalid choice" in p.stderr
