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
import re
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


_INDEXED = re.compile(r"^(.*)_(\d+)$")


def module_tree_key(path: FlaxPath, lists: Optional[Iterable[str]] = None) -> str:
  """A Flax param path -> the torch key of a module tree mirrored by name.

  A module named `<list>_<i>` is item i of the torch ModuleList `<list>` (every such name, or
  only those whose list name is in `lists`, where names such as `linear_1` are plain
  attributes); the leaf `bias` stays `bias`, any other leaf (kernel, scale, embedding) is
  `weight`: `("down_blocks_0", "resnets_1", "conv1", "kernel")` -> `down_blocks.0.resnets.1.
  conv1.weight`.
  """
  lists = None if lists is None else frozenset(lists)
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    if m and (lists is None or m.group(1) in lists):
      parts.extend([m.group(1), m.group(2)])
    else:
      parts.append(name)
  parts.append("bias" if path[-1] == "bias" else "weight")
  return ".".join(parts)


def mirrored_rules(shapes: Mapping[FlaxPath, Shape],
                   lists: Optional[Iterable[str]] = None) -> list[Rule]:
  """`Rule`s of a module whose Flax tree mirrors the torch tree (see `module_tree_key`):
  4-D kernels are conv2d, 2-D kernels linear, everything else identity."""
  kinds = {4: "conv2d", 2: "linear"}
  return [Rule(module_tree_key(p, lists),
               p, kinds.get(len(s), "identity") if p[-1] == "kernel" else "identity")
          for p, s in shapes.items()]


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


# ----------------------------------------------------------------------------------------------
# Converters.

def follow_tensor_dtype(state_dict: Mapping[str, Any], overrides: dict) -> dict:
  """`overrides` with `param_dtype` set to the tensors' one floating dtype (unless given), so
  converted params keep the checkpoint's precision."""
  def floating(v) -> bool:
    if hasattr(v, "is_floating_point"):  # torch
      return bool(v.is_floating_point())
    return np.dtype(v.dtype).kind == "f" or np.dtype(v.dtype).name == "bfloat16"

  dtype = common_dtype({k: v for k, v in state_dict.items() if floating(v)})
  if dtype is not None and "param_dtype" not in overrides:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    overrides = dict(overrides, param_dtype=jnp.dtype(dtype))
  return overrides


def torch_module_with(cls, config: Mapping[str, Any], tensors: Mapping[str, Any]):
  """`cls(**config)` in the tensors' floating dtype with the tensors loaded strictly, in eval
  mode."""
  model = cls(**config)
  dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
  if len(dtypes) == 1 and (dtype := dtypes.pop()) != next(model.parameters()).dtype:
    model = model.to(dtype)
  model.load_state_dict(dict(tensors), strict=True)
  return model.eval()


class TorchConverter:
  """The registry interface every converter shares: `from_torch` reads a diffusers module's
  config and state dict and calls the subclass's `from_config_state(config, state_dict,
  **overrides)`; subclasses add `to_torch(module, variables)`."""

  subfolder: str = "model"                 # its folder in a diffusers pipeline directory
  pipeline_class: Optional[str] = None     # the diffusers pipeline that runs it, if one does

  def pipeline_for(self, module) -> Optional[str]:
    """The diffusers pipeline class that runs `module` (None: no pipeline can be named)."""
    del module
    return self.pipeline_class

  def peft_lora(self, module, lora_params: Mapping, *, rank: int, alpha: float):
    """A LoRA tree over `module` -> PEFT (tensors, adapter_config); converters that map their
    modules' LoRA kernels override this. Raises ValueError (one line) where none does."""
    del lora_params, rank, alpha
    raise ValueError(f"export: no PEFT mapping for a LoRA over {type(module).__name__}")

  def from_config_state(self, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                        **overrides):
    raise NotImplementedError

  def from_torch(self, torch_module, **overrides):
    return self.from_config_state(dict(torch_module.config), torch_module.state_dict(),
                                  **overrides)


class MirroredConverter(TorchConverter):
  """from_torch / to_torch / from_config_state for a Flax module built to mirror a diffusers
  module's tree (see `module_tree_key`). A subclass gives

      diffusers_class                  the diffusers class name (also the registry name)
      module_from_config(config, **overrides) -> flax module     (raises on unsupported keys)
      diffusers_config(module) -> dict                            (the diffusers constructor kwargs)
      abstract_init(module) -> abstract variables                 (jax.eval_shape of its init)
      lists                            ModuleList names (None: every `<name>_<i>`)
      rename_keys(state_dict)          legacy key names -> current (default: none)

  and gets the strict key table, both weight directions and the registry interface.
  """
  diffusers_class: str = ""
  lists: Optional[frozenset] = None

  def module_from_config(self, config: Mapping[str, Any], **overrides):
    raise NotImplementedError

  def diffusers_config(self, module) -> dict:
    raise NotImplementedError

  def abstract_init(self, module):
    raise NotImplementedError

  def rename_keys(self, state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    return state_dict

  def flax_shapes(self, module) -> dict[FlaxPath, Shape]:
    """{param path: shape} of `module`, from an abstract init (nothing is allocated)."""
    from flax.core import meta  # pylint: disable=import-outside-toplevel
    abstract = self.abstract_init(module)
    return {p: tuple(v.shape) for p, v in flatten_tree(meta.unbox(abstract["params"])).items()}

  def rules(self, module, shapes: Optional[Mapping[FlaxPath, Shape]] = None) -> list[Rule]:
    return mirrored_rules(self.flax_shapes(module) if shapes is None else shapes, self.lists)

  def params_from_state_dict(self, module, state_dict: Mapping[str, Any],
                             what: Optional[str] = None) -> dict:
    """A diffusers state dict -> `{"params": ...}` (unboxed, in the module's `param_dtype`)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    shapes = self.flax_shapes(module)
    params = torch_to_flax(self.rename_keys(state_dict), self.rules(module, shapes), shapes,
                           what=what or f"{self.diffusers_class} state dict")
    return {"params": jax.tree_util.tree_map(lambda a: jnp.asarray(a, module.param_dtype),
                                             params)}

  def state_dict_from_params(self, module, variables: Mapping) -> dict[str, np.ndarray]:
    """`{"params": ...}` or the bare params (boxed or not) -> a diffusers state dict (numpy)."""
    from flax.core import meta  # pylint: disable=import-outside-toplevel
    params = meta.unbox(variables["params"] if "params" in variables else variables)
    shapes = self.flax_shapes(module)
    check_keys({"/".join(p): s for p, s in shapes.items()},
               {"/".join(p): tuple(np.shape(v)) for p, v in flatten_tree(params).items()},
               what=f"{self.diffusers_class} params")
    return flax_to_torch(params, self.rules(module, shapes))

  def from_config_state(self, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                        **overrides):
    module = self.module_from_config(config, **overrides)
    return module, self.params_from_state_dict(module, state_dict)

  def to_torch(self, module, variables: Mapping):
    """The diffusers module with our weights (in their dtype when it is one dtype)."""
    import diffusers  # pylint: disable=import-outside-toplevel
    tensors = numpy_to_torch(self.state_dict_from_params(module, variables))
    return torch_module_with(getattr(diffusers, self.diffusers_class),
                             self.diffusers_config(module), tensors)
