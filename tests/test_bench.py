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


BENCH_DIT = "configs/bench/dit_xl2.py"
# DiT-XL/2 shrunk to CPU size (the architecture keys are what the bench configs set).
TINY_DIT = ["--config.model.num_layers=2", "--config.model.num_attention_heads=2",
            "--config.model.attention_head_dim=16", "--config.train.batch_size=2",
            "--config.model.attention=xla", "--config.model.jvp_attention=xla"]


@pytest.mark.parametrize("arg,latent,batch", [("denoise", 32, 128), ("scm", 32, 128),
                                              ("dmd2,512", 64, 8), ("sid,256", 32, 32)])
def test_bench_dit_xl2_configs_are_dit_xl2(arg, latent, batch):
  from distill import trainer
  c = trainer.load_config(f"{BENCH_DIT}:{arg}", [])
  m = c.model
  assert c.objective.name == arg.split(",")[0]
  assert (m.name, m.num_layers, m.num_attention_heads, m.attention_head_dim, m.patch_size) == (
      "dit", 28, 16, 72, 2)
  assert (m.sample_size, c.data.height, c.data.width, c.train.batch_size) == (
      latent, latent, latent, batch)
  from models.dit import DiT
  flops = DiT(sample_size=32).flops_per_example()
  assert 3 * flops / 1e9 == pytest.approx(712, rel=0.01)   # the reference's per-image figure


def test_bench_dit_xl2_rejects_unknown_arg():
  from distill import trainer
  with pytest.raises(ValueError, match=r"objective in .* got 'scm,384'"):
    trainer.load_config(f"{BENCH_DIT}:scm,384", [])


@pytest.mark.slow
def test_gpu_bench_script_dry_run_on_cpu(tmp_path):
  """launch/gpu_bench.sh end to end on CPU with a shrunk network: one run of each objective
  (plain, sCD, DMD2, SiD) in its table and JSON lines, an unknown run named, and the kernel
  tests (skipped off GPU) reported."""
  e = env() | {"STEPS": "1", "EXTRA_ARGS": " ".join(TINY_DIT), "PYTHON": sys.executable,
               "WHEELS": str(tmp_path / "no_wheels"),   # this interpreter has every package
               "RUNS": "plain512 scm256 bogus dmd2_256 sid_256 kernels", "LIMIT_SCALE": "2"}
  p = subprocess.run(["bash", "launch/gpu_bench.sh", str(tmp_path)], cwd=ROOT,
                     capture_output=True, text=True, timeout=1200, env=e)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  assert (tmp_path / "bench.jsonl").exists(), p.stdout[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
  assert [r["run"] for r in rows] == ["plain512", "scm256", "dmd2_256", "sid_256"]
  assert [r["batch_size"] for r in rows] == [2, 2, 2, 2]
  assert [sorted(r["phases"]) for r in rows] == [["denoise"], ["scm"], ["critic", "generator"],
                                                 ["critic", "generator"]]
  assert all(p["img_per_s"] > 0 for r in rows for p in r["phases"].values())
  table = (tmp_path / "bench.md").read_text()
  assert table.count("| attn=xla jvp=xla bfloat16 scanned remat=none |") == 4, table
  assert table.count("| dmd2_256 | attn=xla jvp=xla bfloat16 scanned remat=full |") == 2, table
  assert "failed" not in table
  assert "unknown run 'bogus' in RUNS" in p.stdout
  assert "skipped" in p.stdout   # the on_gpu kernel tests ran (and skip on CPU)
  bad = subprocess.run(["bash", "launch/gpu_bench.sh", str(tmp_path / "bad")], cwd=ROOT,
                       capture_output=True, text=True, timeout=60,
                       env=e | {"LIMIT_SCALE": "1.5"})
  assert bad.returncode == 2 and "LIMIT_SCALE must be a positive integer" in bad.stdout


@pytest.mark.parametrize("args, fragment", [
    (["--compare", "bogus"], "--compare 'bogus': expected KEY=V1,V2"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "-1"], "--warmup >= 0"),
    # every variant is checked before the first compiles
    (["--compare", "model.attention=xla,bogus"], "bogus"),
])
def test_bench_bad_flags_are_one_line_before_any_compile(args, fragment):
  p = subprocess.run([sys.executable, "-m", "launch.bench", "--config", TEACHER, *args],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and fragment in lines[0], p.stderr
  assert "compiling" not in p.stdout + p.stderr
