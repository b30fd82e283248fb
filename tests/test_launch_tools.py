"""launch.sample and launch.evaluate on a finished (tiny) run directory."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from tests.test_train_e2e import ROOT, env, run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  w = tmp_path_factory.mktemp("runs") / "teacher"
  run(w, "--config.train.steps=40", "--config.train.log_every=20", "--config.eval.at_end=false",
      "--config.checkpoint.every_steps=0")
  return w


def tool(name, *args):
  return subprocess.run([sys.executable, "-m", f"launch.{name}", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env())


@pytest.mark.slow
def test_sample_writes_png_and_raw_samples(tiny_run, tmp_path):
  out = tmp_path / "s.png"
  p = tool("sample", "--workdir", str(tiny_run), "--steps", "4", "--num", "32", "--class", "3",
           "--seed", "5", "--out", str(out))
  assert p.returncode == 0, p.stderr[-2000:]
  assert out.exists() and out.stat().st_size > 0
  x = np.load(tmp_path / "s.npy")
  assert x.shape == (32, 2) and np.isfinite(x).all()
  again = tool("sample", "--workdir", str(tiny_run), "--steps", "4", "--num", "32", "--class",
               "3", "--seed", "5", "--out", str(tmp_path / "t.png"))
  assert again.returncode == 0
  np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), x)  # fixed seeds


@pytest.mark.slow
def test_sample_defaults_to_the_runs_eval_guidance(tiny_run, tmp_path):
  """Without --guidance the teacher samples with CFG at the run's eval.guidance, as its eval
  rows do (it sampled at w = 1); --guidance still overrides it."""
  def sample(name, *args):
    p = tool("sample", "--workdir", str(tiny_run), "--steps", "4", "--num", "32", "--class",
             "3", "--out", str(tmp_path / f"{name}.png"), *args)
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(tmp_path / f"{name}.npy")
  default = sample("default", "--config.eval.guidance=2.0")
  np.testing.assert_array_equal(default, sample("w2", "--guidance", "2"))
  unguided = sample("w1", "--config.eval.guidance=2.0", "--guidance", "1")
  assert np.abs(default - unguided).max() > 1e-3


def test_sample_draws_classes_as_a_class_conditional_evaluation_does(tiny_run, tmp_path):
  """Without --class, a run evaluated class-conditionally samples classes drawn with --seed (as
  its eval rows), not the null class; a run that is not stays unconditional."""
  from distill import evaluation, trainer
  def sample(name, *args):
    p = tool("sample", "--workdir", str(tiny_run), "--steps", "2", "--num", "16", "--seed", "5",
             "--out", str(tmp_path / f"{name}.png"), *args)
    assert p.returncode == 0, p.stderr[-2000:]
    return np.load(tmp_path / f"{name}.npy")
  drawn = sample("drawn", "--config.eval.class_conditional=true")
  null = sample("null", "--config.eval.class_conditional=false")
  engine, state, frozen, _ = trainer.open_run(str(tiny_run))
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)
  net = trainer.network_for_role(engine, "teacher")
  labels = evaluation.sample_labels(engine.nets[net].num_classes, 16, 5)
  assert len(set(labels.tolist())) > 1
  for want, got in ((labels, drawn), (None, null)):
    x, _ = evaluation.generate(ctx, net, params[net], n=16, seed=5, solver="euler", steps=2,
                               shape=engine.source.shape, labels=want)
    np.testing.assert_allclose(got, x, atol=1e-6)


@pytest.mark.slow
def test_evaluate_writes_eval_json(tiny_run):
  p = tool("evaluate", "--workdir", str(tiny_run), "--num", "128", "--teacher_steps", "4")
  assert p.returncode == 0, p.stderr[-2000:]
  report = json.load(open(tiny_run / "eval.json"))
  assert report["step"] == 40 and report["teacher_reference_steps"] == 4
  assert set(report["results"]) == {"teacher_steps_1", "teacher_steps_4"}
  assert all(r["num_samples"] == 128 for r in report["results"].values())
  assert "| teacher | 4 | 4 |" in p.stdout


_TWO_PROCESS = """
import sys, jax
from launch import evaluate
rc = evaluate.main(sys.argv[1:])
assert jax.process_count() == 2 and jax.device_count() == 2, (jax.process_count(),
                                                              jax.device_count())
