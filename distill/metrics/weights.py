"""Strict loading of the metric networks' weights (Inception, CLIP) from a file the user gives.

Nothing is ever downloaded: every loader takes a path. Accepted files:

    *.safetensors        read with safetensors' numpy reader (no torch needed)
    *.npz                a numpy archive of the same keys (no torch needed)
    anything else        a PyTorch state dict (.pth/.pt/.bin), `torch.load(weights_only=True)`
                         only (`models.convert.common.load_torch_file`)

A network's parameter tree names its modules like the torch module tree, so the torch key of a
Flax leaf is its path joined by dots, with `<list>_<i>` module names as list items and the
leaves `kernel`/`scale`/`embedding` renamed to `weight` (`key_of`). Conversion goes through
`models.convert.common.torch_to_flax` with the model's own shapes, so every missing, unexpected
and mis-shaped key is reported at once in one ValueError naming the file.
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from models.convert import common

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")
_INDEXED = re.compile(r"^(.*)_(\d+)$")


def load_state_dict(path: str) -> dict[str, Any]:
  """All tensors of a weights file (see the module docstring), keys as saved."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weights file (metric weights are never "
                            "downloaded; pass the path of a local copy)")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  return common.load_torch_file(path)


def key_of(path: tuple[str, ...], lists: Iterable[str] = ()) -> str:
  """Flax param path -> torch key: `("encoder", "layers_3", "fc1", "kernel")` with
  `lists=("layers",)` -> `encoder.layers.3.fc1.weight`; other leaf names are kept."""
  lists = frozenset(lists)
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    parts.extend([m.group(1), m.group(2)] if m and m.group(1) in lists else [name])
  parts.append("weight" if path[-1] in _WEIGHT_LEAVES else path[-1])
  return ".".join(parts)


def params_from_state_dict(state_dict: Mapping[str, Any], shapes: Mapping[tuple, tuple], *,
                           what: str, lists: Iterable[str] = (),
                           ignore: Callable[[str], bool] = lambda k: False) -> dict:
  """A torch state dict -> nested numpy params of the given Flax shapes, strictly.

  Kernels of rank 4 are conv weights (O, I, kh, kw) -> (kh, kw, I, O), of rank 2 linear
  weights (out, in) -> (in, out); everything else is copied. Keys for which `ignore(key)` holds
  (buffers that do not affect inference) are dropped first.
  """
  kinds = {4: "conv2d", 2: "linear"}
  rules = [common.Rule(key_of(p, lists), p,
                       kinds.get(len(s), "identity") if p[-1] == "kernel" else "identity")
           for p, s in shapes.items()]
  dropped = [k for k in state_dict if ignore(k)]
  params = common.torch_to_flax(state_dict, rules, dict(shapes), ignore=dropped, what=what)
  # torch_to_flax's np.ascontiguousarray turns 0-d tensors (CLIP's logit_scale) into (1,).
  flat = {p: _cast(a).reshape(shapes[p]) for p, a in common.flatten_tree(params).items()}
  return common.unflatten_tree(flat)


def _cast(a) -> np.ndarray:
  """Floating arrays (bf16 and fp16 included) -> float32; others unchanged."""
  a = np.asarray(a)
  floating = np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"
  return a.astype(np.float32) if floating else a


def shapes_of(abstract_params: Mapping) -> dict[tuple, tuple]:
  """{path: shape} of an (abstract) params tree."""
  return {p: tuple(v.shape) for p, v in common.flatten_tree(abstract_params).items()}
