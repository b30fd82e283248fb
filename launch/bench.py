"""Benchmark a config's phase steps: median step time after warm-up, img/s, MFU, peak memory.

    python -m launch.bench --config configs/toy/teacher.py [--config.a.b=v ...] [--steps 10]
        [--warmup 2] [--random_teacher] [--compare model.attention=xla,pallas ...]

Every phase of the config's objective is compiled through the same step builder
`launch.train` uses (distill.engine.Engine) and timed on the config's data source
(`data.name=synthetic` gives Gaussian batches of any shape). A distillation config without a
teacher checkpoint can run with `--random_teacher` (a randomly initialised teacher of
`config.model`'s architecture). `--compare KEY=v1,v2` (repeatable) times every combination
side by side in one process. The last line is JSON.

MFU counts the model FLOPs of a standard train step (3 x the forward FLOPs of every trained
network per example, from the models' own `flops_per_example`) against the device's peak;
`xla_tflops` is XLA's own count of the compiled step where the backend reports one, and
`xla_temp_bytes` the size of its temporary buffers (the memory figure a CPU run has, where the
device reports no peak).
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
import time

from launch import cli


def _extra(p):
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--random_teacher", action="store_true")
  p.add_argument("--compare", action="append", default=[])


def random_teacher(config, abstract: bool = False):
  """A Teacher of config.model's architecture with random weights (benchmarks only); with
  `abstract` its params are shapes only (jax.ShapeDtypeStruct: ahead-of-time compiles)."""
  import jax
  import numpy as np
  from flax.core import meta
  from distill import processes as procs
  from distill import teacher as teacher_lib
  from distill.data import sources
  from distill.engine import (init_inputs, module_from_config, num_classes_of,
                              resolve_model_config)
  source = sources.make_source(config.data, config.seed)
  from models.registry import MODELS
  mcfg = resolve_model_config(config.model.to_dict(), source)
  runtime = teacher_lib.runtime_of(config)   # built in its runtime layout directly
  teacher_lib.check_runtime(MODELS.get(mcfg["name"]), mcfg["name"], runtime)
  mcfg = {**mcfg, **runtime}
  module = module_from_config(mcfg)
  args, kw = init_inputs(module, source, num_classes_of(mcfg))
  init = lambda r: meta.unbox(module.init(r, *args, **kw)["params"])
  key = jax.random.PRNGKey(config.seed)
  if abstract:
    params = jax.eval_shape(init, key)
  else:
    params = jax.tree_util.tree_map(np.asarray, jax.device_get(jax.jit(init)(key)))
  return teacher_lib.Teacher(module=module, params=params, model_config=mcfg,
                             process=procs.make_process(**config.process.to_dict()),
                             prediction=mcfg["prediction"], num_classes=num_classes_of(mcfg),
                             reference={"abstract" if abstract else "random": True})


def _progress(line: str) -> None:
  """One progress line on stderr (a run killed at its time limit shows where it was)."""
  print(f"launch.bench: {line}", file=sys.stderr, flush=True)


def peak_memory_bytes():
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def _temp_bytes(compiled):
  """XLA's static size of the compiled step's temporary buffers (None where not reported): the
  memory figure a CPU run has, where the device reports no peak."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def bench_config(config, *, steps: int, warmup: int, use_random_teacher: bool) -> dict:
  import jax
  from distill import teacher as teacher_lib
  from distill import trainer
  from distill.engine import Engine
  from distill.objective import make_time
  config = trainer.prepare_config(config)
  trainer.check_platform(config)
  teacher = teacher_lib.from_config(config)
  if teacher is None and use_random_teacher:
    teacher = random_teacher(config)
  engine = Engine(config, teacher=teacher)
  state, frozen = engine.init_state()
  bs = int(config.train.batch_size)
  peak = trainer._peak_flops()  # pylint: disable=protected-access
  phases = {}
  for stage, i, phase, label in engine.phase_plan():
    fn = engine.phase_step(stage, i)
    batch = engine.phase_batch(0, phase)
    t = make_time(phase.start, 0, stage, 0)
    _progress(f"{label}: compiling")
    t0 = time.perf_counter()
    compiled = fn.lower(state, frozen, batch, t).compile()
    compile_s = time.perf_counter() - t0
    _progress(f"{label}: compiled in {compile_s:.0f} s; timing {warmup} + {steps} steps")
    try:
      xla_flops = float(compiled.cost_analysis().get("flops", 0.0))
    except Exception:  # noqa: BLE001 - not every backend reports it
      xla_flops = 0.0
    xla_temp = _temp_bytes(compiled)
    times = []
    for k in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = fn(state, frozen, batch, t)
      jax.block_until_ready(metrics)
      if k >= warmup:
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    model_flops = 3 * sum(engine.nets[n].flops_per_example for n in phase.trains) * bs
    row = {"step_ms": 1000 * med, "img_per_s": bs / med, "compile_s": compile_s,
           "model_gflops_per_step": model_flops / 1e9,
           "xla_tflops": xla_flops / 1e12, "xla_temp_bytes": xla_temp}
    if peak and model_flops:
      row["mfu"] = model_flops / med / (peak * jax.device_count())
    phases[label] = row
  model = config.model.to_dict()
  return {"config": config.objective.name, "batch_size": bs, "devices": jax.device_count(),
          "device": jax.devices()[0].device_kind, "peak_memory_bytes": peak_memory_bytes(),
          "model": {k: model[k] for k in ("name", "dtype", "attention", "jvp_attention", "remat",
                                          "scan_blocks", "scan_unroll") if k in model},
          "phases": phases}


def main(argv: list[str]) -> int:
  args = cli.parse(argv + ["--workdir", "-"] if "--workdir" not in argv else argv,
                   prog="launch.bench", need_config=True, extra=_extra)
  cli.setup(args)
  from distill import config as config_lib
  from distill import trainer
  grid = []
  rows = []
  try:
    if args.steps < 1 or args.warmup < 0:
      raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and "
                       f"{args.warmup}")
    for item in args.compare:
      key, sep, values = item.partition("=")
      grid.append([f"{key}={v}" for v in values.split(",") if v])
      if not sep or not grid[-1]:
        raise ValueError(f"--compare {item!r}: expected KEY=V1,V2,... (a config key and the "
                         "values to compare)")
    combos = list(itertools.product(*grid)) if grid else [()]
    configs = []
    for combo in combos:   # every variant is checked before anything compiles
      config = trainer.load_config(args.config, list(args.overrides) + list(combo))
      trainer.check_platform(trainer.prepare_config(config))
      configs.append(config)
    for combo, config in zip(combos, configs):
      result = bench_config(config, steps=args.steps, warmup=args.warmup,
                            use_random_teacher=args.random_teacher)
      result["settings"] = list(combo)
      rows.append(result)
  except (config_lib.ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  print("| settings | phase | step ms | img/s | MFU | compile s |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    for name, p in r["phases"].items():
      mfu = f"{100 * p['mfu']:.1f}%" if "mfu" in p else "-"
      print(f"| {' '.join(r['settings']) or 'config'} | {name} | {p['step_ms']:.2f} | "
            f"{p['img_per_s']:.1f} | {mfu} | {p['compile_s']:.1f} |")
  print(json.dumps(rows if grid else rows[0]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
