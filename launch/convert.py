"""Weight conversion both ways.

    # diffusers/PyTorch -> a converted teacher (Orbax, loads with teacher.checkpoint=OUT)
    python -m launch.convert --diffusers path/to/DiT-XL-2-256 --out teachers/dit_xl2
    # a run's network -> a diffusers-layout directory that diffusers' from_pretrained loads
    python -m launch.convert --workdir runs/x --network student --out export/student

A diffusers source may be a model directory (config.json + safetensors, sharded index too) or a
pipeline directory (transformer/ or unet/ plus scheduler/, whose config gives the noise process
and parameterisation). Conversion is strict: missing, unexpected or mis-shaped keys stop it
with one line naming them. Nothing existing is overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys

from launch import cli


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="launch.convert")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--diffusers", help="a diffusers model or pipeline directory")
  src.add_argument("--workdir", help="a run directory of this project (export)")
  p.add_argument("--network", default="student", help="with --workdir: student | teacher | name")
  p.add_argument("--out", required=True)
  p.add_argument("--log_level", default="WARNING")
  args = p.parse_args(argv)
  cli.setup(args)
  from distill import teacher as teacher_lib
  try:
    if args.diffusers:
      t = teacher_lib.load_teacher(args.diffusers, "raw")
      out = teacher_lib.write_converted(t, args.out)
      print(f"converted {t.model_config['name']} ({t.reference['hash'][:12]}) -> {out}")
      return 0
    return _export(args)
  except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
    return cli.fail(e)


def _export(args) -> int:
  from distill import trainer
  from models import convert
  if os.path.exists(args.out):
    raise FileExistsError(f"--out: {args.out!r} exists; choose a new directory")
  engine, state, frozen, step = trainer.open_run(args.workdir)
  net = trainer.network_for_role(engine, args.network)
  params = trainer.eval_params(engine, state, frozen)[net]
  info = engine.nets[net]
  from distill.context import merge_params
  import jax
  full = merge_params(info, params, {**frozen, **state.params})
  variables = {"params": jax.device_get(full)}
  convert.to_diffusers(info.module, variables, out_dir=args.out)
  print(f"exported {net} at step {step} -> {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
