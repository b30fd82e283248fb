"""The embedded default (`make demo`): a full run on bundled data, no download, no GPU.

Trains the toy 2-D teacher (configs/toy/teacher.py: a class-conditional rectified-flow MLP on an
8-mode Gaussian mixture) with the same engine, checkpoints and evaluation every recipe uses, then
prints the eval.json table: the teacher at one Euler step and at its reference step count, with
the real-vs-real data floor beside them. Re-running resumes (or reuses) the finished run.

    python -m launch.demo [--workdir runs/demo] [--data gmm|checkerboard|moons|spiral]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from launch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="launch.demo")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo"))
  p.add_argument("--data", default="gmm")
  args = p.parse_args(argv)
  cli.setup(argparse.Namespace(log_level="WARNING"))
  from distill import trainer
  workdir = os.path.join(args.workdir, f"teacher_{args.data}")
  config = trainer.prepare_config(
      trainer.load_config(os.path.join(ROOT, "configs", "toy", f"teacher.py:{args.data}")))
  summary = trainer.train(config, workdir)
  report = summary.get("eval")
  if report is None:
    with open(os.path.join(workdir, "eval.json")) as f:
      report = json.load(f)
  cli.print_eval(report)
  print(f"\nrun directory: {workdir}  (samples/ holds the PNG panels)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
