"""DiT weights: diffusers' DiTTransformer2DModel and the original facebookresearch checkpoints.

    module, variables = CONVERTERS.get("DiTTransformer2DModel").from_torch(torch_dit)
    torch_dit = CONVERTERS.get("DiTTransformer2DModel").to_torch(module, variables)
    module, variables = from_original(load_torch_file("DiT-XL-2-256x256.pt"),
                                      num_attention_heads=16)

`from_torch` / `from_config_state` / `from_original` accept overrides of our execution fields
(`scan_blocks`, `remat`, `attention`, `dtype`, `param_dtype`, ...): with `scan_blocks=True`
the block parameters come back stacked. Conversion is strict: any missing, unexpected or
mis-shaped key raises one ValueError naming them all.

Original layout -> diffusers (as diffusers' scripts/convert_dit_to_diffusers.py): the single
`t_embedder` / `y_embedder` are copied into every block's `norm1.emb`, `attn.qkv` is split into
`to_q/to_k/to_v`, `adaLN_modulation.1` -> `norm1.linear`, `mlp.fc1/fc2` -> `ff.net.0.proj/ff.net.2`,
`final_layer.adaLN_modulation.1/linear` -> `proj_out_1/proj_out_2`; the fixed `pos_embed` buffer
is dropped (we recompute it). Note diffusers' timestep sinusoid uses `downscale_freq_shift=1`
where the original DiT uses 0, so a converted original checkpoint reproduces diffusers' model,
as with diffusers' own conversion.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.convert.common import (Rule, TorchConverter, check_keys, expected_torch_shapes,
                                   flatten_tree, flax_to_torch, follow_tensor_dtype,
                                   numpy_to_torch, to_numpy, torch_module_with, torch_to_flax)
from models.convert.registry import register_converter
from models.dit import (BLOCK_PREFIX, DiT, sincos_pos_embed, stack_block_params,
                        unstack_block_params)

# diffusers config key -> our DiT field (same names).
_CONFIG_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                  "num_layers", "dropout", "attention_bias", "sample_size", "patch_size",
                  "activation_fn", "num_embeds_ada_norm", "norm_elementwise_affine", "norm_eps")
# Our fields diffusers cannot express, with the value they must have for export.
_EXPORTABLE = {"norm": "layer", "qk_norm": False, "pos_embed": "sincos", "rope": False,
               "mlp": "gelu", "mlp_ratio": 4.0, "guidance_embed": False,
               "timestep2_embed": False, "guidance_adapter": 0}
# Why a student with another value of the field cannot be exported (default: no equivalent).
_NOT_EXPORTABLE = {
    "guidance_embed": "this student takes the guidance scale w as an input (guidance_embed: "
                      "its guidance_embedder, the guided recipe's), which diffusers' "
                      "DiTTransformer2DModel has no place for; without it the network is "
                      "another one, so it cannot be exported",
}


# ----------------------------------------------------------------------------------------------
# Config.

def module_from_config(config: Mapping[str, Any], **overrides) -> DiT:
  """Our DiT from a diffusers DiTTransformer2DModel config (dict or FrozenDict)."""
  if config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
    raise ValueError(f"DiT conversion supports norm_type='ada_norm_zero', got "
                     f"{config.get('norm_type')!r}")
  if config.get("num_embeds_ada_norm") is None:
    raise ValueError("DiT conversion needs num_embeds_ada_norm (the number of classes)")
  kwargs = {k: config[k] for k in _CONFIG_FIELDS if k in config}
  kwargs.update(overrides)
  return DiT(**kwargs)


def diffusers_config(module: DiT) -> dict:
  """The DiTTransformer2DModel kwargs for our module; raises if it uses non-diffusers extras."""
  bad = {k: getattr(module, k) for k, v in _EXPORTABLE.items() if getattr(module, k) != v}
  why = [_NOT_EXPORTABLE[k] for k in bad if k in _NOT_EXPORTABLE]
  if why:
    raise ValueError(f"export: {why[0]}")
  if bad:
    raise ValueError(f"DiT with {bad} has no DiTTransformer2DModel equivalent")
  cfg = {k: getattr(module, k) for k in _CONFIG_FIELDS}
  cfg["out_channels"] = module.output_channels
  cfg["norm_type"] = "ada_norm_zero"
  return cfg


# ----------------------------------------------------------------------------------------------
# Key table (unscanned layout).

def _linear(torch_prefix: str, flax_path: tuple, bias: bool = True) -> list[Rule]:
  rules = [Rule(f"{torch_prefix}.weight", flax_path + ("kernel",), "linear")]
  if bias:
    rules.append(Rule(f"{torch_prefix}.bias", flax_path + ("bias",)))
  return rules


def rules(module: DiT) -> list[Rule]:
  """diffusers state-dict key <-> our (unscanned) param path, for every tensor of `module`."""
  out = [Rule("pos_embed.proj.weight", ("patch_embed", "kernel"), "conv2d"),
         Rule("pos_embed.proj.bias", ("patch_embed", "bias"))]
  for i in range(module.num_layers):
    t, f = f"transformer_blocks.{i}", (f"{BLOCK_PREFIX}_{i}",)
    emb, femb = f"{t}.norm1.emb", f + ("norm1", "emb")
    out += _linear(f"{emb}.timestep_embedder.linear_1", femb + ("timestep_embedder", "linear_1"))
    out += _linear(f"{emb}.timestep_embedder.linear_2", femb + ("timestep_embedder", "linear_2"))
    out.append(Rule(f"{emb}.class_embedder.embedding_table.weight",
                    femb + ("class_embedder", "embedding_table")))
    out += _linear(f"{t}.norm1.linear", f + ("norm1", "linear"))
    for name in ("to_q", "to_k", "to_v"):
      out += _linear(f"{t}.attn1.{name}", f + ("attn", name), module.attention_bias)
    out += _linear(f"{t}.attn1.to_out.0", f + ("attn", "to_out"))
    if module.norm_elementwise_affine:
      out += [Rule(f"{t}.norm3.weight", f + ("norm3", "scale")),
              Rule(f"{t}.norm3.bias", f + ("norm3", "bias"))]
    out += _linear(f"{t}.ff.net.0.proj", f + ("mlp", "fc1"))
    out += _linear(f"{t}.ff.net.2", f + ("mlp", "fc2"))
  out += _linear("proj_out_1", ("proj_out_1",)) + _linear("proj_out_2", ("proj_out_2",))
  return out


def flax_shapes(module: DiT) -> dict[tuple, tuple]:
  """{param path: shape} of `module` in the unscanned layout (no computation)."""
  plain = module.clone(scan_blocks=False, remat="none")
  abstract = jax.eval_shape(lambda: plain.init(jax.random.key(0), *plain.dummy_inputs(1)))
  return {p: tuple(v.shape) for p, v in flatten_tree(nn.meta.unbox(abstract["params"])).items()}


def _params_of(variables: Mapping) -> Mapping:
  params = variables["params"] if "params" in variables else variables
  return nn.meta.unbox(params)


# ----------------------------------------------------------------------------------------------
# State dicts.

def params_from_state_dict(module: DiT, state_dict: Mapping[str, Any],
                           what: str = "DiT state dict") -> dict:
  """A diffusers DiT state dict -> `{"params": ...}` for `module` (stacked if scan_blocks)."""
  params = torch_to_flax(state_dict, rules(module), flax_shapes(module), what=what)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  if module.scan_blocks:
    params = stack_block_params(params, module.num_layers)
  return {"params": params}


def state_dict_from_params(module: DiT, variables: Mapping) -> dict[str, np.ndarray]:
  """`{"params": ...}` (scanned or not, boxed or not) -> a diffusers DiT state dict (numpy)."""
  params = _params_of(variables)
  if module.scan_blocks:
    params = unstack_block_params(params, module.num_layers)
  return flax_to_torch(params, rules(module))


class DiTConverter(TorchConverter):
  """diffusers DiTTransformer2DModel <-> our DiT (see the module docstring)."""

  flax_module_type = DiT
  subfolder = "transformer"          # its folder in a diffusers pipeline directory
  pipeline_class = "DiTPipeline"

  def peft_lora(self, module: DiT, lora_params: Mapping, *, rank: int, alpha: float):
    """A LoRA tree over this DiT (scanned or not) -> PEFT (tensors, adapter_config)."""
    from models.convert import export  # pylint: disable=import-outside-toplevel
    tree = nn.meta.unbox(lora_params)
    if module.scan_blocks and BLOCK_PREFIX in tree:
      tree = unstack_block_params(tree, module.num_layers)
    return export.peft_lora(rules(module), tree, rank=rank, alpha=alpha)

  def from_config_state(self, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                        **overrides):
    """Params keep the tensors' dtype; `param_dtype` follows it unless overridden."""
    module = module_from_config(config, **follow_tensor_dtype(state_dict, overrides))
    return module, params_from_state_dict(module, state_dict)

  def to_torch(self, module: DiT, variables: Mapping):
    from diffusers import DiTTransformer2DModel  # pylint: disable=import-outside-toplevel
    config = diffusers_config(module)   # first: what diffusers cannot express, in one line
    tensors = numpy_to_torch(state_dict_from_params(module, variables))
    return torch_module_with(DiTTransformer2DModel, config, tensors)


