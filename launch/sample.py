"""Sample from a run: `python -m launch.sample --workdir DIR [--network student|teacher]
[--sampler NAME] [--steps N] [--guidance W] [--class C | --prompt_embeds FILE [--rows 0,5,7]]
[--seed S] [--num K] [--out FILE.png]`.

Defaults: the run's student with its sampler (`eval.sampler`, else its objective's; `--sampler`
takes a solver name or a spec such as "tcd(gamma=0.0)") at the step count its objective trains
it for at the run's stage (progressive, guided, segmented_cm: a run stopped in its 16 -> 8
stage samples 8 steps), else the first of `eval.steps`; the teacher with its reference solver
at `eval.teacher_steps` (a teacher-training run: its teacher). Without `--class`, a run
evaluated class-conditionally (`eval.class_conditional`) samples classes drawn uniformly with
`--seed`, as its eval rows do; other runs sample the null class. `--guidance` defaults to the
run's `eval.guidance` where its evaluation samples with it (the teacher's CFG, a student that
takes w as its input, e.g. LCM's w-embedded UNet: the w of its eval rows and of its export,
export.json "guidance"), else 1; CFG with nothing to guide (no `--class`, no prompts) stops in
one line when asked for and is off by default. Writes a PNG grid (image data) or a scatter plot
(2-D toy data) and a `.npy` of the raw samples beside it.

Text-to-image runs sample from the prompts of the run's data (`Source.conditions(num, seed)`),
or from `--prompt_embeds`: a .npy of one prompt's embeddings (L, D) or of n prompts (n, L, D),
or a caption-embedding directory (distill/data/latents.py: `embeds.npy` (C, L, D), optional
`mask.npy` (C, L) and `pooled.npy` (C, Dp)) whose rows `--rows` picks (default: the first
--num). Prompts are cycled over the --num samples. An input the network needs that the file
lacks stops with one line naming it, except SDXL's `time_ids`, which default to the data's
(the image size, no crop).
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
  p.add_argument("--steps", type=int, default=None)
  p.add_argument("--guidance", type=float, default=None)
  p.add_argument("--class", dest="class_label", type=int, default=None)
  p.add_argument("--prompt_embeds", default="")
  p.add_argument("--rows", default="")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num", type=int, default=64)
  p.add_argument("--out", default="")


# Batch key -> its file in a caption-embedding directory (distill/data/latents.py).
PROMPT_FILES = {"text_embeds": "embeds.npy", "text_mask": "mask.npy",
                "pooled_text_embeds": "pooled.npy"}


def parse_rows(rows: str, count: int, path: str) -> np.ndarray:
  """`--rows` "0,5,7" -> caption indices, each checked against the `count` captions of `path`."""
  try:
    idx = [int(r) for r in rows.split(",") if r.strip()]
  except ValueError:
    raise ValueError(f"--rows: expected caption rows such as 0,5,7, got {rows!r}") from None
  bad = [i for i in idx if not 0 <= i < count]
  if not idx or bad:
    raise ValueError(f"--rows: {bad[0] if bad else rows!r} is not a caption row of {path} "
                     f"({count} captions)")
  return np.asarray(idx, np.int64)


def _load_npy(path: str) -> np.ndarray:
  try:
    return np.load(path)
  except (ValueError, OSError) as e:
    raise ValueError(f"--prompt_embeds: {path} is not a readable .npy file ({e})") from None


def load_prompt_embeds(path: str, rows: str = "", num: int = 1) -> dict[str, np.ndarray]:
  """The prompts of `--prompt_embeds` as batch keys, one row per prompt: a .npy (L, D) or
  (n, L, D) -> `text_embeds`; a caption-embedding directory -> rows `rows` (default: the first
  `num`) of its embeds.npy / mask.npy / pooled.npy. Bad shapes: one line naming the file."""
  if not os.path.isdir(path):
    if rows:
      raise ValueError(f"--rows: picks rows of a caption-embedding directory; --prompt_embeds "
                       f"{path} is not a directory")
    if not os.path.isfile(path):
      raise ValueError(f"--prompt_embeds: {path!r} does not exist")
    x = _load_npy(path)
    if x.ndim not in (2, 3):
      raise ValueError(f"--prompt_embeds: {path} has shape {x.shape}, expected (L, D) for one "
                       "prompt or (n, L, D)")
    return {"text_embeds": x[None] if x.ndim == 2 else x}
  from distill.data.latents import load_text_embeds, text_rows  # pylint: disable=import-outside-toplevel
  text = load_text_embeds(path, null_prompt="zeros", key="--prompt_embeds")
  count = len(text["embeds"])
  idx = parse_rows(rows, count, path) if rows else np.arange(min(num, count))
  return text_rows(text, idx)


def prompt_conditions(prompts: dict, need: dict, path: str, num: int) -> dict[str, np.ndarray]:
  """`num` rows of conditioning (prompts cycled) with the keys the network takes (`need`: one
  row of the run's own conditions; a text mask from the file is kept too). A missing input or a
  per-prompt shape other than the data's: one line naming the file and key. Missing `time_ids`
  are the data's."""
  prompts = dict(prompts)
  for k, v in need.items():
    if k in prompts:
      continue
    if k != "time_ids":
      where = f" ({PROMPT_FILES[k]})" if k in PROMPT_FILES else ""
      raise ValueError(f"--prompt_embeds: {path} has no {k}{where}, which this network needs")
    prompts[k] = np.broadcast_to(v[:1], (len(prompts["text_embeds"]),) + v.shape[1:])
  keep = [k for k in prompts if k in need or k == "text_mask"]
  for k in keep:
    if k in need and prompts[k].shape[1:] != need[k].shape[1:]:
      raise ValueError(f"--prompt_embeds: {path}: {k} has shape {prompts[k].shape[1:]} per "
                       f"prompt, expected {need[k].shape[1:]} (this run's data)")
  idx = np.arange(num) % len(prompts["text_embeds"])
  return {k: np.asarray(prompts[k][idx], need[k].dtype if k in need else None) for k in keep}


def run_conditions(source, args) -> dict[str, np.ndarray]:
  """The sampling conditions of a text-to-image run: `--prompt_embeds`, else the data's own
  prompts (`Source.conditions(num, seed)`); {} for data without prompts."""
  from distill import evaluation  # pylint: disable=import-outside-toplevel
  if not args.prompt_embeds:
    if args.rows:
      raise ValueError("--rows: picks caption rows of --prompt_embeds DIR, which is not given")
    return evaluation.network_conditions(
        evaluation.source_conditions(source, args.num, args.seed))
  need = evaluation.network_conditions(evaluation.source_conditions(source, 1, 0))
  if "text_embeds" not in need:
    raise ValueError("--prompt_embeds: this run's data has no prompts (not a text-to-image run)")
  prompts = load_prompt_embeds(args.prompt_embeds, args.rows, args.num)
  return prompt_conditions(prompts, need, args.prompt_embeds, args.num)


def _image_extensions() -> set[str]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}


