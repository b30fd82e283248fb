"""End to end through `python -m launch.train`: the toy teacher's run directory, exact resume
after SIGKILL, SIGTERM saving and exiting 0, and the sharded (8 fake CPU devices) run logging
the same losses as one device with parameters really split."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "configs", "toy", "teacher.py")

SMALL = ["--config.model.hidden=64", "--config.model.depth=2", "--config.train.batch_size=64",
         "--config.eval.num_samples=256", "--config.eval.teacher_steps=8",
         "--config.sample.num=128", "--config.optim.warmup_steps=5"]


def env(devices: int = 1) -> dict:
  e = {**os.environ, "JAX_PLATFORMS": "cpu", "DISTILL_NO_PROGRESS": "1"}
  flags = e.get("XLA_FLAGS", "")
  if devices > 1:
    flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  e["XLA_FLAGS"] = flags
  return e


def train_cmd(workdir, *extra):
  return [sys.executable, "-m", "launch.train", "--config", TEACHER, "--workdir", str(workdir),
          *SMALL, *extra]


def run(workdir, *extra, devices=1, timeout=600):
  proc = subprocess.run(train_cmd(workdir, *extra), cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout, env=env(devices))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def kill_after_checkpoint(cmd, workdir, min_step: int, timeout: float = 300) -> None:
  """Starts `cmd`, SIGKILLs it once a checkpoint of step >= `min_step` exists in `workdir`."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          env=env())
  deadline = time.time() + timeout
  ckdir = workdir / "checkpoints"
  while time.time() < deadline:
    done = [d for d in (os.listdir(ckdir) if ckdir.exists() else []) if d.isdigit()]
    if any(int(d) >= min_step for d in done) and proc.poll() is None:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def losses(rows):
  return [{k: v for k, v in r.items() if k.startswith("denoise/") or k == "step"} for r in rows]


@pytest.mark.slow
def test_toy_teacher_run_directory(tmp_path):
  w = tmp_path / "teacher"
  run(w, "--config.train.steps=400", "--config.train.log_every=50",
      "--config.checkpoint.every_steps=200")
  cfg = json.load(open(w / "config.json"))
  assert cfg["provenance"]["git_commit"] and "jax" in cfg["provenance"]["packages"]
  assert cfg["resolved"]["evaluated_as"] == "teacher"
  rows = metrics(w)
  assert [r["step"] for r in rows] == list(range(50, 401, 50))
  assert all("denoise/loss" in r and "img_per_s" in r for r in rows)
  assert rows[-1]["denoise/loss"] < rows[0]["denoise/loss"]
  assert sorted(int(d) for d in os.listdir(w / "checkpoints") if d.isdigit()) == [200, 400]
  pngs = os.listdir(w / "samples")
  assert pngs and all(p.endswith(".png") for p in pngs)
  report = json.load(open(w / "eval.json"))
  assert report["metric"] == "swd" and report["teacher_reference_steps"] == 8
  assert set(report["results"]) == {"teacher_steps_1", "teacher_steps_8"}
  r1, r8 = report["results"]["teacher_steps_1"], report["results"]["teacher_steps_8"]
  assert r1["nfe"] == 1 and r8["nfe"] == 8 and r1["num_samples"] == 256
  # Many steps of the teacher's ODE beat one Euler step from noise, and neither beats the floor.
  assert r8["swd"] < r1["swd"]
  assert report["data_floor"] < r8["swd"]


