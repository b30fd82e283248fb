"""Weight conversion both ways.

    # diffusers/PyTorch -> a converted teacher (Orbax, loads with teacher.checkpoint=OUT)
    python -m launch.convert --diffusers path/to/DiT-XL-2-256 --out teachers/dit_xl2
    # ... naming the noise process where the scheduler config does not (dense-time flow)
    python -m launch.convert --diffusers path/to/sana_sprint_teacher --out teachers/sprint \
        --process "rectified_flow(timestep_scale=1.0, prediction='flow')"
    # a run's network -> a diffusers pipeline-layout directory: transformer/ (or unet/),
    # scheduler/ (its few-step sampler), lora/ (PEFT adapter of LoRA students), export.json;
    # with --vae also vae/ + model_index.json (DiTPipeline.from_pretrained(OUT) loads it)
    python -m launch.convert --workdir runs/x --network student --out export/student \
        [--vae path/to/sd-vae-ft-ema] [--sampler lcm] [--config.data.text_embeds=MOVED ...]
    # a SANA-Sprint student (configs/t2i/sana_sprint.py) -> SanaSprintPipeline + SCMScheduler;
    # export.json "pipeline_kwargs" per step count walk its own grid, "guidance" its CFG scale
    python -m launch.convert --workdir runs/sana_sprint --out export/sprint --vae $SANA/vae

A diffusers source may be a model directory (config.json + safetensors, sharded index too) or a
pipeline directory (transformer/ or unet/ plus scheduler/, whose config gives the noise process
and parameterisation). Conversion is strict: missing, unexpected or mis-shaped keys stop it
with one line naming them. Nothing existing is overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys

from distill import runlog
from launch import cli


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="launch.convert")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--diffusers", help="a diffusers model or pipeline directory")
  src.add_argument("--workdir", help="a run directory of this project (export)")
  p.add_argument("--network", default="student", help="with --workdir: student | teacher | name")
  p.add_argument("--out", required=True)
  p.add_argument("--sampler", default=None,
                 help="export: the sampler whose diffusers scheduler to write (default: the "
                      "run's student sampler)")
  p.add_argument("--vae", default=None,
                 help="export: a diffusers VAE directory (AutoencoderKL, SANA's AutoencoderDC) "
                      "to ship beside the network "
                      "(writes model_index.json: a loadable pipeline)")
  p.add_argument("--process", default=None,
                 help="with --diffusers: the teacher's noise process when its scheduler config "
                      "is missing or does not say it, e.g. \"rectified_flow(timestep_scale=1.0, "
                      "prediction='flow')\" (a dense-time flow teacher such as SANA-Sprint's)")
  p.add_argument("--log_level", default="WARNING")
  overrides, rest = cli.split_overrides(argv)
  args = p.parse_args(rest)
  args.overrides = overrides
  if overrides and not args.workdir:
    p.error("--config.KEY=VALUE overrides apply to --workdir (the run's config)")
  cli.setup(args)
  from distill import teacher as teacher_lib
  try:
    if args.diffusers:
      try:
        t = teacher_lib.load_teacher(args.diffusers, "raw", process=args.process)
      except (ValueError, FileNotFoundError) as e:   # named as the flag this command took
        raise type(e)(str(e.args[0] if e.args else e).replace(
            "config key 'teacher.checkpoint'", "--diffusers")) from None
      out = teacher_lib.write_converted(t, args.out)
      print(f"converted {t.model_config['name']} ({t.reference['hash'][:12]}) -> {out}")
      return 0
    return _export(args)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
    return cli.fail(e)


def _export(args) -> int:
  """Writes OUT/<transformer|unet>/ (the merged weights), OUT/scheduler/ (the student's
  few-step sampler as a diffusers scheduler, where one reproduces it), OUT/lora/ (LoRA students:
  the adapter in PEFT's format) and, with --vae, OUT/vae/ + model_index.json (where the
  directory is a pipeline diffusers' from_pretrained loads; export.json says why not otherwise).
  Everything goes to a temporary directory first and is moved into place at the end, so a
  failed export leaves nothing behind."""
  import shutil
  import tempfile

  import jax
  from distill import processes as procs
  from distill import trainer
  from distill.context import merge_params
  from models import convert
  if os.path.exists(args.out):
    raise FileExistsError(f"--out: {args.out!r} exists; choose a new directory")
  if args.sampler:
    from distill import solvers  # pylint: disable=import-outside-toplevel
    solvers.check_sampler(args.sampler, "--sampler")
  if args.vae and not os.path.isfile(os.path.join(args.vae, "config.json")):
    raise FileNotFoundError(f"--vae: {args.vae!r} has no config.json (a diffusers VAE "
                            "directory)")
  vae_class = _vae_class(args.vae) if args.vae else None
  engine, state, frozen, step = trainer.open_run(args.workdir, args.overrides)
  net = trainer.network_for_role(engine, args.network)
  params = trainer.eval_params(engine, state, frozen)[net]
  info = engine.nets[net]
  full = merge_params(info, params, {**frozen, **state.params})
  conv = convert.converter_for(info.module)
  sub = conv.subfolder
  sampler = args.sampler or (trainer.student_sampler(engine) if net == engine.objective.student
                             else None)
  parent = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
  notes = {"workdir": os.path.abspath(args.workdir), "step": int(step), "network": net,
           "sampler": sampler, "subfolder": sub,
           # What the exported network computes (read back by `launch.convert --diffusers`).
           "process": procs.process_config(info.own_process),
           "prediction": info.own_prediction}
  steps = trainer.trained_steps(engine, state) if net == engine.objective.student else None
  if steps:   # progressive / segmented students: the pipeline's num_inference_steps
    notes["steps"] = steps
  try:
    torch_module = convert.to_diffusers(info.module, {"params": jax.device_get(full)},
                                        out_dir=os.path.join(tmp, sub))
    shipped = {sub: type(torch_module).__name__}
    if sampler:
      _write_scheduler(tmp, info, sampler, _grid_steps(engine, steps), notes, shipped)
    if engine.plans[net].lora is not None:
      _write_lora(tmp, conv, info, jax.device_get(params), int(engine.plans[net].lora.rank),
                  notes)
    if args.vae:
      shutil.copytree(args.vae, os.path.join(tmp, "vae"))
      shipped["vae"] = vae_class
    pipeline = conv.pipeline_for(info.module)
    _write_index(tmp, pipeline, shipped, sub, notes)
    _note_guidance(engine, info, pipeline, notes)
    runlog.write_json(os.path.join(tmp, "export.json"), notes)
    os.rename(tmp, args.out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  print(f"exported {net} at step {step} -> {args.out} ({', '.join(sorted(os.listdir(args.out)))})")
  return 0


def _vae_class(path: str) -> str:
  """The diffusers class of the VAE directory `path` (its config's _class_name: AutoencoderKL,
  SANA's AutoencoderDC, ...), which model_index.json names."""
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(path, "config.json")) as f:
    name = json.load(f).get("_class_name")
  if not name:
    raise ValueError(f"--vae: {path!r}/config.json has no _class_name (a diffusers VAE "
                     "directory: AutoencoderKL, AutoencoderDC)")
  return name


def _grid_steps(engine, trained) -> tuple:
  """The step counts export.json's grids (flow `sigmas`, SCM `timesteps`) are given for:
  eval.steps and the count the student is trained for (staged students)."""
  return tuple(sorted({int(n) for n in engine.config.eval.steps} | ({trained} if trained else
                                                                    set())))


def _write_scheduler(tmp: str, info, sampler: str, steps: tuple, notes: dict,
                     shipped: dict) -> None:
  """scheduler/scheduler_config.json of the diffusers scheduler reproducing `sampler` (its
  spec carries the settings, e.g. an LCM student's lattice and boundary scaling), or the
  reason there is none (export.json and one printed line). A flow-matching or SCM scheduler's
  default grid is not ours: export.json's `sigmas` / `timesteps` and `pipeline_kwargs` give, for
  each of `steps`, what makes it walk our sampler's grid."""
  from models.convert import export  # pylint: disable=import-outside-toplevel
  try:
    sched = export.scheduler_config(info, sampler)
  except ValueError as e:
    notes["scheduler"] = str(e)
    print(f"no scheduler: {e}")
    return
  os.makedirs(os.path.join(tmp, "scheduler"))
  runlog.write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
  notes["scheduler"] = shipped["scheduler"] = sched["_class_name"]
  sigmas = export.flow_sigmas(sched, info, sampler, steps)
  if sigmas is not None:
    notes["sigmas"] = sigmas
    notes["sigmas_note"] = ("pass sigmas=sigmas[str(steps)] to the pipeline (or "
                            "scheduler.set_timesteps) to walk the student's own grid; the "
                            "scheduler's default grid is diffusers' linspace")
  timesteps = export.scm_timesteps(sched, info, sampler, steps)
  if timesteps is not None:
    notes["timesteps"] = timesteps
    notes["pipeline_kwargs"] = export.scm_pipeline_kwargs(timesteps)
    notes["timesteps_note"] = (
        "SanaSprintPipeline(..., **pipeline_kwargs[str(steps)]) walks the student's own grid "
        "(timesteps[str(steps)]: SCMScheduler's TrigFlow angles); its defaults (max_timesteps "
        "1.5708, intermediate_timesteps 1.3) are another grid. Where pipeline_kwargs passes "
        "timesteps=, diffusers' pipeline calls SCMScheduler.set_timesteps without "
        "num_inference_steps (a TypeError): first set pipe.scheduler.set_timesteps = "
        "functools.partial(pipe.scheduler.set_timesteps, steps)")


def _write_lora(tmp: str, conv, info, lora_params, rank: int, notes: dict) -> None:
  """lora/: a LoRA student's adapter in PEFT's format (adapter_model.safetensors +
  adapter_config.json), over the network its base is exported as; where no PEFT mapping
  exists, only the merged network is exported and export.json says why."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  try:
    tensors, adapter = conv.peft_lora(info.module, lora_params, rank=rank,
                                      alpha=float(info.lora_scale) * rank)
  except ValueError as e:
    notes["lora"] = f"{e}; the merged network is exported without lora/"
    print(f"no lora/: {notes['lora']}")
    return
  os.makedirs(os.path.join(tmp, "lora"))
  save_file(tensors, os.path.join(tmp, "lora", "adapter_model.safetensors"))
  runlog.write_json(os.path.join(tmp, "lora", "adapter_config.json"), adapter)
  notes["lora"] = {"base": info.base, "rank": rank, "modules": len(adapter["target_modules"])}


def _write_index(tmp: str, pipeline, shipped: dict, sub: str, notes: dict) -> None:
  """model_index.json where the directory is a pipeline from_pretrained loads; export.json's
  "model_index" names the pipeline (and the components to pass it) or says why there is none."""
  from models.convert import export  # pylint: disable=import-outside-toplevel
  index, notes["model_index"] = export.pipeline_index(pipeline, shipped, sub)
  if index is None:
    if "vae" in shipped:   # asked for a pipeline (--vae): say why it is not one
      print(notes["model_index"])
    return
  runlog.write_json(os.path.join(tmp, "model_index.json"), index)


# Pipelines that take a guidance-embedded network's w as `guidance_scale`: our w (CFG u + w (c - u))
# -> the pipeline's guidance_scale (LatentConsistencyModelPipeline embeds guidance_scale - 1 as
# LCM's w' = w - 1, which is what our UNet's guidance_inputs embed: the same number).
# SanaSprintPipeline feeds guidance_scale x guidance_embeds_scale, as our SANA's guidance_inputs.
PIPELINE_GUIDANCE_SCALE = {"LatentConsistencyModelPipeline": lambda w: w,
                           "SanaSprintPipeline": lambda w: w}


def _note_guidance(engine, info, pipeline, notes: dict) -> None:
  """export.json's "guidance" for a network that takes w as an input: the pipeline's
  guidance_scale for the run's evaluated w (eval.guidance) and the w range it was trained on."""
  from distill import context as ctx_lib  # pylint: disable=import-outside-toplevel
  from distill import trainer  # pylint: disable=import-outside-toplevel
  if not ctx_lib.embeds_guidance(info.module):
    return
  w = trainer.configured_guidance(engine.config)
  note = {"w": w, "convention": "w of u + w (c - u) (LCM's w' = w - 1)"}
  trained = engine.config.objective.get("guidance_range", None)
  if trained is not None:
    note["trained_range"] = [float(v) for v in trained]
  if pipeline in PIPELINE_GUIDANCE_SCALE:
    note.update(pipeline=pipeline, guidance_scale=PIPELINE_GUIDANCE_SCALE[pipeline](w))
  notes["guidance"] = note


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
