"""Shared command-line handling of the launch scripts.

`--config FILE[:arg]`, `--workdir DIR` and any number of `--config.a.b=value` (or
`--config.a.b value`) overrides. Errors in the user's input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse(argv: list[str], *, prog: str, need_config: bool, extra=None) -> argparse.Namespace:
  overrides, rest = split_overrides(argv)
  p = argparse.ArgumentParser(prog=prog)
  p.add_argument("--config", required=need_config, help="configs/X.py[:arg]")
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--log_level", default="WARNING")
  if extra is not None:
    extra(p)
  args = p.parse_args(rest)
  args.overrides = overrides
  return args


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(`a.b=value` overrides from `--config.a.b=value` / `--config.a.b value`, other args)."""
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      body = a[len("--config."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          _die(f"override {a}: missing value")
        body = f"{body}={argv[i + 1]}"
        i += 1
      overrides.append(body)
    else:
      rest.append(a)
    i += 1
  return overrides, rest


def setup(args: argparse.Namespace) -> None:
  logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                      format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:
    pass


def load_config(args: argparse.Namespace):
  from distill import trainer
  config = trainer.load_config(args.config, args.overrides)
  _maybe_distributed(config)
  return config


def distributed_from_overrides(overrides) -> None:
  """`jax.distributed.initialize` for a command that reads a run (sample, evaluate), as the
  `--config.distributed.*` overrides on its command line ask (what launch/tpu_pod.sh and
  launch/slurm_gpu.sh append); before anything starts JAX's backend. The run's recorded
  `distributed` section is not used: a pod's run read on a workstation must not wait for the
  pod's coordinator."""
  keys = [o for o in overrides if o.startswith("distributed.")]
  if not keys:
    return
  from distill import config as config_lib  # pylint: disable=import-outside-toplevel
  _maybe_distributed(config_lib.apply_overrides(config_lib.base_config(), keys))


def _maybe_distributed(config) -> None:
  d = config.get("distributed")
  if d is None or not d.initialize:
    return
  import jax
  kwargs = {}
  if d.coordinator_address:
    kwargs = dict(coordinator_address=d.coordinator_address, num_processes=d.num_processes,
                  process_id=d.process_id)
  jax.distributed.initialize(**kwargs)


def _die(msg: str) -> None:
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def fail(e: BaseException) -> int:
  if isinstance(e, OSError) and e.filename is not None:   # args[0] is only the errno
    msg = f"{e.filename}: {e.strerror or e}"
  else:
    msg = e.args[0] if getattr(e, "args", None) else str(e)
  parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
  print(f"error: {' '.join(parts)}", file=sys.stderr)  # one line, every detail kept
  return 2


ROW_INFO_KEYS = ("nfe", "num_samples", "sec_per_sample", "solver")


def eval_table(report: dict) -> str:
  """The eval.json results as a markdown table: the metric, its ratio to the teacher at its
  reference step count, any extra scores the metric reports (e.g. coverage), NFE, ms/sample."""
  metric = report["metric"]
  results = report["results"]
  ref = results.get(f"teacher_steps_{report.get('teacher_reference_steps')}", {}).get(metric)
  extras = sorted({k for row in results.values() for k in row
                   if k != metric and k not in ROW_INFO_KEYS})
  head = ["network", "steps", "NFE", metric] + (["vs teacher"] if ref else []) + extras
  lines = ["| " + " | ".join(head + ["ms/sample"]) + " |",
           "|" + "---|" * (len(head) + 1)]
  for key, row in results.items():
    net, _, steps = key.partition("_steps_")
    cells = [net, steps, str(row["nfe"]), f"{row[metric]:.4f}"]
    if ref:
      cells.append(f"{row[metric] / ref:.2f}x")
    cells += [f"{row[k]:.3f}" if k in row else "-" for k in extras]
    cells.append(f"{1000 * row.get('sec_per_sample', 0.0):.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  floor = ["real data (floor)", "-", "-", f"{report['data_floor']:.4f}"]
  floor += [f"{report['data_floor'] / ref:.2f}x"] if ref else []
  lines.append("| " + " | ".join(floor + ["-"] * (len(extras) + 1)) + " |")
  n = next(iter(results.values()))["num_samples"] if results else 0
  lines.append(f"\n{metric} over {n} samples, step {report['step']}")
  if any(k.startswith("ideal_steps_") for k in results):
    steps = report.get("teacher_reference_steps")
    lines.append(f"ideal: the student's sampler with the teacher's {steps}-step ODE as its "
                 "denoiser (an exact consistency student)")
  return "\n".join(lines)


def print_eval(report: dict, file=None) -> None:
  """Prints `eval_table(report)`."""
  print("\n" + eval_table(report), file=file or sys.stdout)