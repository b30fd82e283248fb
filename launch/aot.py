"""Ahead-of-time compile a config's phase steps for a TPU topology, on this (CPU) host.

    pip install -e ".[tpu]"          # libtpu: the TPU compiler, no TPU needed
    python -m launch.aot --config configs/bench/dit_xl2.py:scm --topology v5p:4x4x4 \
        [--config.mesh.fsdp=8 ...]

The topology (`jax.experimental.topologies.get_topology_desc`, e.g. v5p:4x4x4, v6e:8x8,
v5e:4x4, v4:2x2x2) gives abstract devices; the config's mesh is laid over them
(`mesh.data`/`fsdp`/`tensor`, -1 fills) and every phase of every stage of the objective
(`Engine.phase_plan`; a staged objective's rows are "stage<s>/<phase>") is lowered and compiled
through the same step builder `launch.train` uses (distill.engine.Engine), against the
engine's abstract state (`Engine.abstract_state`: ShapeDtypeStructs with the real
shardings, no memory). The teacher is abstract too: the config's `model.*` architecture, or the
architecture of `teacher.checkpoint` when one is given (its weights are read for their shapes).

Per phase it reports XLA's memory analysis of the compiled step per chip (arguments, outputs,
aliased (donated) bytes, temporaries; peak = arguments + outputs - aliased + temporaries), the
chip's HBM and whether the step fits; plus parameter counts and bytes per network. The last
line is JSON:

    {"config": ..., "topology": "v5p:4x4x4", "chips": 64, "device_kind": "TPU v5",
     "mesh": {"data": 8, "fsdp": 8, "tensor": 1}, "bytes_per_chip": <the largest phase peak>,
     "hbm_per_chip": ..., "hbm_per_chip_bytes": <the same, kept for older readers>,
     "params": {net: count}, "param_bytes": {net: bytes}, "fits": true,
     "phases": {name: {"compile_s", "argument_bytes", "output_bytes", "alias_bytes",
                       "temp_bytes", "peak_bytes_per_chip", "fits", "flops_per_chip"}}}

A step that does not fit is reported (fits: false, exit 0; when the TPU compiler itself refuses
it for HBM, the row has its message under "error" instead of the byte counts); any other compile
error exits 1 with the compiler's message.
"""
from __future__ import annotations

import json
import os
import sys
import time

from launch import cli

# HBM per chip by device kind (lower-case substrings of jax's device_kind), bytes.
GIB = 1024 ** 3
HBM = (("v6 lite", 32 * GIB), ("v6e", 32 * GIB), ("v5 lite", 16 * GIB), ("v5e", 16 * GIB),
       ("v5p", 95 * GIB), ("v5", 95 * GIB), ("v4", 32 * GIB), ("v3", 16 * GIB))


def hbm_bytes(device_kind: str) -> int:
  kind = device_kind.lower()
  for key, size in HBM:
    if key in kind:
      return size
  return 0


def _extra(p):
  p.add_argument("--topology", required=True, help="e.g. v5p:4x4x4, v6e:8x8")


def topology_devices(name: str):
  """The abstract devices of a TPU topology (needs libtpu; no TPU)."""
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Several processes (pytest workers) may compile at once; no TPU is opened here.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import importlib.util  # pylint: disable=import-outside-toplevel
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError("--topology: libtpu is not installed (pip install -e '.[tpu]')")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  try:
    return topologies.get_topology_desc(name, "tpu").devices
  except Exception as e:  # noqa: BLE001 - libtpu's message names the problem
    raise ValueError(f"--topology: {name!r} is not a TPU topology libtpu knows ({e})") from None


def compile_step(step, *args):
  """Lowers and compiles one jitted phase step for its arguments' (abstract) shardings."""
  return step.lower(*args).compile()