def main(argv: list[str]) -> int:
  args = cli.parse(argv, prog="launch.sample", need_config=False, extra=_extra)
  cli.setup(args)
  from distill import evaluation, images, solvers, trainer
  try:
    if args.prompt_embeds and args.class_label is not None:
      raise ValueError("--class and --prompt_embeds: give one of them")
    if args.out and os.path.splitext(args.out)[1].lower() not in _image_extensions():
      raise ValueError(f"--out {args.out}: expected an image file name (.png, .jpg, ...); the "
                       "samples are also saved beside it as .npy")
    cli.distributed_from_overrides(args.overrides)   # multi-host: before JAX starts
    engine, state, frozen, step = trainer.open_run(args.workdir, args.overrides)
    obj = engine.objective
    role = args.network or ("teacher" if obj.evaluates_as == "teacher" else "student")
    net = trainer.network_for_role(engine, role)
    info = engine.nets[net]
    is_teacher_role = role == "teacher"
    sampler = args.sampler or (evaluation.teacher_solver(info.process) if is_teacher_role
                               else trainer.student_sampler(engine))
    solvers.check_sampler(sampler, "--sampler")
    if args.steps is not None and args.steps < 1:
      raise ValueError(f"--steps: must be >= 1, got {args.steps}")
    if args.num < 1:
      raise ValueError(f"--num: must be >= 1, got {args.num}")
    steps = args.steps or (engine.config.eval.teacher_steps if is_teacher_role
                           else trainer.student_steps(engine, state))
    evaluation.check_steps(info.process, (steps,), "--steps")
    labels = None
    if args.class_label is not None:
      if not info.num_classes or not 0 <= args.class_label < info.num_classes:
        raise ValueError(f"--class: {args.class_label} is not a class of this model "
                         f"({info.num_classes} classes)")
      labels = np.full((args.num,), args.class_label, np.int32)
    conds = run_conditions(engine.source, args)
    if labels is None and not conds and engine.config.eval.class_conditional:
      labels = evaluation.sample_labels(info.num_classes, args.num, args.seed)   # as eval rows
  except (ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  ctx = trainer.context_for(engine, state, frozen)
  w_input = evaluation.embeds_guidance(ctx, net)
  nothing_to_guide = not w_input and labels is None and not conds
  guidance = args.guidance
  if guidance is None:   # as the evaluation samples this network
    guidance = 1.0 if nothing_to_guide else trainer.eval_guidance(engine, ctx, net,
                                                                  is_teacher_role)
  elif guidance != 1.0 and nothing_to_guide:
    return cli.fail(ValueError(
        f"--guidance {guidance:g}: classifier-free guidance needs a condition to guide "
        "(--class N; a text-to-image run guides its prompts); without one every sample is "
        "the null condition's, the same at any scale"))
  params = trainer.eval_params(engine, state, frozen)
  x, sec = evaluation.generate(ctx, net, params[net], n=args.num, seed=args.seed, solver=sampler,
                               steps=steps, shape=engine.source.shape, guidance=guidance,
                               labels=labels, conds=conds)
  which = (f"_class{args.class_label}" if args.class_label is not None else "") + (
      f"_w{guidance:g}" if guidance != 1.0 else "")
  out = args.out or os.path.join(args.workdir, "samples",
                                 f"{role}_{re.sub(r'[^A-Za-z0-9_.=-]+', '_', sampler)}_"
                                 f"{steps}steps{which}_seed{args.seed}.png")
  title = (f"{role} {sampler} {steps} step{'s' if steps > 1 else ''}"
           f"{f' w={guidance:g}' if guidance != 1.0 else ''} (step {step})")
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:   # every process holds the same samples
    images.save_panels(out, [(title, x)])
    np.save(os.path.splitext(out)[0] + ".npy", x)
    print(f"wrote {out} ({args.num} samples, {1000 * sec:.3f} ms/sample)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