@pytest.mark.slow
def test_sigkill_resume_equals_uninterrupted_run(tmp_path):
  """Checkpoints every 20 steps, log lines every 6: the line of step 24 averages steps 19-24
  across the kill (the checkpoint keeps its log window), exactly as the uninterrupted run's."""
  steps = ["--config.train.steps=60", "--config.train.log_every=6",
           "--config.checkpoint.every_steps=20", "--config.eval.at_end=false",
           "--config.checkpoint.async_save=false"]
  ref = tmp_path / "ref"
  run(ref, *steps)
  w = tmp_path / "killed"
  kill_after_checkpoint(train_cmd(w, *steps), w, 20)
  second = run(w, *steps)
  assert "resumed from step" in second.stdout + second.stderr
  got, want = losses(metrics(w)), losses(metrics(ref))
  assert got == want  # bit for bit: same floats, same steps, no duplicated lines


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(tmp_path):
  w = tmp_path / "term"
  proc = subprocess.Popen(train_cmd(w, "--config.train.steps=100000",
                                    "--config.checkpoint.every_steps=0"),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(),
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not (w / "metrics.jsonl").exists():
    time.sleep(0.1)
  assert (w / "metrics.jsonl").exists(), "training never logged"
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  assert time.time() - t0 < 60
  saved = [int(d) for d in os.listdir(w / "checkpoints") if d.isdigit()]
  assert saved and max(saved) >= 50


def test_sigterm_during_setup_saves_the_starting_state_and_returns(tmp_path, monkeypatch):
  """The handler is installed when train() starts (setup can take minutes): a signal that
  arrives before the first step saves the state the run would start from and returns, where
  the process died with 143 and left an empty checkpoints/ directory."""
  from distill import trainer
  installed = trainer._Stop.install   # pylint: disable=protected-access

  def install_and_signal(self):
    prev = installed(self)
    self.requested, self.signal = True, signal.SIGTERM   # as if it came during setup
    return prev

  monkeypatch.setattr(trainer._Stop, "install", install_and_signal)
  config = trainer.load_config(TEACHER, ["model.hidden=16", "model.depth=1", "train.steps=50",
                                         "eval.at_end=false", "sample.num=0"])
  summary = trainer.train(config, str(tmp_path / "run"))
  assert summary["interrupted"] and summary["step"] == 0
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["0"]
  assert signal.getsignal(signal.SIGTERM) is not None


SHARD_PROBE = r"""
import json, sys
import jax, numpy as np
from distill import config as config_lib, trainer
from distill.engine import Engine
c = config_lib.load_config_file(sys.argv[1])
c = config_lib.apply_overrides(c, sys.argv[2:])
c = trainer.prepare_config(c)
e = Engine(c)
state, frozen = e.init_state()
leaves = jax.tree_util.tree_leaves(state.params)
split = [(l.shape, l.addressable_shards[0].data.shape) for l in leaves
         if l.addressable_shards[0].data.shape != l.shape]
batch = e.global_batch(0)
from distill.objective import make_time
hlo = e.phase_step(0, 0).lower(state, frozen, batch, make_time(0, 0, 0, 0)).compile().as_text()
coll = [op for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                      "collective-permute") if op in hlo]
print(json.dumps({"devices": jax.device_count(), "split": len(split), "leaves": len(leaves),
                  "collectives": coll}))
"""


@pytest.mark.slow
def test_sharded_run_matches_single_device_and_splits_params(tmp_path):
  steps = ["--config.train.steps=30", "--config.train.log_every=5", "--config.eval.at_end=false",
           "--config.checkpoint.every_steps=0"]
  one = tmp_path / "one"
  run(one, *steps)
  eight = tmp_path / "eight"
  run(eight, *steps, "--config.mesh.data=4", "--config.mesh.fsdp=2", devices=8)
  a, b = losses(metrics(one)), losses(metrics(eight))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for ra, rb in zip(a, b):
    for k in ra:
      np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=1e-6, err_msg=k)
  cfg = json.load(open(eight / "config.json"))
  assert cfg["resolved"]["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
  probe = subprocess.run([sys.executable, "-c", SHARD_PROBE, TEACHER, "mesh.data=4", "mesh.fsdp=2",
                          "model.hidden=64", "model.depth=2", "train.batch_size=64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env(8))
  assert probe.returncode == 0, probe.stderr[-3000:]
  info = json.loads(probe.stdout.strip().splitlines()[-1])
  assert info["devices"] == 8
  assert info["split"] > 0  # some parameters are stored split over the fsdp axis
  assert info["collectives"], "the compiled sharded step holds no collectives"
