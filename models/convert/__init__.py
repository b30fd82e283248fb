"""diffusers/PyTorch <-> Flax conversion, dispatched by diffusers class name (see registry.py).

    module, variables = from_diffusers(torch_module)                 # strict
    torch_module = to_diffusers(module, variables, out_dir=None)     # + save_pretrained(out_dir)
    module, variables = load_diffusers_dir(path)                     # config.json + safetensors
    save_diffusers_dir(module, variables, path)                      # diffusers loads it back

`from_diffusers` / `load_diffusers_dir` accept overrides of our module's execution fields
(e.g. `scan_blocks=True`, `remat="full"`, `dtype=jnp.bfloat16`).

A Flax module finds its converter through its `diffusers_class` attribute or, failing that,
through a converter whose `flax_module_type` it is an instance of. `load_diffusers_dir` converts
straight from the tensors when the converter has `from_config_state(config, state_dict)`;
otherwise it builds the diffusers module from config.json, loads the tensors strictly and calls
`from_torch`. Nothing here touches the network.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping, Optional

from models.convert.common import load_diffusers_state_dict, read_config
from models.convert.registry import CONVERTERS

# Converter modules register themselves on import. Optional ones may be absent.
from models.convert import dit as _dit  # noqa: F401  pylint: disable=unused-import

for _name in ("vae", "unet", "sana", "dcae"):
  try:
    importlib.import_module(f"models.convert.{_name}")
  except ImportError:
    pass


def _converter_for_module(module) -> Any:
  name = getattr(module, "diffusers_class", None)
  if name is not None:
    return CONVERTERS.get(name)
  for conv_name in CONVERTERS.names():
    conv = CONVERTERS.get(conv_name)
    flax_type = getattr(conv, "flax_module_type", None)
    if flax_type is not None and isinstance(module, flax_type):
      return conv
  raise KeyError(f"no converter for {type(module).__name__} "
                 f"(known: {', '.join(CONVERTERS.names())})")


def from_diffusers(torch_module, **overrides):
  """A diffusers torch module -> (our Flax module, variables); raises on any key mismatch."""
  conv = CONVERTERS.get(type(torch_module).__name__)
  return conv.from_torch(torch_module, **overrides) if overrides else conv.from_torch(
      torch_module)


def to_diffusers(module, variables, out_dir: Optional[str] = None):
  """Our Flax module + variables -> the diffusers torch module (saved to `out_dir` if given)."""
  torch_module = _converter_for_module(module).to_torch(module, variables)
  if out_dir is not None:
    torch_module.save_pretrained(out_dir, safe_serialization=True)
  return torch_module


def load_diffusers_dir(path: str, subfolder: Optional[str] = None, variant: Optional[str] = None,
                       **overrides):
  """A diffusers-layout directory (config.json + *.safetensors) -> (module, variables)."""
  if subfolder:
    path = os.path.join(path, subfolder)
  config = read_config(path)
  class_name = config.get("_class_name")
  if class_name is None:
    raise ValueError(f"{path}/config.json has no _class_name")
  conv = CONVERTERS.get(class_name)
  state_dict = load_diffusers_state_dict(path, variant)
  if hasattr(conv, "from_config_state"):
    return conv.from_config_state(config, state_dict, **overrides)
  return from_diffusers(_torch_module_from(class_name, config, state_dict, path), **overrides)


def _torch_module_from(class_name: str, config: Mapping, state_dict: Mapping, path: str):
  import diffusers  # pylint: disable=import-outside-toplevel
  cls = getattr(diffusers, class_name)
  model = cls.from_config(dict(config))
  try:
    model.load_state_dict(state_dict, strict=True)
  except RuntimeError as e:
    raise ValueError(f"{path}: weights do not match {class_name}: {e}") from None
  return model.eval()


def converter_for(module):
  """The converter of a Flax module (its diffusers class, pipeline folder, LoRA export)."""
  return _converter_for_module(module)


def save_diffusers_dir(module, variables, path: str):
  """Writes config.json + safetensors with diffusers' save_pretrained; returns the torch module."""
  return to_diffusers(module, variables, out_dir=path)