def compile_config(config, topology: str) -> dict:
  import jax
  from distill import runlog
  from distill import sharding as shd
  from distill import teacher as teacher_lib
  from distill import trainer
  from distill.engine import Engine
  from distill.objective import make_time
  from distill.state import tree_bytes
  devices = topology_devices(topology)
  config = trainer.prepare_config(config, num_devices=len(devices))
  trainer.check_platform(config, devices[0].platform)
  teacher = None
  if config.teacher.checkpoint:
    teacher = teacher_lib.from_config(config, platform="tpu")
  if teacher is None:
    from launch.bench import random_teacher  # pylint: disable=import-outside-toplevel
    teacher = random_teacher(config, abstract=True)
  mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
  engine = Engine(config, teacher=teacher, mesh=mesh)
  state, frozen = engine.abstract_state()
  kind = devices[0].device_kind
  hbm = hbm_bytes(kind)
  nets = {**state.params, **frozen}
  count = lambda tree: int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
  phases = {}
  for stage, i, phase, label in engine.phase_plan():
    t0 = time.perf_counter()
    try:
      compiled = compile_step(engine.phase_step(stage, i), state, frozen,
                              engine.abstract_phase_batch(phase),
                              make_time(phase.start, 0, stage, 0))
    except Exception as e:  # noqa: BLE001 - the TPU compiler refuses steps that cannot fit
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      phases[label] = {"compile_s": round(time.perf_counter() - t0, 2), "fits": False,
                       "error": runlog.first_line(str(e), 500)}
      continue
    row = {"compile_s": round(time.perf_counter() - t0, 2)}
    mem = compiled.memory_analysis()
    for key in ("argument", "output", "alias", "temp"):
      row[f"{key}_bytes"] = int(getattr(mem, f"{key}_size_in_bytes", 0) or 0)
    row["peak_bytes_per_chip"] = (row["argument_bytes"] + row["output_bytes"]
                                  - row["alias_bytes"] + row["temp_bytes"])
    row["fits"] = bool(hbm) and row["peak_bytes_per_chip"] <= hbm
    try:
      row["flops_per_chip"] = float(compiled.cost_analysis().get("flops", 0.0))
    except Exception:  # noqa: BLE001 - not every backend reports it
      row["flops_per_chip"] = 0.0
    phases[label] = row
  peaks = [p["peak_bytes_per_chip"] for p in phases.values() if "peak_bytes_per_chip" in p]
  return {"config": config.objective.name, "topology": topology, "chips": int(mesh.size),
          "device_kind": kind, "mesh": {k: int(v) for k, v in mesh.shape.items()},
          "batch_size": int(config.train.batch_size),
          # DESIGN.md's keys: the largest phase's peak, the chip's HBM
          "bytes_per_chip": max(peaks) if peaks else None, "hbm_per_chip": hbm,
          "hbm_per_chip_bytes": hbm,
          "params": {n: count(p) for n, p in nets.items()},
          "param_bytes": {n: tree_bytes(p) for n, p in nets.items()},
          "fits": all(p["fits"] for p in phases.values()), "phases": phases}


def main(argv: list[str]) -> int:
  args = cli.parse(argv + ["--workdir", "-"] if "--workdir" not in argv else argv,
                   prog="launch.aot", need_config=True, extra=_extra)
  cli.setup(args)
  from distill import config as config_lib
  from distill import trainer
  try:
    config = trainer.load_config(args.config, list(args.overrides))
    result = compile_config(config, args.topology)
  except (config_lib.ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  print("| phase | compile s | peak GiB / chip | HBM GiB | fits |")
  print("|---|---|---|---|---|")
  for name, p in result["phases"].items():
    peak = f"{p['peak_bytes_per_chip'] / GIB:.2f}" if "peak_bytes_per_chip" in p else "-"
    print(f"| {name} | {p['compile_s']:.1f} | {peak} | "
          f"{result['hbm_per_chip_bytes'] / GIB:.0f} | {p['fits']} |")
    if "error" in p:
      print(f"  {name}: {p['error']}")
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
