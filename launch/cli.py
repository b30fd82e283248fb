"""Shared command-line handling of the launch scripts.

`--config FILE[:arg]`, `--workdir DIR` and any number of `--config.a.b=value` (or
`--config.a.b value`) overrides. Errors in the user's input print one line and exit 2.
"""
from __future__ import annotations

import argparse
import logging
import sys


def parse(argv: list[str], *, prog: str, need_config: bool, extra=None) -> argparse.Namespace:
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
  p = argparse.ArgumentParser(prog=prog)
  p.add_argument("--config", required=need_config, help="configs/X.py[:arg]")
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--log_level", default="WARNING")
  if extra is not None:
    extra(p)
  args = p.parse_args(rest)
  args.overrides = overrides
  return args


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
  msg = e.args[0] if getattr(e, "args", None) else str(e)
  parts = [p.strip() for p in str(msg).splitlines() if p.strip()]
  print(f"error: {' '.join(parts)}", file=sys.stderr)  # one line, every detail kept
  return 2


def print_eval(report: dict, file=None) -> None:
  """The eval.json results as a markdown table."""
  file = file or sys.stdout
  metric = report["metric"]
  print(f"\n| network | steps | NFE | {metric} | ms/sample |", file=file)
  print("|---|---|---|---|---|", file=file)
  for key, row in report["results"].items():
    net, _, steps = key.partition("_steps_")
    print(f"| {net} | {steps} | {row['nfe']} | {row[metric]:.4f} | "
          f"{1000 * row.get('sec_per_sample', 0.0):.3f} |", file=file)
  print(f"| real data (floor) | - | - | {report['data_floor']:.4f} | - |", file=file)
  print(f"\n{metric} over {next(iter(report['results'].values()))['num_samples']} samples, "
        f"step {report['step']}", file=file)
