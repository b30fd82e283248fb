"""diffusers `AutoencoderKL` <-> `models.vae.AutoencoderKL` (config and weights, strict).

Our parameter tree follows the torch module tree: the torch key
`encoder.down_blocks.0.resnets.1.conv1.weight` is the Flax path
`encoder/down_blocks_0/resnets_1/conv1/kernel`. Leaves map as
  conv   weight (O, I, kh, kw) <-> kernel (kh, kw, I, O)
  linear weight (O, I)         <-> kernel (I, O)
  norm   weight                <-> scale;   every bias <-> bias.
The key table (`rules`) is derived from the Flax module's own parameter tree (`jax.eval_shape`
of its init), and `models.convert.common` checks it strictly: any missing, unexpected or
mis-shaped key on either side raises one ValueError naming all of them. Values are copied
exactly (transposes only), so torch -> ours -> torch is bit-identical.

    module, variables = CONVERTERS.get("AutoencoderKL").from_torch(torch_vae)   # or from_torch
    torch_vae = CONVERTERS.get("AutoencoderKL").to_torch(module, variables)
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from models.convert.common import MirroredConverter
from models.convert.registry import register_converter
from models.vae import AutoencoderKL

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"


# --- config -----------------------------------------------------------------------------------

def module_from_config(config: Mapping[str, Any], **overrides) -> AutoencoderKL:
  """Our AutoencoderKL from a diffusers AutoencoderKL config (dict or FrozenDict).

  `overrides` set our execution fields (dtype, param_dtype, attention, remat).
  """
  down = tuple(config.get("down_block_types", (_DOWN_BLOCK,)))
  up = tuple(config.get("up_block_types", (_UP_BLOCK,)))
  chans = tuple(int(c) for c in config.get("block_out_channels", (64,)))
  bad = [t for t in down if t != _DOWN_BLOCK] + [t for t in up if t != _UP_BLOCK]
  if bad or len(down) != len(chans) or len(up) != len(chans):
    raise ValueError(
        f"AutoencoderKL: only {_DOWN_BLOCK}/{_UP_BLOCK} blocks, one per block_out_channels entry, "
        f"are supported; got down={down} up={up} block_out_channels={chans}")

  def opt_tuple(v):
    return None if v is None else tuple(float(a) for a in v)

  sample_size = config.get("sample_size", 32)
  if isinstance(sample_size, (list, tuple)):
    sample_size = tuple(int(s) for s in sample_size)
  shift = config.get("shift_factor")
  return AutoencoderKL(
      in_channels=int(config.get("in_channels", 3)),
      out_channels=int(config.get("out_channels", 3)),
      block_out_channels=chans,
      layers_per_block=int(config.get("layers_per_block", 1)),
      act_fn=str(config.get("act_fn", "silu")),
      latent_channels=int(config.get("latent_channels", 4)),
      norm_num_groups=int(config.get("norm_num_groups", 32)),
      sample_size=sample_size,
      scaling_factor=float(config.get("scaling_factor", 0.18215)),
      shift_factor=None if shift is None else float(shift),
      latents_mean=opt_tuple(config.get("latents_mean")),
      latents_std=opt_tuple(config.get("latents_std")),
      force_upcast=bool(config.get("force_upcast", True)),
      use_quant_conv=bool(config.get("use_quant_conv", True)),
      use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
      mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
      **overrides)


def diffusers_config(module: AutoencoderKL) -> dict[str, Any]:
  """The diffusers AutoencoderKL constructor kwargs for our module."""
  n = len(module.block_out_channels)
  opt = lambda v: None if v is None else list(v)  # noqa: E731
  sample_size = module.sample_size
  return dict(
      in_channels=module.in_channels, out_channels=module.out_channels,
      down_block_types=(_DOWN_BLOCK,) * n, up_block_types=(_UP_BLOCK,) * n,
      block_out_channels=tuple(module.block_out_channels),
      layers_per_block=module.layers_per_block, act_fn=module.act_fn,
      latent_channels=module.latent_channels, norm_num_groups=module.norm_num_groups,
      sample_size=list(sample_size) if isinstance(sample_size, tuple) else sample_size,
      scaling_factor=module.scaling_factor, shift_factor=module.shift_factor,
      latents_mean=opt(module.latents_mean), latents_std=opt(module.latents_std),
      force_upcast=module.force_upcast, use_quant_conv=module.use_quant_conv,
      use_post_quant_conv=module.use_post_quant_conv,
      mid_block_add_attention=module.mid_block_add_attention)


# --- weights ----------------------------------------------------------------------------------

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Old diffusers VAE files name the mid-block attention `query/key/value/proj_attn`.

  diffusers renames them on load (`_convert_deprecated_attention_blocks`); so do we, so that such
  a directory also loads straight from its tensors. Other keys pass through unchanged.
  """
  out = {}
  for k, v in state_dict.items():
    m = _LEGACY_KEY.match(k)
    out[f"{m.group(1)}.{_LEGACY_ATTENTION[m.group(2)]}.{m.group(3)}" if m else k] = v
  return out


class AutoencoderKLConverter(MirroredConverter):
  """diffusers AutoencoderKL <-> models.vae.AutoencoderKL (see the module docstring).

  `from_torch` / `from_config_state` accept overrides of our execution fields (`dtype`,
  `param_dtype`, `attention`, `remat`); legacy attention names are accepted (`rename_legacy_keys`).
  """

  diffusers_class = "AutoencoderKL"
  flax_module_type = AutoencoderKL

  def module_from_config(self, config, **overrides):
    return module_from_config(config, **overrides)

  def diffusers_config(self, module):
    return diffusers_config(module)

  def abstract_init(self, module):
    plain = module.clone(remat="none")
    size = 2 * plain.downscale
    x = jax.ShapeDtypeStruct((1, size, size, plain.in_channels), jnp.float32)
    return jax.eval_shape(plain.init, jax.random.PRNGKey(0), x)

  def rename_keys(self, state_dict):
    return rename_legacy_keys(state_dict)


CONVERTER = register_converter("AutoencoderKL")(AutoencoderKLConverter())
from_torch = CONVERTER.from_torch
to_torch = CONVERTER.to_torch
from_config_state = CONVERTER.from_config_state
flax_shapes = CONVERTER.flax_shapes
rules = CONVERTER.rules
params_from_state_dict = CONVERTER.params_from_state_dict
state_dict_from_params = CONVERTER.state_dict_from_params
