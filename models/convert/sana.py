"""diffusers `SanaTransformer2DModel` <-> `models.sana.Sana` (config and weights, strict).

Our parameter tree is the torch module tree, so the key table is derived from the Flax module's
own (abstract) variables: a path's module names join with dots, where list containers
(`transformer_blocks`, `to_out`, and DC-AE's `down_blocks`, `up_blocks`, `to_qkv_multiscale`)
carry their indices as `_i` suffixes (`transformer_blocks_3/attn1/to_out_0` is
`transformer_blocks.3.attn1.to_out.0`); leaves map as
  conv   kernel (kh, kw, I/groups, O) <-> weight (O, I/groups, kh, kw)
  linear kernel (I, O)                <-> weight (O, I)
  norm   scale                        <-> weight;  bias <-> bias;  other names as they are
  batch statistics mean / var         <-> running_mean / running_var   (DC-AE's BatchNorm)
Every missing, unexpected or mis-shaped key on either side raises one ValueError naming them all
(`models.convert.common`); values are copied (transposes only), so torch -> ours -> torch is
bit-identical. (`common.MirroredConverter` does the same for single list indices and
`weight`/`bias` leaves only; SANA's `scale_shift_table` leaves, DC-AE's stage/Sequential double
indices and its BatchNorm statistics need the table here.)

    module, variables = CONVERTERS.get("SanaTransformer2DModel").from_torch(torch_sana)
    torch_sana = CONVERTERS.get("SanaTransformer2DModel").to_torch(module, variables)
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.convert.common import (Rule, TorchConverter, check_keys, flatten_tree,
                                   flax_to_torch, follow_tensor_dtype, numpy_to_torch,
                                   torch_module_with, torch_to_flax)
from models.convert.registry import register_converter
from models.sana import Sana

# Torch ModuleList / Sequential containers whose indices we fold into names as `_i` suffixes.
_LISTS = re.compile(r"^(transformer_blocks|to_out|down_blocks|up_blocks|to_qkv_multiscale)"
                    r"((?:_\d+)+)$")
_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
COLLECTIONS = ("params", "batch_stats")

FlaxPath = tuple[str, ...]


# --- key tables (shared with models.convert.dcae) --------------------------------------------

def torch_key(path: FlaxPath) -> str:
  """A Flax variable path (collection first) -> the torch state-dict key."""
  parts = []
  for name in path[1:-1]:
    m = _LISTS.match(name)
    parts.append(m.group(1) + m.group(2).replace("_", ".") if m else name)
  parts.append(_LEAVES.get(path[-1], path[-1]))
  return ".".join(parts)


def variable_shapes(module: nn.Module, *args, **kwargs) -> dict[FlaxPath, tuple[int, ...]]:
  """{(collection, ...path): shape} of `module.init(*args, **kwargs)`, abstractly (no compute)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  abstract = nn.meta.unbox(abstract)
  return {(c,) + p: tuple(v.shape) for c in COLLECTIONS if c in abstract
          for p, v in flatten_tree(abstract[c]).items()}


def rules_from_shapes(shapes: Mapping[FlaxPath, tuple[int, ...]]) -> list[Rule]:
  """One Rule per variable: its torch key and transform (conv / linear kernels transpose)."""
  kinds = {4: "conv2d", 2: "linear"}
  return [Rule(torch_key(p), p, kinds.get(len(s), "identity") if p[-1] == "kernel"
               else "identity") for p, s in shapes.items()]


def variables_from_state_dict(shapes: Mapping[FlaxPath, tuple[int, ...]],
                              state_dict: Mapping[str, Any], param_dtype, what: str,
                              ignore=()) -> dict:
  """A torch state dict -> `{"params": ..., ["batch_stats": ...]}`, strictly.

  Parameters are cast to `param_dtype` (a no-op when the tensors already have it); batch
  statistics keep float32 or wider.
  """
  tree = torch_to_flax(state_dict, rules_from_shapes(shapes), dict(shapes), ignore=ignore,
                       what=what)

  def cast(collection):
    dtype = param_dtype if collection == "params" else jnp.promote_types(param_dtype, jnp.float32)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree[collection])

  return {c: cast(c) for c in COLLECTIONS if c in tree}


def state_dict_from_variables(shapes: Mapping[FlaxPath, tuple[int, ...]], variables: Mapping,
                              what: str) -> dict[str, np.ndarray]:
  """`{"params": ...}` (+ batch_stats), or bare params, boxed or not -> a numpy state dict."""
  variables = nn.meta.unbox(variables)
  if "params" not in variables:
    variables = {"params": variables}
  flat = {(c,) + p: v for c in COLLECTIONS if c in variables
          for p, v in flatten_tree(variables[c]).items()}
  check_keys({"/".join(p): s for p, s in shapes.items()},
             {"/".join(p): tuple(np.shape(v)) for p, v in flat.items()}, what=what)
  rules = rules_from_shapes(shapes)
  # flax_to_torch walks one tree: give it the collection-rooted one.
  return flax_to_torch({c: variables[c] for c in COLLECTIONS if c in variables}, rules)


