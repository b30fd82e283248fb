"""`launch.aot`: ahead-of-time compiles of a config's phase steps for TPU topologies through
libtpu on this CPU host (the `tpu` extra), against the engine's abstract state: the JSON report,
parameter counts equal to a real init, FSDP shrinking the per-chip arguments, one-line errors,
and (slow) the DiT-XL/2 sCD and DMD2 recipes at full size on v5p 4x4x4 and v6e 8x8."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.test_train_e2e import ROOT, env

pytest.importorskip("libtpu")

TOY = os.path.join(ROOT, "configs", "toy", "teacher.py")
DIT = os.path.join(ROOT, "configs", "bench", "dit_xl2.py")


def aot(*args, timeout=900):
  p = subprocess.run([sys.executable, "-m", "launch.aot", *args], cwd=ROOT, capture_output=True,
                     text=True, timeout=timeout, env=env())
  return p


def report(p):
  assert p.returncode == 0, p.stderr[-3000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


def test_toy_teacher_step_compiles_for_v5p_and_fsdp_shards_the_arguments():
  common = [f"--config={TOY}", "--topology=v5p:2x2x1", "--config.train.batch_size=64",
            "--config.model.hidden=512"]
  dp = report(aot(*common, "--config.mesh.data=4"))
  fsdp = report(aot(*common, "--config.mesh.data=1", "--config.mesh.fsdp=4"))
  assert dp["chips"] == 4 and dp["device_kind"].startswith("TPU v5")
  assert dp["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  row, frow = dp["phases"]["denoise"], fsdp["phases"]["denoise"]
  assert dp["fits"] and row["fits"] and row["peak_bytes_per_chip"] > 0
  assert row["alias_bytes"] > 0                     # the donated state is updated in place
  # Parameters, Adam moments and the EMA split 4 ways over fsdp: the arguments per chip fall by
  # about the state's 3/4 (the batch and small replicated leaves stay).
  state_bytes = 4 * dp["param_bytes"]["model"]      # params + 2 moments + EMA, float32
  assert row["argument_bytes"] - frow["argument_bytes"] > 0.6 * state_bytes
  # Parameter counts equal the engine's real init of the same config.
  from distill import trainer
  from distill.engine import Engine
  config = trainer.prepare_config(trainer.load_config(TOY, ["train.batch_size=64",
                                                           "model.hidden=512"]))
  state, _ = Engine(config).init_state()
  real = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(state.params["model"])))
  assert dp["params"] == {"model": real}


def test_bad_topology_and_bad_key_are_one_line_errors():
  p = aot(f"--config={TOY}", "--topology=v99:1x1")
  lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error")]
  assert p.returncode == 2 and len(lines) == 1 and "--topology" in lines[0], p.stderr[-2000:]
  p = aot(f"--config={TOY}", "--topology=v5p:2x2x1", "--config.train.no_such_key=1")
  assert p.returncode == 2 and "no_such_key" in p.stderr


def test_every_stage_of_a_staged_objective_compiles_and_the_json_has_designs_keys():
  guided = os.path.join(ROOT, "configs", "toy", "guided.py")
  r = report(aot(f"--config={guided}", "--topology=v5p:2x2x1", "--config.train.batch_size=16",
                 "--config.model.hidden=32", "--config.model.depth=1"))
  # guidance, then two progressive stages (8 -> 4 steps): each compiled, named by its stage
  assert list(r["phases"]) == ["stage0/guidance", "stage1/progressive", "stage2/progressive"]
  assert r["bytes_per_chip"] == max(p["peak_bytes_per_chip"] for p in r["phases"].values())
  assert r["hbm_per_chip"] == r["hbm_per_chip_bytes"] > r["bytes_per_chip"] and r["fits"]
  assert {"topology", "params", "bytes_per_chip", "hbm_per_chip", "fits"} <= set(r)


FULL = {
    "scm": ["--config.model.attention=xla", "--config.model.jvp_attention=xla"],
    "dmd2": ["--config.model.attention=xla"],
}


@pytest.mark.slow
@pytest.mark.parametrize("objective,topology,batch,mesh", [
    ("scm", "v5p:4x4x4", 2048, ["--config.mesh.fsdp=4"]),
    ("dmd2", "v6e:8x8", 512, ["--config.mesh.fsdp=8", "--config.model.remat=full"]),
])
def test_dit_xl2_recipes_compile_and_fit_at_full_size(objective, topology, batch, mesh):
  """DiT-XL/2 (diffusers layout: 750M with the per-block embedders) with scanned blocks and XLA
  attention (splash compiles too, see the test below, but its Mosaic kernels triple the compile
  time); sCD on v5p 4x4x4 (64 chips, 95 GiB; measured 89 GiB per chip at batch 2048, 185 s to
  compile), DMD2 (student, fake score, GAN head, frozen teacher) on v6e 8x8 (64 chips, 32 GiB) with
  full remat (without it, at batch 1024, the compiler asks for 244 GiB of temporaries;
  measured with remat at batch 512: 4.7 GiB per chip)."""
  r = report(aot(f"--config={DIT}:{objective}", f"--topology={topology}",
                 f"--config.train.batch_size={batch}", "--config.model.scan_blocks=true",
                 *FULL[objective], *mesh, timeout=1800))
  assert r["chips"] == 64 and r["fits"], r
  assert r["params"]["student"] == r["params"]["teacher"] > 6e8
  for p in r["phases"].values():
    assert 0 < p["peak_bytes_per_chip"] <= r["hbm_per_chip_bytes"]


@pytest.mark.slow
def test_tpu_attention_kernels_compile_per_shard_for_the_tpu_mesh():
  """A 2-block DiT sCD step with model.attention=splash and model.jvp_attention=mosaic_jvp on
  v5p 2x2x1, in both forms of the student pass (shared: the pair splash+mosaic_jvp in one jvp
  inside the gradient; separate: a mosaic_jvp tangent pass, then a splash forward): the engine's
  step sets the mesh as the trace's context, the DiT runs both kernels per shard inside
  shard_map and each compiled step holds both Mosaic kernels; the shared step counts fewer FLOPs
  (one student forward fewer); init on this CPU host needs no TPU kernel."""
  from launch import aot as aot_lib
  from distill import trainer
  orig = aot_lib.compile_step
  rows = {}
  for shared in (True, False):
    config = trainer.load_config(f"{DIT}:scm", [
        "train.batch_size=8", "model.num_layers=2", "model.scan_blocks=True",
        "model.attention=splash", "model.jvp_attention=mosaic_jvp",
        f"objective.shared_primal={shared}"])
    captured = {}

    def spy(step, *args):
      captured["hlo"] = step.lower(*args).as_text()
      return orig(step, *args)
    aot_lib.compile_step = spy
    try:
      # bf16 splash compiles at the default matmul precision (Mosaic has no fp32-precision
      # bf16 matmul); the test session's "highest" would refuse it.
      with jax.default_matmul_precision("default"):
        r = aot_lib.compile_config(config, "v5p:2x2x1")
    finally:
      aot_lib.compile_step = orig
    assert r["fits"] and r["phases"]["scm"]["peak_bytes_per_chip"] > 0
    assert "tpu_custom_call" in captured["hlo"]
    assert "mosaic_attention_jvp" in captured["hlo"], shared   # the tangent kernel
    assert "splash" in captured["hlo"], shared                 # the primal and its backward
    rows[shared] = r["phases"]["scm"]["flops_per_chip"]
  assert 0 < rows[True] < 0.95 * rows[False], rows
