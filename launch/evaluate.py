"""Evaluate a run: `python -m launch.evaluate --workdir DIR [--steps N ...] [--num K]
[--teacher_steps N] [--metric NAME | --metrics a,b,c] [--config.eval.KEY=VALUE ...]`.

Samples the teacher (1 step and its reference step count) and the student (each of the given
step counts) from the same noise, data-parallel over all devices, scores them with the dataset's
metric (toy 2-D: sliced Wasserstein distance) or the `--metrics` asked for, writes DIR/eval.json
(DESIGN.md's layout; every row holds the values of all metrics, the first is the report's
"metric") and prints the table. Image metrics (fid, sfid, is, pr, clip) read their files from
eval keys, e.g.

    python -m launch.evaluate --workdir W --metrics fid,is,pr --num 50000 \\
        --config.eval.inception_weights=/ckpt/pt_inception-2015-12-05-6726825d.pth \\
        --config.eval.reference_stats=/ckpt/imagenet256_ref.npz [--config.eval.vae=/ckpt/vae]

(distill/metrics/suite.py describes them; distill/config.py lists the keys). Bad input prints
one line and exits 2. Multi-host (launch/tpu_pod.sh, launch/slurm_gpu.sh): the
`--config.distributed.*` overrides initialise jax.distributed; every process samples its share
and process 0 writes eval.json.
"""
from __future__ import annotations

import os
import sys

from launch import cli


def _extra(p):
  p.add_argument("--steps", type=int, nargs="*", default=None)
  p.add_argument("--num", type=int, default=None, help="samples (eval.num_samples)")
  p.add_argument("--teacher_steps", type=int, default=None, help="eval.teacher_steps")
  p.add_argument("--metric", default="")
  p.add_argument("--metrics", default="", help="comma list, e.g. fid,is,pr (eval.metrics)")


def main(argv: list[str]) -> int:
  args = cli.parse(argv, prog="launch.evaluate", need_config=False, extra=_extra)
  cli.setup(args)
  from distill import runlog, trainer
  overrides = list(args.overrides)
  if args.steps:
    overrides.append(f"eval.steps={tuple(args.steps)}")
  if args.num is not None:   # checked with the config (>= 1)
    overrides.append(f"eval.num_samples={args.num}")
  if args.teacher_steps is not None:
    overrides.append(f"eval.teacher_steps={args.teacher_steps}")
  if args.metric:
    overrides.append(f"eval.metric={args.metric}")
  if args.metrics:
    names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    overrides.append(f"eval.metrics={tuple(names)!r}")
  from distill.metrics.suite import MetricError
  try:
    cli.distributed_from_overrides(overrides)   # multi-host: before JAX starts
    engine, state, frozen, step = trainer.open_run(args.workdir, overrides)
    trainer.check_eval_steps(engine)
  except (ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  if args.steps and engine.objective.evaluates_as == "teacher":
    print(f"note: {args.workdir} trains a teacher: its rows are the teacher at 1 and "
          f"eval.teacher_steps={engine.config.eval.teacher_steps} steps (--teacher_steps); "
          f"--steps is not used", file=sys.stderr)
  try:
    report = trainer.run_evaluation(engine, state, frozen, step)
  except MetricError as e:  # a missing file, a stale statistics file, too few samples
    return cli.fail(e)
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:   # every process holds the same report
    runlog.write_json(os.path.join(args.workdir, "eval.json"), report)
    cli.print_eval(report)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