sys.exit(rc)
"""


@pytest.mark.slow
def test_evaluate_on_two_processes_equals_one(tiny_run, tmp_path):
  """launch.evaluate with the `--config.distributed.*` overrides the pod and cluster launchers
  append runs as one jax.distributed job of two CPU processes (each with one device; the
  samples are generated data-parallel over both and gathered), and its eval.json, written once,
  equals the single-process one (float32 sampling of the same noise on 1 vs 2 devices: 1e-6
  relative on the SWD)."""
  import shutil
  import socket
  single = tmp_path / "single"
  multi = tmp_path / "multi"
  shutil.copytree(tiny_run, single)
  shutil.copytree(tiny_run, multi)
  for d in (single, multi):
    (d / "eval.json").unlink(missing_ok=True)
  common = ["--num", "96", "--teacher_steps", "4"]
  p = tool("evaluate", "--workdir", str(single), *common)
  assert p.returncode == 0, p.stderr[-2000:]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  e = {**env(), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
  procs = [subprocess.Popen(
      [sys.executable, "-c", _TWO_PROCESS, "--workdir", str(multi), *common,
       "--config.distributed.initialize=true",
       f"--config.distributed.coordinator_address=localhost:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [q.communicate(timeout=600) for q in procs]
  for q, (_, err) in zip(procs, outs):
    assert q.returncode == 0, err[-3000:]
  assert "| teacher | 4 | 4 |" in outs[0][0] and "| teacher |" not in outs[1][0]  # printed once
  want = json.load(open(single / "eval.json"))
  got = json.load(open(multi / "eval.json"))
  assert set(got["results"]) == set(want["results"]) == {"teacher_steps_1", "teacher_steps_4"}
  assert got["data_floor"] == want["data_floor"]
  for name, row in want["results"].items():
    assert got["results"][name]["num_samples"] == 96
    assert got["results"][name]["swd"] == pytest.approx(row["swd"], rel=1e-6), name


@pytest.mark.parametrize("args, fragment", [
    (["--workdir", "/no/such/run"], "config.json"),
    (["--class", "99"], "--class"),
    (["--class", "-3"], "--class: -3 is not a class of this model"),
    (["--network", "student"], "no 'student' network"),
    (["--sampler", "eulr"], "--sampler: unknown solver 'eulr'"),
    (["--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--num", "-2"], "--num: must be >= 1"),
    (["--out", "samples"], "--out samples: expected an image file name"),
    (["--guidance", "2"], "--guidance 2: classifier-free guidance needs a condition to guide"),
    # launch.evaluate's counts are checked with the config, before any sampling
    (["--num", "-5", "evaluate"], "config key 'eval.num_samples': must be >= 1, got -5"),
    (["--teacher_steps", "0", "evaluate"], "'eval.teacher_steps': must be >= 1, got 0"),
    (["--metric", "fd", "evaluate"], "metric 'fd' scores grayscale images"),
])
@pytest.mark.slow
def test_sample_bad_input_one_line_exit_2(tiny_run, args, fragment):
  which = "evaluate" if args[-1] == "evaluate" else "sample"
  args = [a for a in args if a != "evaluate"]
  if "--workdir" not in args:
    args = ["--workdir", str(tiny_run), *args]
  before = sorted(os.listdir(tiny_run))
  p = tool(which, *args)
  assert p.returncode == 2, p.stderr[-2000:]
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and fragment in lines[0], p.stderr
  assert sorted(os.listdir(tiny_run)) == before


def test_a_run_whose_config_json_has_a_key_this_version_lacks_is_named(tiny_run, tmp_path):
  import shutil
  old = tmp_path / "old"
  shutil.copytree(tiny_run, old)
  cfg = json.loads((old / "config.json").read_text())
  cfg["objective"]["retired_key"] = 1
  (old / "config.json").write_text(json.dumps(cfg))
  from distill import config as config_lib, trainer
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.open_run(str(old))
  assert str(e.value).startswith(f"{old / 'config.json'}: unknown config key "
                                 "'objective.retired_key'") and "remove it" in str(e.value)


@pytest.mark.parametrize("damage", ["objective.name", "objective", "model.name", "data"])
def test_a_run_whose_config_json_lacks_what_names_its_parts_says_so(tiny_run, tmp_path, damage):
  """A config.json without its objective / model / data name (a damaged or hand-edited file)
  stops with one line naming the key, not an 'unknown key' of the defaults it fell back to."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(tiny_run, run)
  cfg = json.loads((run / "config.json").read_text())
  section, _, name = damage.partition(".")
  if name:
    del cfg[section][name]
  else:
    del cfg[section]
  (run / "config.json").write_text(json.dumps(cfg))
  from distill import config as config_lib, trainer
  with pytest.raises(config_lib.ConfigError) as e:
    trainer.open_run(str(run))
  key = damage if name else f"{damage}.name"
  assert str(e.value) == (f"{run / 'config.json'}: no {key!r} (a damaged or hand-edited "
                          "config.json; the run cannot be rebuilt without it)")


