"""Loading a frozen teacher named by `teacher.checkpoint`, and recording it by reference.

Accepted: a run directory of this project (config.json + checkpoints/), or a diffusers-layout
directory (config.json with `_class_name` + safetensors), converted strictly. `teacher.params`
picks the EMA ("ema", the `eval` role when the run kept one) or the raw weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

import jax
import numpy as np

from distill import processes as procs


@dataclasses.dataclass
class Teacher:
  module: Any
  params: Any                 # host (numpy) tree
  model_config: dict          # registry name + constructor kwargs + prediction
  process: Any
  prediction: str
  num_classes: int
  reference: dict             # path, step, hash, params role
  model_state: Any = None


def params_hash(params: Any) -> str:
  """sha256 over the sorted (path, dtype, shape, bytes) of a parameter tree."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def is_run_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def load_teacher(path: str, params_role: str = "ema") -> Teacher:
  if not os.path.exists(path):
    raise FileNotFoundError(f"config key 'teacher.checkpoint': {path!r} does not exist")
  if is_run_dir(path):
    return _load_run_dir(path, params_role)
  cfg_file = os.path.join(path, "config.json")
  if os.path.isfile(cfg_file):
    with open(cfg_file) as f:
      if "_class_name" in json.load(f):
        return _load_diffusers_dir(path)
  raise ValueError(f"config key 'teacher.checkpoint': {path!r} is neither a run directory "
                   "(config.json + checkpoints/) nor a diffusers-layout directory")


def _load_run_dir(path: str, params_role: str) -> Teacher:
  from distill import checkpoint as ckpt
  from models.registry import build_model

  with open(os.path.join(path, "config.json")) as f:
    run = json.load(f)
  resolved = run["resolved"]
  net = resolved["evaluated_network"]
  step, tree = ckpt.restore_raw(os.path.join(path, "checkpoints"))
  state = tree["state"]
  role = None
  if params_role == "ema":
    roles = state.get("ema", {}).get(net, {})
    role = "eval" if "eval" in roles else (sorted(roles)[0] if roles else None)
  params = state["ema"][net][role] if role else state["params"][net]
  model_cfg = dict(resolved["models"][net])
  name = model_cfg.pop("name")
  prediction = model_cfg.pop("prediction")
  module = build_model(name, **model_cfg)
  process = procs.make_process(**resolved["processes"][net])
  model_state = state.get("model_state", {}).get(net) or None
  params = jax.tree_util.tree_map(np.asarray, params)
  ref = {"path": os.path.abspath(path), "step": int(step), "hash": params_hash(params),
         "params": f"ema/{role}" if role else "raw", "network": net}
  return Teacher(module=module, params=params, model_config={"name": name, "prediction": prediction,
                                                             **model_cfg},
                 process=process, prediction=prediction,
                 num_classes=int(resolved.get("num_classes", 0)), reference=ref,
                 model_state=model_state)


def _load_diffusers_dir(path: str) -> Teacher:
  try:
    from models import convert
  except ImportError as e:  # pragma: no cover
    raise ValueError(f"config key 'teacher.checkpoint': cannot load diffusers directory {path!r}: "
                     f"{e}") from None
  module, variables = convert.load_diffusers_dir(path)
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  teacher_info = convert.teacher_defaults(module)  # process, prediction, num_classes
  ref = {"path": os.path.abspath(path), "step": 0, "hash": params_hash(params), "params": "raw",
         "network": "teacher"}
  return Teacher(module=module, params=params, model_config=teacher_info["model_config"],
                 process=teacher_info["process"], prediction=teacher_info["prediction"],
                 num_classes=teacher_info["num_classes"], reference=ref)


def maybe_load(path: Optional[str], params_role: str) -> Optional[Teacher]:
  return load_teacher(path, params_role) if path else None
