"""Evaluate a run: `python -m launch.evaluate --workdir DIR [--steps N ...] [--num K]
[--teacher_steps N] [--metric NAME]`.

Samples the teacher (1 step and its reference step count) and the student (each of the given
step counts) from the same noise, scores them with the dataset's metric (toy 2-D: sliced
Wasserstein distance), writes DIR/eval.json (DESIGN.md's layout) and prints the table.
"""
from __future__ import annotations

import os
import sys

from launch import cli


def _extra(p):
  p.add_argument("--steps", type=int, nargs="*", default=None)
  p.add_argument("--num", type=int, default=0)
  p.add_argument("--teacher_steps", type=int, default=0)
  p.add_argument("--metric", default="")


def main(argv: list[str]) -> int:
  args = cli.parse(argv, prog="launch.evaluate", need_config=False, extra=_extra)
  cli.setup(args)
  from distill import runlog, trainer
  overrides = list(args.overrides)
  if args.steps:
    overrides.append(f"eval.steps={tuple(args.steps)}")
  if args.num:
    overrides.append(f"eval.num_samples={args.num}")
  if args.teacher_steps:
    overrides.append(f"eval.teacher_steps={args.teacher_steps}")
  if args.metric:
    overrides.append(f"eval.metric={args.metric}")
  try:
    engine, state, frozen, step = trainer.open_run(args.workdir, overrides)
  except (ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  report = trainer.run_evaluation(engine, state, frozen, step)
  runlog.write_json(os.path.join(args.workdir, "eval.json"), report)
  cli.print_eval(report)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
