"""The launch commands in config and objective docstrings are the recipes users copy: each one
must parse, name existing keys with values of the right type and pass validation, and the
commands that share a run directory must write it with the same config (a second config aimed
at a finished run directory is refused, distill/resume.py)."""
import ast
import glob
import os
import re
import shlex

import pytest

from distill import trainer
from launch import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_TOOLS = ("launch.train", "launch.bench", "launch.aot", "launch.precompute")
TOOL_FLAGS = {"--random_teacher": 0, "--compare": 1, "--topology": 1, "--steps": 1}


def _documented_commands():
  files = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
                 + glob.glob(os.path.join(ROOT, "distill", "objectives", "*.py")))
  out = []
  for path in files:
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    for line in doc.replace("\\\n", " ").splitlines():
      m = re.search(r"python -m (launch\.\w+)\s(.*)", line)
      if m and m.group(1) in CONFIG_TOOLS:
        argv = shlex.split(m.group(2), comments=True)
        out.append((os.path.relpath(path, ROOT), m.group(1), argv))
  return out


COMMANDS = _documented_commands()


def _parse(tool, argv):
  """The command's config spec and overrides, as the launch script reads them."""
  argv = list(argv)
  for flag, n in TOOL_FLAGS.items():
    while flag in argv:
      i = argv.index(flag)
      del argv[i:i + 1 + n]
  if "--workdir" not in argv:
    argv += ["--workdir", "unused"]
  return cli.parse(argv, prog=tool, need_config=True)


def test_the_docstrings_hold_commands():
  files = {f for f, _, _ in COMMANDS}
  assert len(COMMANDS) >= 40 and len(files) >= 25, (len(COMMANDS), sorted(files))
  assert sum(t == "launch.precompute" for _, t, _ in COMMANDS) >= 3
  assert all(any(t == "launch.train" for f, t, _ in COMMANDS if f == x)
             for x in files if x.startswith("configs/toy/"))


CONFIG_COMMANDS = [c for c in COMMANDS if c[1] != "launch.precompute"]


@pytest.mark.parametrize("where,tool,argv", CONFIG_COMMANDS,
                         ids=[f"{f}:{i}" for i, (f, _, _) in enumerate(CONFIG_COMMANDS)])
def test_documented_command_names_valid_keys(where, tool, argv):
  args = _parse(tool, argv)
  config = trainer.load_config(os.path.join(ROOT, args.config), args.overrides)
  config.teacher.checkpoint = ""     # the docstring's teacher is a run the reader makes first
  trainer.prepare_config(config, num_devices=8, eval_files=False)
  if tool == "launch.aot":           # compiled for a TPU topology: its kernels must run there
    trainer.check_platform(config, "tpu")


def test_documented_precompute_inputs_exist():
  """`launch.precompute --input KIND:...` names a registered image input (the t2i recipes once
  said `captions:`, which does not exist)."""
  from distill.data import image_inputs
  from launch import precompute
  found = [(f, argv) for f, tool, argv in COMMANDS if tool == "launch.precompute"]
  assert len(found) >= 3
  for where, argv in found:
    kind = precompute.parse(argv).input.partition(":")[0]
    assert kind in image_inputs.IMAGE_INPUTS, (where, kind)


def test_a_run_directory_is_written_by_one_config():
  """Two recipes that train into the same --workdir must be the same run (the toy sCM teacher
  with its dense time input once shared runs/toy_teacher_gmm with every other toy teacher)."""
  writers = {}
  for where, tool, argv in COMMANDS:
    if tool != "launch.train":
      continue
    args = _parse(tool, argv)
    spec = (args.config, tuple(sorted(o for o in args.overrides
                                      if not o.startswith("teacher.checkpoint="))))
    writers.setdefault(args.workdir, set()).add(spec)
  clashes = {w: sorted(s) for w, s in writers.items() if len(s) > 1}
  assert not clashes, clashes
