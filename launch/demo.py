"""The embedded default (`make demo`): a real distillation, end to end, on a laptop CPU.

    python -m launch.demo                          # sCM, the objective that measures best here
    python -m launch.demo --objective dmd2         # or sid; any --config.a.b=v override
    python -m launch.demo --retrain_teacher        # retrain and re-ship the digits teacher
        [--teacher_config.a.b=v ...]               # (with overrides of configs/demo/teacher.py)

1. The teacher: a small class-conditional rectified-flow DiT on the 1,797 bundled scikit-learn
   digits (8x8), shipped in `configs/demo/teacher_ckpt` (converted Orbax, with the config it
   was trained by, the digits' data hash and its cached eval rows). It is retrained from
   `configs/demo/teacher.py` (about 35 minutes on 2 cores) only when that directory is missing,
   was trained on other data, or `--retrain_teacher` asks; a retrain replaces the shipped
   teacher only once the new one is complete.
2. The distillation: `configs/demo/<objective>.py` in `<workdir>/<objective>`, with a progress
   bar. Running the command again reuses (or resumes) the run.
3. The evaluation (eval.json, DESIGN.md's layout): Frechet distance in a small digit
   classifier's features (`fd`), class coverage and time per sample, for the teacher at 1 and
   32 Euler steps and the student at 1, 2 and 4 steps, beside the real-vs-real data floor.
4. The report: `<workdir>/<objective>/report.md` (the table, printed at the end too) and the
   sample grid `<workdir>/<objective>/samples/step_*.png` (real digits, the teacher and the
   student side by side; one digit class per column).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

from launch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs", "demo")
OBJECTIVES = ("scm", "dmd2", "sid")
DEFAULT_OBJECTIVE = "scm"   # docs/results_demo.md: why


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
  p = argparse.ArgumentParser(prog="launch.demo", description=__doc__.splitlines()[0],
                              allow_abbrev=False)
  p.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=OBJECTIVES)
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "demo"))
  p.add_argument("--teacher", default=os.path.join(CONFIGS, "teacher_ckpt"),
                 help="the shipped teacher directory (read, or written when retrained)")
  p.add_argument("--retrain_teacher", action="store_true")
  p.add_argument("--log_level", default="WARNING")
  args, rest = p.parse_known_args(argv)
  args.teacher_overrides, overrides = [], []
  for a in rest:
    if a.startswith("--teacher_config."):
      args.teacher_overrides.append(a[len("--teacher_config."):])
    elif a.startswith("--config."):
      overrides.append(a[len("--config."):])
    else:
      p.error(f"unrecognized argument {a!r} (overrides are --config.a.b=value for the "
              "distillation, --teacher_config.a.b=value for a teacher (re)training)")
  return args, overrides


def shipped_teacher_problem(path: str) -> str:
  """Why the teacher at `path` cannot be used ("" when it can)."""
  from distill import teacher as teacher_lib
  if not teacher_lib.is_run_dir(path):
    return f"no teacher at {path}"
  with open(os.path.join(path, "config.json")) as f:
    shipped = json.load(f).get("provenance", {}).get("data_hash")
  want = data_hash(teacher_config())
  if shipped != want:
    return f"the teacher at {path} was trained on other data ({shipped} != {want})"
  return ""


def data_hash(config) -> str:
  """The content hash of the data a config trains on (recorded with a shipped teacher)."""
  from distill.data import sources
  return sources.make_source(config.data, config.seed).content_hash()


def teacher_config(overrides=()):
  from distill import trainer
  return trainer.load_config(os.path.join(CONFIGS, "teacher.py"), overrides)


def train_and_ship_teacher(out: str, run_dir: str, overrides=()) -> None:
  """Trains configs/demo/teacher.py in `run_dir`, evaluates it and ships it to `out`
  (converted Orbax + provenance + eval cache); `out` is replaced only when all is written."""
  from distill import runlog, trainer
  from distill import teacher as teacher_lib
  config = teacher_config([*overrides, "eval.at_end=False"])
  trainer.train(config, run_dir)
  engine, state, frozen, step = trainer.open_run(run_dir)
  cache: dict = {}
  report = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  runlog.write_json(os.path.join(run_dir, "eval.json"), report)
  cli.print_eval(report)
  teacher = teacher_lib.load_teacher(run_dir, "ema")
  provenance = {"trained_by": "configs/demo/teacher.py", "run": os.path.abspath(run_dir),
                "data_hash": data_hash(config),
                "config": config.to_dict(), "eval": report}
  staged = out + ".new"
  if os.path.exists(staged):
    shutil.rmtree(staged)
  teacher_lib.write_converted(teacher, staged, provenance=provenance,
                              files={trainer.TEACHER_EVAL_CACHE: cache})
  if os.path.exists(out):
    old = out + ".old"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old)
  else:
    os.replace(staged, out)
  print(f"teacher shipped to {out}")


def write_report(workdir: str, objective: str, report: dict, teacher: str) -> str:
  grids = sorted(glob.glob(os.path.join(workdir, "samples", "*.png")))
  lines = [f"# Demo: digits DiT teacher -> {objective} student", "",
           f"    python -m launch.demo --objective {objective}", "",
           cli.eval_table(report), "",
           "fd: Frechet distance in the digit classifier's features (lower is better); "
           "vs teacher: fd / fd of the teacher at its reference step count; coverage: share of "
           "the 10 classes generated at >= half their uniform share; class_entropy: of the "
           "predicted labels (uniform = 2.303).", "",
           f"teacher: {teacher}", f"run: {workdir}"]
  if grids:
    lines.append(f"samples (real | teacher | student 1, 2, 4 steps): {grids[-1]}")
  path = os.path.join(workdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def main(argv: list[str]) -> int:
  args, overrides = parse(argv)
  cli.setup(args)
  from distill import config as config_lib
  from distill import trainer
  try:
    problem = "--retrain_teacher" if args.retrain_teacher else shipped_teacher_problem(
        args.teacher)
    if problem:
      print(f"training the demo teacher ({problem})")
      train_and_ship_teacher(args.teacher, os.path.join(args.workdir, "teacher"),
                             args.teacher_overrides)
    # The demo owns its shipped teacher: teacher rows it computes (e.g. the ideal rows of
    # another objective) are kept in that teacher's cache for the next run.
    config = trainer.load_config(os.path.join(CONFIGS, f"{args.objective}.py"),
                                 [f"teacher.checkpoint={args.teacher}",
                                  "eval.update_teacher_cache=True", *overrides])
  except (config_lib.ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  workdir = os.path.join(args.workdir, args.objective)
  try:
    summary = trainer.train(config, workdir)
  except trainer.SetupError as e:
    return cli.fail(e)
  report = summary.get("eval")
  if report is None:
    with open(os.path.join(workdir, "eval.json")) as f:
      report = json.load(f)
  path = write_report(workdir, args.objective, report, args.teacher)
  print("\n" + cli.eval_table(report))
  print(f"\nreport: {path}\nsamples: {os.path.join(workdir, 'samples')}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