# --- config -----------------------------------------------------------------------------------

# diffusers config key -> our Sana field (same names).
CONFIG_FIELDS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                 "num_layers", "num_cross_attention_heads", "cross_attention_head_dim",
                 "cross_attention_dim", "caption_channels", "mlp_ratio", "dropout",
                 "attention_bias", "sample_size", "patch_size", "norm_elementwise_affine",
                 "norm_eps", "interpolation_scale", "guidance_embeds", "guidance_embeds_scale",
                 "qk_norm", "timestep_scale")


def module_from_config(config: Mapping[str, Any], **overrides) -> Sana:
  """Our Sana from a diffusers SanaTransformer2DModel config (dict or FrozenDict).

  Raises one ValueError naming the key for configs we do not cover (`Sana.check_config`).
  """
  if config.get("cross_attention_dim", 2240) is None:
    raise ValueError("SANA cross_attention_dim=None is not supported (diffusers' blocks need "
                     "their cross attention)")
  kwargs = {k: config[k] for k in CONFIG_FIELDS if k in config}
  if kwargs.get("out_channels") is None:
    kwargs["out_channels"] = kwargs.get("in_channels", 32)
  kwargs.update(overrides)
  module = Sana(**kwargs)
  module.check_config()
  return module


def diffusers_config(module: Sana) -> dict[str, Any]:
  """The SanaTransformer2DModel constructor kwargs for our module."""
  cfg = {k: getattr(module, k) for k in CONFIG_FIELDS}
  cfg["out_channels"] = module.output_channels
  return cfg


def flax_shapes(module: Sana) -> dict[FlaxPath, tuple[int, ...]]:
  """{(collection, ...path): shape} of `module` (from an abstract init)."""
  plain = module.clone(remat="none")
  return variable_shapes(plain, *plain.dummy_inputs(1), **plain.dummy_kwargs(1))


def params_from_state_dict(module: Sana, state_dict: Mapping[str, Any],
                           what: str = "SanaTransformer2DModel state dict") -> dict:
  """A diffusers SANA state dict -> `{"params": ...}` (in `param_dtype`)."""
  return variables_from_state_dict(flax_shapes(module), state_dict, module.param_dtype, what)


def state_dict_from_params(module: Sana, variables: Mapping) -> dict[str, np.ndarray]:
  """`{"params": ...}` or bare params (boxed or not) -> a diffusers SANA state dict (numpy)."""
  return state_dict_from_variables(flax_shapes(module), variables, what="Sana params")


class SanaConverter(TorchConverter):
  """diffusers SanaTransformer2DModel <-> models.sana.Sana (see the module docstring).

  `from_torch` / `from_config_state` accept overrides of our execution fields (`dtype`,
  `param_dtype`, `remat`); `param_dtype` follows the tensors' dtype unless overridden.
  """

  flax_module_type = Sana
  subfolder = "transformer"  # its folder in a diffusers pipeline directory
  pipeline_class = "SanaPipeline"

  def pipeline_for(self, module: Sana) -> str:
    """SanaSprintPipeline for a guidance-embedded SANA (it feeds `guidance`, which SanaPipeline
    does not: diffusers' time embedding then fails), else SanaPipeline."""
    return "SanaSprintPipeline" if module.guidance_embeds else self.pipeline_class

  def peft_lora(self, module: Sana, lora_params: Mapping, *, rank: int, alpha: float):
    """A LoRA tree over this SANA (params layout) -> PEFT (tensors, adapter_config)."""
    from models.convert import export  # pylint: disable=import-outside-toplevel
    tree = nn.meta.unbox(lora_params)
    tree = tree.get("params", tree)
    rules = [Rule(r.torch_key, r.flax_path[1:], r.kind)
             for r in rules_from_shapes(flax_shapes(module))]
    return export.peft_lora(rules, tree, rank=rank, alpha=alpha)

  def from_config_state(self, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                        **overrides):
    module = module_from_config(config, **follow_tensor_dtype(state_dict, overrides))
    return module, params_from_state_dict(module, state_dict)

  def to_torch(self, module: Sana, variables: Mapping):
    from diffusers import SanaTransformer2DModel  # pylint: disable=import-outside-toplevel
    tensors = numpy_to_torch(state_dict_from_params(module, variables))
    return torch_module_with(SanaTransformer2DModel, diffusers_config(module), tensors)


CONVERTER = register_converter("SanaTransformer2DModel")(SanaConverter())
from_torch = CONVERTER.from_torch
to_torch = CONVERTER.to_torch
from_config_state = CONVERTER.from_config_state