def _dry(script, env, *args):
  e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
  e.update(env, DRY_RUN="1")
  p = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], env=e,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  return p.stdout


def test_tpu_pod_launcher_runs_the_command_on_every_worker():
  out = _dry("tpu_pod.sh", {"TPU": "pod", "ZONE": "us-east5-a", "REPO": "/src/distill",
                            "SETUP": "pip install -e ."},
             "launch.train", "--config", "configs/toy/scm.py:gmm", "--workdir", "gs://b/run 1")
  assert out.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all ")
  remote = shlex.split(out.split("--command ", 1)[1])[0]
  assert remote.startswith("cd /src/distill && pip install -e . && python3 -m launch.train ")
  assert shlex.split(remote.split("&& ")[-1])[-3:] == [
      "--workdir", "gs://b/run 1", "--config.distributed.initialize=true"]


def test_slurm_launcher_sets_the_coordinator_from_the_environment():
  out = _dry("slurm_gpu.sh", {"COORDINATOR": "node0:4000", "NUM_PROCESSES": "4",
                              "PROCESS_ID": "3"},
             "launch.train", "--config", "configs/toy/scm.py", "--workdir", "/shared/r")
  assert shlex.split(out) == [
      "python3", "-m", "launch.train", "--config", "configs/toy/scm.py", "--workdir",
      "/shared/r", "--config.distributed.initialize=true",
      "--config.distributed.coordinator_address=node0:4000",
      "--config.distributed.num_processes=4", "--config.distributed.process_id=3"]
  p = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm_gpu.sh")], capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == 2 and "usage" in p.stderr


def test_slurm_batch_script_starts_the_checkouts_copy_and_tasks_run_directly(tmp_path):
  """Under sbatch the script runs as a copy in the first node's spool directory, which the other
  nodes lack: the srun it starts must name the checkout's launch/slurm_gpu.sh (REPO, by
  default the submit directory). A task of an srun step (the README's 'inside an allocation'
  form, SLURM_STEP_ID a step number) runs the command itself instead of starting srun again
  from inside its step. srun, scontrol and python are stand-ins that print what they got;
  scontrol lists more hosts than a pipe holds (a `head -n 1` reader would SIGPIPE it, and
  pipefail stopped the script with status 141)."""
  import shutil
  import stat
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in (("srun", 'echo "srun $*"'), ("scontrol", "echo node0; seq 200000 | sed s/^/node/"),
                     ("fakepython", 'echo "python $*"')):
    f = bin_dir / name
    f.write_text(f"#!/usr/bin/env bash\n{body}\n")
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
  spool = tmp_path / "spool" / "job7"
  spool.mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "launch", "slurm_gpu.sh"), spool / "slurm_script")
  base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DISTILL_"))}
  base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON="fakepython", SLURM_JOB_ID="7",
              SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NODELIST="node[0-1]", SLURM_NTASKS="2")

  def run_script(script, **extra):
    p = subprocess.run(["bash", str(script), "launch.evaluate", "--workdir", "/shared/r"],
                       env={**base, **extra}, cwd=str(tmp_path), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()
  batch = run_script(spool / "slurm_script", SLURM_PROCID="0")   # the batch step
  assert batch == (f"srun --ntasks-per-node=1 bash {ROOT}/launch/slurm_gpu.sh launch.evaluate "
                   "--workdir /shared/r"), batch
  batch = run_script(spool / "slurm_script", SLURM_STEP_ID="4294967294")  # batch, newer Slurm
  assert batch.startswith(f"srun --ntasks-per-node=1 bash {ROOT}/launch/slurm_gpu.sh "), batch
  task = run_script(os.path.join(ROOT, "launch", "slurm_gpu.sh"), SLURM_STEP_ID="0",
                    SLURM_PROCID="1")
  assert shlex.split(task) == [
      "python", "-m", "launch.evaluate", "--workdir", "/shared/r",
      "--config.distributed.initialize=true",
      "--config.distributed.coordinator_address=node0:12345",
      "--config.distributed.num_processes=2", "--config.distributed.process_id=1"], task
