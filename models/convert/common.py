"""Generic, strict helpers for moving weights between PyTorch and Flax.

A model's converter describes its layout as a table of `Rule(torch_key, flax_path, kind)`;
`kind` names a transform in `TRANSFORMS`:

    "linear"    torch (out, in)           <-> flax kernel (in, out)           (W.T)
    "conv2d"    torch (O, I, kh, kw)      <-> flax kernel (kh, kw, I, O)
    "identity"  same array (biases, norm scales, embedding tables)

    params = torch_to_flax(state_dict, rules, expected=flax_shapes)   # strict
    state_dict = flax_to_torch(params, rules)                          # numpy arrays

Every mismatch (missing, unexpected or mis-shaped key) is reported at once by `check_keys` as
one `ValueError`. Loading never touches the network: `load_diffusers_state_dict(dir)` reads
`*.safetensors` (single file or sharded with `*.safetensors.index.json`) or, failing that,
`*.bin` with `torch.load(weights_only=True)`; `load_torch_file(path)` reads an original `.pt`
checkpoint with `weights_only=True` only and rejects any non-tensor content naming the file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from distill.registry import Registry

Shape = tuple[int, ...]
FlaxPath = tuple[str, ...]


# ----------------------------------------------------------------------------------------------
# Transforms.

@dataclasses.dataclass(frozen=True)
class Transform:
  """How one tensor kind maps between layouts: arrays both ways and the flax -> torch shape."""
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]
  torch_shape: Callable[[Shape], Shape]


TRANSFORMS: Registry = Registry("weight transform")
TRANSFORMS.add("identity", Transform(lambda a: a, lambda a: a, tuple))
TRANSFORMS.add("linear", Transform(lambda a: a.T, lambda a: a.T, lambda s: tuple(s[::-1])))
TRANSFORMS.add("conv2d", Transform(
    lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1),
    lambda s: (s[3], s[2], s[0], s[1])))


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: its torch state-dict key, its path in the flax params tree and its kind."""
  torch_key: str
  flax_path: FlaxPath
  kind: str = "identity"


# ----------------------------------------------------------------------------------------------
# Trees and arrays.