CONVERTER = register_converter("DiTTransformer2DModel")(DiTConverter())


# ----------------------------------------------------------------------------------------------
# Original facebookresearch/DiT checkpoints.

def _original_spec(num_layers: int) -> list[tuple[str, str, list[str]]]:
  """(original key, op, diffusers keys); op: copy | qkv (concat on axis 0) | shared (per block)."""
  spec = []

  def linear(orig, diff, op="copy"):
    for s in ("weight", "bias"):
      keys = [f"{d}.{s}" for d in diff] if isinstance(diff, list) else [f"{diff}.{s}"]
      spec.append((f"{orig}.{s}", op, keys))

  linear("x_embedder.proj", "pos_embed.proj")
  blocks = [f"transformer_blocks.{i}" for i in range(num_layers)]
  linear("t_embedder.mlp.0", [f"{b}.norm1.emb.timestep_embedder.linear_1" for b in blocks],
         "shared")
  linear("t_embedder.mlp.2", [f"{b}.norm1.emb.timestep_embedder.linear_2" for b in blocks],
         "shared")
  spec.append(("y_embedder.embedding_table.weight", "shared",
               [f"{b}.norm1.emb.class_embedder.embedding_table.weight" for b in blocks]))
  for i, b in enumerate(blocks):
    o = f"blocks.{i}"
    linear(f"{o}.attn.qkv", [f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v"], "qkv")
    linear(f"{o}.attn.proj", f"{b}.attn1.to_out.0")
    linear(f"{o}.mlp.fc1", f"{b}.ff.net.0.proj")
    linear(f"{o}.mlp.fc2", f"{b}.ff.net.2")
    linear(f"{o}.adaLN_modulation.1", f"{b}.norm1.linear")
  linear("final_layer.adaLN_modulation.1", "proj_out_1")
  linear("final_layer.linear", "proj_out_2")
  return spec


def _original_shape(op: str, shapes: list[tuple]) -> tuple:
  if op == "qkv":
    return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
  return tuple(shapes[0])


def original_config(state_dict: Mapping[str, Any], num_attention_heads: int = 16,
                    sample_size: Optional[int] = None) -> dict:
  """DiT fields inferred from an original checkpoint (heads cannot be inferred: pass them)."""
  def shape(k):
    if k not in state_dict:
      raise ValueError(f"original DiT checkpoint has no {k!r}")
    return tuple(state_dict[k].shape)

  dim, in_ch, p, _ = shape("x_embedder.proj.weight")
  num_layers = len({k.split(".")[1] for k in state_dict
                    if k.startswith("blocks.") and k.endswith(".attn.qkv.weight")})
  if dim % num_attention_heads:
    raise ValueError(f"hidden size {dim} is not divisible by {num_attention_heads} heads")
  if sample_size is None:
    if "pos_embed" not in state_dict:
      raise ValueError("pass sample_size: the checkpoint has no pos_embed to infer it from")
    sample_size = int(math.isqrt(shape("pos_embed")[1])) * p
  return dict(num_attention_heads=num_attention_heads,
              attention_head_dim=dim // num_attention_heads, in_channels=in_ch,
              out_channels=shape("final_layer.linear.weight")[0] // (p * p),
              num_layers=num_layers, sample_size=sample_size, patch_size=p,
              num_embeds_ada_norm=shape("y_embedder.embedding_table.weight")[0] - 1)


def original_to_diffusers(state_dict: Mapping[str, Any], num_layers: int,
                          expected: Optional[Mapping[str, tuple]] = None) -> dict:
  """Original-layout tensors -> diffusers-layout numpy state dict (strict when `expected`)."""
  spec = _original_spec(num_layers)
  got = {k: tuple(v.shape) for k, v in state_dict.items() if k != "pos_embed"}
  if expected is not None:
    check_keys({o: _original_shape(op, [expected[d] for d in ds]) for o, op, ds in spec}, got,
               what="original DiT checkpoint")
  else:
    check_keys({o: got.get(o, ()) for o, _, _ in spec}, got, what="original DiT checkpoint")
  out = {}
  for orig, op, diff in spec:
    a = to_numpy(state_dict[orig])
    if op == "qkv":
      out.update(zip(diff, np.split(a, 3, axis=0)))
    else:
      out.update({d: a for d in diff})
  return out


def diffusers_to_original(state_dict: Mapping[str, Any], num_layers: int,
                          pos_embed: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
  """diffusers-layout tensors -> original layout; the per-block embedders must all be equal."""
  out = {}
  for orig, op, diff in _original_spec(num_layers):
    arrays = [to_numpy(state_dict[d]) for d in diff]
    if op == "qkv":
      out[orig] = np.concatenate(arrays, axis=0)
    else:
      if any(not np.array_equal(arrays[0], a) for a in arrays[1:]):
        raise ValueError(f"{orig}: the blocks' copies differ; the original layout has one")
      out[orig] = arrays[0]
  if pos_embed is not None:
    out["pos_embed"] = pos_embed
  return out


def from_original(state_dict: Mapping[str, Any], num_attention_heads: int = 16,
                  sample_size: Optional[int] = None, **overrides):
  """An original facebookresearch DiT state dict -> (our DiT, variables), strictly."""
  module = DiT(**original_config(state_dict, num_attention_heads, sample_size), **overrides)
  expected = expected_torch_shapes(rules(module), flax_shapes(module))
  converted = original_to_diffusers(state_dict, module.num_layers, expected)
  return module, params_from_state_dict(module, converted, what="converted original DiT")


def to_original(module: DiT, variables: Mapping) -> dict[str, np.ndarray]:
  """Our DiT -> an original-layout state dict (numpy), with the fixed `pos_embed` buffer."""
  grid = module.sample_size // module.patch_size
  pos = sincos_pos_embed(module.hidden_size, grid, grid, grid)[None]
  return diffusers_to_original(state_dict_from_params(module, variables), module.num_layers,
                               pos_embed=pos)

