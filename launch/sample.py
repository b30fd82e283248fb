"""Sample from a run: `python -m launch.sample --workdir DIR [--network student|teacher]
[--sampler NAME] [--steps N] [--guidance W] [--class C] [--seed S] [--num K] [--out FILE.png]`.

Defaults: the run's student with its sampler (`eval.sampler`, else its objective's; `--sampler`
takes a solver name or a spec such as "tcd(gamma=0.0)") (a teacher-training run: its teacher
with Euler at `eval.teacher_steps`). Writes a PNG grid (image data) or a scatter plot (2-D toy
data) and a `.npy` of the raw samples beside it.
"""
from __future__ import annotations

import os
import re
import sys

import numpy as np

from launch import cli


def _extra(p):
  p.add_argument("--network", default="")
  p.add_argument("--sampler", default="")
  p.add_argument("--steps", type=int, default=0)
  p.add_argument("--guidance", type=float, default=1.0)
  p.add_argument("--class", dest="class_label", type=int, default=-1)
  p.add_argument("--prompt_embeds", default="")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--out", default="")


def main(argv: list[str]) -> int:
  args = cli.parse(argv, prog="launch.sample", need_config=False, extra=_extra)
  cli.setup(args)
  from distill import evaluation, images, trainer
  try:
    if args.prompt_embeds:
      raise ValueError("--prompt_embeds: text-conditioned runs are not supported by this "
                       "checkout's models yet")
    engine, state, frozen, step = trainer.open_run(args.workdir, args.overrides)
    obj = engine.objective
    role = args.network or ("teacher" if obj.evaluates_as == "teacher" else "student")
    net = trainer.network_for_role(engine, role)
    info = engine.nets[net]
    is_teacher_role = role == "teacher"
    sampler = args.sampler or (evaluation.teacher_solver(info.process) if is_teacher_role
                               else trainer.student_sampler(engine))
    steps = args.steps or (engine.config.eval.teacher_steps if is_teacher_role
                           else int(engine.config.eval.steps[0]))
    labels = None
    if args.class_label >= 0:
      if not info.num_classes or args.class_label >= info.num_classes:
        raise ValueError(f"--class: {args.class_label} is not a class of this model "
                         f"({info.num_classes} classes)")
      labels = np.full((args.num,), args.class_label, np.int32)
  except (ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)
  x, sec = evaluation.generate(ctx, net, params[net], n=args.num, seed=args.seed, solver=sampler,
                               steps=steps, shape=engine.source.shape, guidance=args.guidance,
                               labels=labels)
  out = args.out or os.path.join(args.workdir, "samples",
                                 f"{role}_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', sampler)}_"
                                 f"{steps}steps_seed{args.seed}.png")
  title = f"{role} {sampler} {steps} step{'s' if steps > 1 else ''} (step {step})"
  images.save_panels(out, [(title, x)])
  np.save(os.path.splitext(out)[0] + ".npy", x)
  print(f"wrote {out} ({args.num} samples, {1000 * sec:.3f} ms/sample)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
