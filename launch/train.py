"""Train or distil: `python -m launch.train --config configs/X.py[:arg] --workdir DIR [--config.a.b=v ...]`.

Bad input (an unknown key, a wrong type, an impossible combination, a missing teacher) stops
before any work with one line naming the key and exit code 2; nothing is written.
"""
from __future__ import annotations

import sys

from launch import cli


def main(argv: list[str]) -> int:
  args = cli.parse(argv, prog="launch.train", need_config=True)
  cli.setup(args)
  from distill import config as config_lib
  from distill import trainer
  try:
    config = cli.load_config(args)
    config = trainer.prepare_config(config)
    trainer.check_platform(config)
  except (config_lib.ConfigError, ValueError, KeyError, FileNotFoundError) as e:
    return cli.fail(e)
  try:
    summary = trainer.train(config, args.workdir)
  except trainer.SetupError as e:
    return cli.fail(e)
  except trainer.TrainingError as e:   # non-finite updates, unreadable data: the run stops
    cli.fail(e)   # its one line; exit 1: the run started (its checkpoints stay)
    return 1
  if "eval" in summary:
    cli.print_eval(summary["eval"])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
