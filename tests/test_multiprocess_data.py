"""Multi-host data on localhost: two JAX processes (`jax.distributed` on CPU, gloo collectives)
read disjoint shards of every global batch, assemble the same global batch a single process
sees, and a two-process training run killed after step 2 and resumed gives exactly the losses of
an uninterrupted run.

Select with `pytest -k "multiprocess or precompute"`. Each process has one CPU device; the
single-process reference has two (`--xla_force_host_platform_device_count=2`), so every run
uses the same 2-device data-parallel mesh and the same global batch of 4.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("grain")
pytest.importorskip("array_record")
pytest.importorskip("diffusers")

from distill.data.sources import make_source  # noqa: E402
from tests._tool_utils import save_tiny_vae  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 4


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, DISTILL_NO_PROGRESS="1",
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _run_processes(cmds: list[list[str]], env: dict, timeout: int = 600) -> list[str]:
  procs = [subprocess.Popen(c, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for c in cmds]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    outs.append(out)
  return outs


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
  """A small precomputed latent dataset (20 images, 3 classes, flipped twins)."""
  from PIL import Image
  from launch import precompute
  root = tmp_path_factory.mktemp("mp")
  rng = np.random.default_rng(0)
  for c, n in {"a": 7, "b": 7, "c": 6}.items():
    os.makedirs(root / "imgs" / c)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (20, 18, 3), dtype=np.uint8)).save(
          root / "imgs" / c / f"{i}.png")
  save_tiny_vae(root / "vae")
  assert precompute.main(["--input", f"folder:{root / 'imgs'}", "--vae", str(root / "vae"),
                          "--out", str(root / "lat"), "--size", "16", "--flip",
                          "--shard_size", "6"]) == 0
  return str(root / "lat")


_WORKER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    pid, port, path, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from distill.data.sources import make_source
    src = make_source({"name": "latents", "path": path}, seed=5)
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    result = {"process": jax.process_index(), "devices": jax.device_count(), "steps": []}
    for step in range(4):
      local = src.batch(step, %(B)d, jax.process_index(), jax.process_count())
      rows = src.indices(step, %(B)d, jax.process_index(), jax.process_count())
      x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local["x"],
                                                 (%(B)d,) + local["x"].shape[1:])
      full = multihost_utils.process_allgather(x, tiled=True)
      result["steps"].append({"rows": rows.tolist(), "global_x": np.asarray(full).tolist()})
    json.dump(result, open(out, "w"))
""" % {"B": GLOBAL_BATCH})


def test_multiprocess_shards_are_disjoint_and_assemble_the_global_batch(latents, tmp_path):
  port = _port()
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
  _run_processes([[sys.executable, str(script), str(i), str(port), latents, outs[i]]
                  for i in range(2)], _env(1), timeout=300)
  res = [json.load(open(o)) for o in outs]
  assert [r["process"] for r in res] == [0, 1] and res[0]["devices"] == 2
  src = make_source({"name": "latents", "path": latents}, seed=5)
  seen = []
  for step in range(4):
    a, b = (set(r["steps"][step]["rows"]) for r in res)
    assert a and b and not a & b                        # disjoint shards of the step
    whole = src.indices(step, GLOBAL_BATCH, 0, 1).tolist()
    assert res[0]["steps"][step]["rows"] + res[1]["steps"][step]["rows"] == whole
    seen += whole
    ref = src.batch(step, GLOBAL_BATCH)["x"]            # what one process alone would see
    for r in res:                                       # the assembled global batch, everywhere
      np.testing.assert_array_equal(np.asarray(r["steps"][step]["global_x"], np.float32), ref)
  assert len(set(seen)) == len(seen) == 4 * GLOBAL_BATCH   # no record twice within the epoch
  assert len(src) == 20 and set(seen) <= set(range(20))


def _train(workdir: str, latents: str, steps: int, *, process=None, port=None) -> list[str]:
  cmd = [sys.executable, "-m", "launch.train", "--config", "configs/imagenet/dit_xl2.py:teacher",
         "--workdir", workdir, f"--config.data.path={latents}",
         f"--config.train.steps={steps}", "--config.train.batch_size=4",
         "--config.train.log_every=1", "--config.checkpoint.every_steps=2",
         "--config.checkpoint.async_save=false", "--config.objective.init=random",
         "--config.model.num_layers=1", "--config.model.num_attention_heads=2",
         "--config.model.attention_head_dim=8", "--config.model.sample_size=8",
         "--config.model.num_embeds_ada_norm=3", "--config.model.dtype=float32",
         "--config.model.attention=xla",         "--config.optim.warmup_steps=0"]
  if process is not None:
    cmd += ["--config.distributed.initialize=true",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2", f"--config.distributed.process_id={process}"]
  return cmd


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return {r["step"]: r["denoise/loss"] for r in rows if "denoise/loss" in r}


def test_multiprocess_training_resumes_with_identical_global_batches(latents, tmp_path):
  """2 processes, killed after step 2 (the run ends there) and resumed to step 4, against one
  process with two devices running all 4 steps: the same losses at every step (tolerance 1e-6
  relative: the cross-process gradient all-reduce (gloo) may sum in another order than the
  in-process one)."""
  ref = str(tmp_path / "single")
  _run_processes([_train(ref, latents, 4)], _env(2))
  multi = str(tmp_path / "multi")
  port = _port()
  _run_processes([_train(multi, latents, 2, process=i, port=port) for i in range(2)], _env(1))
  assert sorted(_losses(multi)) == [1, 2]
  port = _port()
  outs = _run_processes([_train(multi, latents, 4, process=i, port=port) for i in range(2)],
                        _env(1))
  assert "resumed from step 2" in outs[0]
  got, want = _losses(multi), _losses(ref)
  assert sorted(got) == sorted(want) == [1, 2, 3, 4]
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-6), (step, got, want)


@pytest.mark.slow
def test_resume_goes_on_with_moved_data_and_refuses_other_data(latents, tmp_path):
  """A dataset staged to another path is the same run (the content hash config.json recorded is
  unchanged); another precompute of the same images (without flipped twins) under the path is
  not, and the refusal is one line that writes nothing."""
  import shutil
  from launch import precompute
  run = str(tmp_path / "run")
  _run_processes([_train(run, latents, 2)], _env(1))
  moved = shutil.copytree(latents, tmp_path / "moved")
  out = _run_processes([_train(run, str(moved), 4)], _env(1))[0]
  assert "resumed from step 2" in out
  with open(os.path.join(run, "config.json")) as f:
    recorded = json.load(f)["provenance"]["config_changes"]
  assert recorded == [{"step": 2, "changes": {"data.path": [latents, str(moved)]}}]
  imgs = os.path.join(os.path.dirname(latents), "imgs")
  vae = os.path.join(os.path.dirname(latents), "vae")
  other = str(tmp_path / "other")
  assert precompute.main(["--input", f"folder:{imgs}", "--vae", vae, "--out", other,
                          "--size", "16", "--shard_size", "6"]) == 0
  before = open(os.path.join(run, "config.json")).read()
  proc = subprocess.run(_train(run, other, 6), env=_env(1), cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and "the data differs from the data the run started with" in lines[0]
  assert f"data.path {str(moved)!r} there, {other!r} here" in lines[0], lines
  assert open(os.path.join(run, "config.json")).read() == before
