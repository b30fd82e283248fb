"""diffusers `UNet2DConditionModel` <-> `models.unet.UNet` (config and weights, strict).

Our parameter tree mirrors the torch module tree (`up_blocks.1.attentions.2.transformer_blocks.0.
ff.net.0.proj.weight` is `up_blocks_1/attentions_2/transformer_blocks_0/ff/net_0/proj/kernel`),
so the key table comes from the Flax module's own abstract init (`MirroredConverter`): conv
weights (O, I, kh, kw) <-> kernels (kh, kw, I, O), linear (O, I) <-> (I, O), norm weight <->
scale, embedding weight <-> embedding; any missing, unexpected or mis-shaped key raises one
ValueError naming all of them. Round trips are bit-identical (transposes only).

Config: diffusers' `attention_head_dim` is the number of heads (diffusers' own naming quirk,
`num_attention_heads` must be None there); it becomes our `num_attention_heads`. Keys whose
values we do not implement raise one ValueError naming the key and the value.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from models.convert.common import MirroredConverter
from models.convert.registry import register_converter
from flax.core import meta

from models.unet import UNet, stack_transformer_blocks, unstack_transformer_blocks

# Keys that must hold these values (our subset of UNet2DConditionModel), with the value's meaning.
_REQUIRED = {
    "dual_cross_attention": (False, None),
    "attention_type": ("default",),
    "time_embedding_type": ("positional",),
    "class_embeddings_concat": (False, None),
    "reverse_transformer_layers_per_block": (None,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "dropout": (0.0, 0),
    "num_attention_heads": (None,),
    "encoder_hid_dim_type": (None, "text_proj"),
}

# Our field <- the diffusers key of the same name (scalars).
_SAME = ("in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
         "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
         "use_linear_projection", "upcast_attention", "class_embed_type", "num_class_embeds",
         "projection_class_embeddings_input_dim", "addition_embed_type",
         "addition_time_embed_dim", "encoder_hid_dim", "resnet_time_scale_shift",
         "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
         "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel", "mid_block_type")
_PER_BLOCK = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block")


def _check_supported(config: Mapping[str, Any]):
  for key, allowed in _REQUIRED.items():
    if key in config and config[key] not in allowed:
      raise ValueError(f"UNet2DConditionModel config key {key!r}: {config[key]!r} is not "
                       f"supported (supported: {', '.join(repr(a) for a in allowed)})")
  oca = config.get("only_cross_attention", False)
  if any(oca if isinstance(oca, (list, tuple)) else [oca]):
    raise ValueError(f"UNet2DConditionModel config key 'only_cross_attention': {oca!r} is not "
                     "supported (supported: False)")
  depth = config.get("transformer_layers_per_block", 1)
  if isinstance(depth, (list, tuple)) and any(isinstance(d, (list, tuple)) for d in depth):
    raise ValueError("UNet2DConditionModel config key 'transformer_layers_per_block': nested "
                     f"per-layer depths {depth!r} are not supported (one int per block)")


def _plain(v):
  return tuple(v) if isinstance(v, (list, tuple)) else v


def module_from_config(config: Mapping[str, Any], **overrides) -> UNet:
  """Our UNet from a diffusers UNet2DConditionModel config; `overrides` set execution fields."""
  config = dict(config)
  _check_supported(config)
  kw = {k: _plain(config[k]) for k in _SAME if k in config}
  kw.update({k: _plain(config[k]) for k in _PER_BLOCK if k in config})
  for k in ("down_block_types", "up_block_types", "block_out_channels"):
    if k in config:
      kw[k] = tuple(config[k])
  kw["num_attention_heads"] = _plain(config.get("attention_head_dim", 8))
  size = config.get("sample_size") or 64
  kw["sample_size"] = int(size[0] if isinstance(size, (list, tuple)) else size)
  module = UNet(**kw, **overrides)
  module.validate()
  return module


def diffusers_config(module: UNet) -> dict[str, Any]:
  """The diffusers UNet2DConditionModel constructor kwargs for our module."""
  if module.guidance_adapter:
    raise ValueError(f"UNet field 'guidance_adapter': {module.guidance_adapter} (AGD's guidance "
                     "adapters) has no diffusers UNet2DConditionModel equivalent; export a "
                     "UNet without adapters")
  listed = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
  cfg = {k: listed(getattr(module, k)) for k in _SAME + _PER_BLOCK}
  cfg.update(sample_size=module.sample_size, down_block_types=list(module.down_block_types),
             up_block_types=list(module.up_block_types),
             block_out_channels=list(module.block_out_channels),
             attention_head_dim=listed(module.num_attention_heads))
  return cfg


# The diffusers pipeline of a UNet: the first whose test the module passes.
PIPELINES = (
    ("StableDiffusionXLPipeline", lambda m: m.addition_embed_type == "text_time"),
    # LCM's w input (time_cond_proj): the pipeline that feeds it w = guidance_scale - 1.
    ("LatentConsistencyModelPipeline", lambda m: bool(m.time_cond_proj_dim)),
    ("StableDiffusionPipeline", lambda m: m.addition_embed_type is None
     and m.class_embed_type is None and bool(m.cross_attention_dim)),
)


class UNetConverter(MirroredConverter):
  """diffusers UNet2DConditionModel <-> models.unet.UNet (see the module docstring)."""

  diffusers_class = "UNet2DConditionModel"
  flax_module_type = UNet
  subfolder = "unet"                 # its folder in a diffusers pipeline directory
  lists = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
                     "downsamplers", "upsamplers", "to_out", "net"})

  def pipeline_for(self, module: UNet):
    """StableDiffusionXLPipeline (text_time added conditioning), LatentConsistencyModelPipeline
    (LCM's w input), StableDiffusionPipeline (text-conditioned), else None (`PIPELINES`)."""
    return next((name for name, fits in PIPELINES if fits(module)), None)

  def peft_lora(self, module: UNet, lora_params: Mapping, *, rank: int, alpha: float):
    """A LoRA tree over this UNet (scanned transformer blocks or not) -> PEFT (tensors,
    adapter_config), keyed by the torch modules of UNet2DConditionModel."""
    from models.convert import export  # pylint: disable=import-outside-toplevel
    tree = meta.unbox(lora_params)
    tree = tree.get("params", tree)
    if module.scan_blocks:
      tree = unstack_transformer_blocks(tree)
    plain = module.clone(scan_blocks=False)
    return export.peft_lora(self.rules(plain), tree, rank=rank, alpha=alpha)

  def module_from_config(self, config, **overrides):
    return module_from_config(config, **overrides)

  def diffusers_config(self, module):
    return diffusers_config(module)

  def params_from_state_dict(self, module, state_dict, what=None):
    """As the base class; a `scan_blocks` module gets its transformer stacks stacked."""
    plain = module.clone(scan_blocks=False)
    variables = super().params_from_state_dict(plain, state_dict, what)
    if module.scan_blocks:
      variables = {"params": stack_transformer_blocks(variables["params"])}
    return variables

  def state_dict_from_params(self, module, variables):
    params = meta.unbox(variables["params"] if "params" in variables else variables)
    if module.scan_blocks:
      params = unstack_transformer_blocks(params)
    return super().state_dict_from_params(module.clone(scan_blocks=False), {"params": params})

  def abstract_init(self, module):
    plain = module.clone(remat="none", scan_blocks=False)
    args, kwargs = plain.dummy_inputs(1, plain.downscale, plain.downscale, text_length=2)
    return jax.eval_shape(lambda rng: plain.init(rng, *args, **kwargs), jax.random.PRNGKey(0))


CONVERTER = register_converter("UNet2DConditionModel")(UNetConverter())
from_torch = CONVERTER.from_torch
to_torch = CONVERTER.to_torch
from_config_state = CONVERTER.from_config_state
flax_shapes = CONVERTER.flax_shapes
state_dict_from_params = CONVERTER.state_dict_from_params
params_from_state_dict = CONVERTER.params_from_state_dict
