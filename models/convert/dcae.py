"""diffusers `AutoencoderDC` <-> `models.dcae.AutoencoderDC` (config and weights, strict).

The key table comes from the Flax module's own variables, as for SANA (`models.convert.sana`:
list indices folded into names, `decoder/up_blocks_3_1/conv1/kernel` is
`decoder.up_blocks.3.1.conv1.weight`). BatchNorm layers (decoder_norm_types "batch_norm") map
`scale`/`bias` to `weight`/`bias` in "params" and `mean`/`var` to `running_mean`/`running_var`
in "batch_stats". Their `num_batches_tracked` (a training counter that inference never reads) is
accepted on load and exported as 0, so a round trip is bit-identical for every tensor but that
counter of a model trained in torch.

    module, variables = CONVERTERS.get("AutoencoderDC").from_torch(torch_dcae)
    torch_dcae = CONVERTERS.get("AutoencoderDC").to_torch(module, variables)
"""
from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from models.convert.common import (TorchConverter, follow_tensor_dtype, numpy_to_torch,
                                   torch_module_with)
from models.convert.registry import register_converter
from models.convert.sana import (state_dict_from_variables, torch_key,
                                 variable_shapes, variables_from_state_dict)
from models.dcae import AutoencoderDC

CONFIG_FIELDS = ("in_channels", "latent_channels", "attention_head_dim", "encoder_block_types",
                 "decoder_block_types", "encoder_block_out_channels",
                 "decoder_block_out_channels", "encoder_layers_per_block",
                 "decoder_layers_per_block", "encoder_qkv_multiscales",
                 "decoder_qkv_multiscales", "upsample_block_type", "downsample_block_type",
                 "decoder_norm_types", "decoder_act_fns", "encoder_out_shortcut",
                 "decoder_in_shortcut", "decoder_conv_act_fn", "scaling_factor")
_NESTED = ("encoder_qkv_multiscales", "decoder_qkv_multiscales")
_COUNTER = "num_batches_tracked"


def _hashable(key: str, value: Any) -> Any:
  """JSON lists -> tuples (tuples of tuples for the multiscales); strings stay strings."""
  if isinstance(value, str) or not isinstance(value, (list, tuple)):
    return value
  if key in _NESTED:
    return tuple(tuple(int(k) for k in s) for s in value)
  return tuple(value)


def module_from_config(config: Mapping[str, Any], **overrides) -> AutoencoderDC:
  """Our AutoencoderDC from a diffusers AutoencoderDC config; unsupported values raise."""
  kwargs = {k: _hashable(k, config[k]) for k in CONFIG_FIELDS if k in config}
  kwargs.update(overrides)
  module = AutoencoderDC(**kwargs)
  module.check_config()
  return module


def diffusers_config(module: AutoencoderDC) -> dict[str, Any]:
  """The diffusers AutoencoderDC constructor kwargs for our module."""
  return {k: getattr(module, k) for k in CONFIG_FIELDS}


def flax_shapes(module: AutoencoderDC) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{(collection, ...path): shape} of `module` (abstract init on a one-latent image)."""
  plain = module.clone(remat="none")
  side = plain.downscale
  return variable_shapes(plain, jnp.zeros((1, side, side, plain.in_channels), jnp.float32))


def _counter_keys(shapes) -> list[str]:
  """The `num_batches_tracked` keys of the BatchNorm layers in `shapes`."""
  return [torch_key(p).rsplit(".", 1)[0] + f".{_COUNTER}" for p in shapes
          if p[0] == "batch_stats" and p[-1] == "mean"]


def variables_from_state_dict_dc(module: AutoencoderDC, state_dict: Mapping[str, Any],
                                 what: str = "AutoencoderDC state dict") -> dict:
  """A diffusers AutoencoderDC state dict -> `{"params": ...[, "batch_stats": ...]}`."""
  shapes = flax_shapes(module)
  return variables_from_state_dict(shapes, state_dict, module.param_dtype, what,
                                   ignore=_counter_keys(shapes))


def state_dict_from_variables_dc(module: AutoencoderDC, variables) -> dict[str, np.ndarray]:
  """Our variables -> a diffusers AutoencoderDC state dict (numpy), counters = 0."""
  shapes = flax_shapes(module)
  out = state_dict_from_variables(shapes, variables, what="AutoencoderDC variables")
  out.update({k: np.zeros((), np.int64) for k in _counter_keys(shapes)})
  return out


class AutoencoderDCConverter(TorchConverter):
  """diffusers AutoencoderDC <-> models.dcae.AutoencoderDC (see the module docstring).

  `from_torch` / `from_config_state` accept overrides of our execution fields (`dtype`,
  `param_dtype`, `remat`); `param_dtype` follows the tensors' dtype unless overridden.
  """

  flax_module_type = AutoencoderDC
  subfolder = "vae"  # its folder in a diffusers pipeline directory

  def from_config_state(self, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                        **overrides):
    module = module_from_config(config, **follow_tensor_dtype(state_dict, overrides))
    return module, variables_from_state_dict_dc(module, state_dict)

  def to_torch(self, module: AutoencoderDC, variables: Mapping):
    # pylint: disable-next=import-outside-toplevel
    from diffusers import AutoencoderDC as TorchAutoencoderDC
    tensors = numpy_to_torch(state_dict_from_variables_dc(module, variables))
    return torch_module_with(TorchAutoencoderDC, diffusers_config(module), tensors)


CONVERTER = register_converter("AutoencoderDC")(AutoencoderDCConverter())
from_torch = CONVERTER.from_torch
to_torch = CONVERTER.to_torch
from_config_state = CONVERTER.from_config_state