def flatten_tree(tree: Mapping, prefix: FlaxPath = ()) -> dict[FlaxPath, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_tree(flat: Mapping[FlaxPath, Any]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def to_numpy(x) -> np.ndarray:
  """A torch tensor / jax or numpy array -> numpy, bf16 kept exactly (as ml_dtypes.bfloat16)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    torch = None
  if torch is not None and isinstance(x, torch.Tensor):
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
      import ml_dtypes  # pylint: disable=import-outside-toplevel
      return x.float().numpy().astype(ml_dtypes.bfloat16)
    return x.numpy()
  return np.asarray(x)


def numpy_to_torch(state_dict: Mapping[str, np.ndarray]) -> dict:
  """numpy state dict -> torch tensors (bf16 restored exactly); arrays are copied."""
  import torch  # pylint: disable=import-outside-toplevel
  out = {}
  for k, a in state_dict.items():
    a = np.asarray(a)
    if a.dtype.name == "bfloat16":
      out[k] = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    else:
      out[k] = torch.from_numpy(np.array(a, copy=True))
  return out


def common_dtype(state_dict: Mapping[str, Any]) -> Optional[np.dtype]:
  """The one floating dtype of all tensors (torch or numpy), or None if mixed / empty."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel  (registers bfloat16 with numpy)
  del ml_dtypes
  names = {str(v.dtype).replace("torch.", "") for v in state_dict.values()}
  if len(names) != 1:
    return None
  dtype = np.dtype(names.pop())
  return dtype if np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16" else None


# ----------------------------------------------------------------------------------------------
# Strict key checking and conversion.

def check_keys(expected: Mapping[str, Shape], got: Mapping[str, Shape],
               what: str = "state dict") -> None:
  """Raises one ValueError listing every missing, unexpected and mis-shaped key."""
  missing = sorted(set(expected) - set(got))
  unexpected = sorted(set(got) - set(expected))
  misshaped = sorted(k for k in set(expected) & set(got)
                     if tuple(expected[k]) != tuple(got[k]))
  if not (missing or unexpected or misshaped):
    return
  lines = [f"{what} does not match the model:"]
  if missing:
    lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if misshaped:
    lines.append(f"  mis-shaped keys ({len(misshaped)}): " + ", ".join(
        f"{k} expected {tuple(expected[k])} got {tuple(got[k])}" for k in misshaped))
  raise ValueError("\n".join(lines))


def expected_torch_shapes(rules: Iterable[Rule],
                          flax_shapes: Mapping[FlaxPath, Shape]) -> dict[str, Shape]:
  """The torch shapes a state dict must have, from the flax model's parameter shapes."""
  return {r.torch_key: TRANSFORMS.get(r.kind).torch_shape(tuple(flax_shapes[r.flax_path]))
          for r in rules}


def torch_to_flax(state_dict: Mapping[str, Any], rules: Sequence[Rule],
                  flax_shapes: Optional[Mapping[FlaxPath, Shape]] = None,
                  ignore: Iterable[str] = (), what: str = "state dict") -> dict:
  """A torch state dict -> nested flax params (numpy), strictly.

  `flax_shapes` (the model's {path: shape}, e.g. from `jax.eval_shape` of its init) turns on the
  shape check and must cover exactly the rules' paths; `ignore` lists torch keys to drop.
  """
  ignore = set(ignore)
  got = {k: tuple(v.shape) for k, v in state_dict.items() if k not in ignore}
  if flax_shapes is not None:
    check_keys({".".join(p): s for p, s in flax_shapes.items()},
               {".".join(r.flax_path): flax_shapes.get(r.flax_path, ()) for r in rules},
               what="conversion table (internal)")
    expected = expected_torch_shapes(rules, flax_shapes)
  else:
    expected = {r.torch_key: got.get(r.torch_key, ()) for r in rules}
  check_keys(expected, got, what)
  flat = {r.flax_path: TRANSFORMS.get(r.kind).to_flax(to_numpy(state_dict[r.torch_key]))
          for r in rules}
  return unflatten_tree({p: np.ascontiguousarray(a) for p, a in flat.items()})


def flax_to_torch(params: Mapping, rules: Sequence[Rule]) -> dict[str, np.ndarray]:
  """Nested flax params -> a numpy state dict (every param must be covered by a rule)."""
  flat = flatten_tree(params)
  check_keys({".".join(r.flax_path): () for r in rules}, {".".join(p): () for p in flat},
             what="flax params")
  return {r.torch_key: np.ascontiguousarray(
      TRANSFORMS.get(r.kind).to_torch(to_numpy(flat[r.flax_path]))) for r in rules}


# ----------------------------------------------------------------------------------------------
# Files (no network).

WEIGHTS_NAME = "diffusion_pytorch_model"


def read_config(path: str) -> dict:
  """config.json of a diffusers-layout directory."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{path}: no config.json (not a diffusers-layout directory)")
  with open(cfg_path) as f:
    return json.load(f)


def _load_safetensors(file: str) -> dict:
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  return load_file(file, device="cpu")


def load_diffusers_state_dict(path: str, variant: Optional[str] = None) -> dict:
  """All tensors of a diffusers-layout directory (torch tensors, keys as saved).

  Looks for `diffusion_pytorch_model[.variant].safetensors`, its sharded form
  (`...safetensors.index.json` + shards), then any single `*.safetensors`, then `.bin` files
  (read with `torch.load(weights_only=True)`).
  """
  stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
  single = os.path.join(path, stem + ".safetensors")
  index = single + ".index.json"
  if os.path.isfile(single):
    return _load_safetensors(single)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
      state_dict.update(_load_safetensors(os.path.join(path, shard)))
    check_keys({k: () for k in weight_map}, {k: () for k in state_dict},
               what=f"{index} (index vs shards)")
    return state_dict
  candidates = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if len(candidates) == 1:
    return _load_safetensors(os.path.join(path, candidates[0]))
  bins = [os.path.join(path, stem + ".bin")]
  if os.path.isfile(bins[0]):
    return load_torch_file(bins[0])
  raise FileNotFoundError(
      f"{path}: no {stem}.safetensors, sharded index or .bin weights found "
      f"(files: {', '.join(sorted(os.listdir(path)))})")


def load_torch_file(path: str, key: Optional[str] = None) -> dict:
  """A `.pt`/`.bin` checkpoint of plain tensors, read with `torch.load(weights_only=True)` only.

  `key` selects a sub-dictionary (e.g. "ema" or "model" of a training checkpoint). Anything that
  is not a flat mapping of tensor names to tensors raises one ValueError naming the file.
  """
  import torch  # pylint: disable=import-outside-toplevel
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError and friends: a pickle with non-tensor objects
    raise ValueError(
        f"{path}: not a plain tensor checkpoint; refusing to unpickle arbitrary objects "
        f"(torch.load(weights_only=True) failed: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if key is not None:
    if not isinstance(obj, Mapping) or key not in obj:
      raise ValueError(f"{path}: no entry {key!r} in the checkpoint")
    obj = obj[key]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a mapping of tensor names to tensors, got "
                     f"{type(obj).__name__}")
  bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
  if bad:
    raise ValueError(f"{path}: non-tensor entries in the checkpoint: {', '.join(bad)} "
                     "(pass key=... to pick the tensor dictionary)")
  return dict(obj)
