"""What a phase loss sees besides its trainable params: every other network, EMA copies, the
apply functions and each network's noise process.

    x0 = ctx.x0("teacher", x_t, t, cond)                         # frozen teacher, its own params
    out = ctx.apply("student", x_t, t, cond, params=trainable["student"])
    tgt = ctx.apply("student", x_t, t, cond, params=ctx.ema["student"]["target"])

`t` is always in the network's process units; the network's timestep input is
`process.timestep(t)`. `ctx.apply` returns the raw output in the network's prediction kind;
`ctx.x0`/`ctx.eps` convert it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import struct

from distill import processes as procs

Params = Any

# Batch keys -> the keyword the models' __call__ uses for them.
BATCH_TO_MODEL_KWARG = {
    "label": "class_labels",
    "text_embeds": "encoder_hidden_states",
    "text_mask": "encoder_attention_mask",
}
# Batch keys gathered into the SD UNet's `added_cond` dict (diffusers' added_cond_kwargs, SDXL).
BATCH_TO_ADDED_COND = {"pooled_text_embeds": "text_embeds", "time_ids": "time_ids"}


def cond_from_batch(batch: Mapping[str, jax.Array]) -> dict:
  """The conditioning keywords of a batch (everything but the data `x`): class labels, text
  embeddings and mask, and SDXL's pooled text embedding + size/crop ids as `added_cond`."""
  cond = {BATCH_TO_MODEL_KWARG[k]: v for k, v in batch.items() if k in BATCH_TO_MODEL_KWARG}
  added = {BATCH_TO_ADDED_COND[k]: v for k, v in batch.items() if k in BATCH_TO_ADDED_COND}
  if added:
    cond["added_cond"] = added
  return cond


# Model keywords that carry a prompt. Without the data's own null prompt (`NetInfo.null_inputs`)
# the null condition sets them to zeros (DMD2-SDXL's null prompt: all-zero prompt and pooled
# embeddings; the text mask and SDXL's size ids stay).
NULL_AS_ZEROS = ("encoder_hidden_states",)
NULL_ADDED_AS_ZEROS = ("text_embeds",)


def conditional(info: "NetInfo", cond: Optional[Mapping]) -> bool:
  """Whether `cond` holds a condition the network can drop (class labels of a class-conditional
  network, or a prompt), i.e. whether classifier-free guidance changes anything."""
  cond = cond or {}
  return bool((info.num_classes and "class_labels" in cond)
              or any(k in cond for k in NULL_AS_ZEROS))


def null_condition(info: "NetInfo", cond: Optional[Mapping], where=None) -> dict:
  """`cond` with the condition dropped (everywhere, or for the samples where `where` (B,) is
  True): class labels -> the null class `num_classes`; prompt embeddings (and SDXL's pooled
  embedding, and the text mask where the null prompt has one) -> the network's null prompt
  `info.null_inputs` (the encoded empty prompt of the data's text encoder), or zeros without
  one (the null prompt of DMD2-SDXL). Other keys are kept."""
  cond = dict(cond or {})
  null = cond_from_batch(info.null_inputs)  # batch keys -> the models' keywords

  def drop(value, null_value):
    null_value = jnp.asarray(null_value)
    if null_value.ndim and null_value.shape != value.shape[1:]:
      raise ValueError(f"network {info.name!r}: the null prompt has shape {null_value.shape}, "
                       f"the batch's condition {value.shape[1:]} per example")
    if where is None:
      return jnp.broadcast_to(null_value, value.shape).astype(value.dtype)
    mask = jnp.reshape(where, where.shape + (1,) * (value.ndim - 1))
    return jnp.where(mask, null_value, value).astype(value.dtype)

  if info.num_classes and "class_labels" in cond:
    cond["class_labels"] = drop(cond["class_labels"], info.num_classes)
  for k in NULL_AS_ZEROS:
    if k in cond:
      cond[k] = drop(cond[k], null.get(k, 0))
  if "encoder_attention_mask" in cond and "encoder_attention_mask" in null:
    cond["encoder_attention_mask"] = drop(cond["encoder_attention_mask"],
                                          null["encoder_attention_mask"])
  if "added_cond" in cond:
    added_null = null.get("added_cond", {})
    cond["added_cond"] = {k: drop(v, added_null.get(k, 0)) if k in NULL_ADDED_AS_ZEROS else v
                          for k, v in cond["added_cond"].items()}
  return cond


# Guidance embedding: a student that takes the CFG scale w as an input. Each model class says
# how (`GUIDANCE_EMBED`: the constructor options that add the input; `guidance_inputs(w)`: the
# call keywords); the default is DiT's / the toy MLP's `guidance_embed` + `guidance=w`.
DEFAULT_GUIDANCE_EMBED = {"guidance_embed": True}


def guidance_embed_kwargs(model_cls) -> dict:
  """The constructor options that give a model of `model_cls` a w input."""
  return dict(getattr(model_cls, "GUIDANCE_EMBED", DEFAULT_GUIDANCE_EMBED))


def embeds_guidance(module) -> bool:
  """Whether a module takes the CFG scale as an input."""
  return all(getattr(module, k, None) for k in guidance_embed_kwargs(type(module)))


def guidance_inputs(module, w) -> dict:
  """The call keywords that give `module` the CFG scale w (per sample or scalar)."""
  fn = getattr(module, "guidance_inputs", None)
  return fn(w) if fn is not None else {"guidance": w}


@dataclasses.dataclass(frozen=True, eq=False)
class NetInfo:
  """Static facts about one network."""
  name: str
  module: Any                      # the flax module
  prediction: str = "flow"         # eps | x0 | v | flow | raw (heads)
  process: Any = None              # the network's noise process
  num_classes: int = 0             # class-conditional: index num_classes is the null class
  base: Optional[str] = None       # frozen network whose weights a LoRA network merges into
  lora_scale: float = 1.0
  apply_fn: Optional[Callable] = None  # apply(variables, *args, **kw); default module.apply
  output_channels: int = 0         # keep only the first channels (DiT learn_sigma: eps of [eps, var])
  wrapper: Optional[Callable] = None   # (info, raw_apply, t) -> apply with the same signature
  flops_per_example: float = 0.0
  # A wrapper that presents the network in another parameterisation (distill/wrappers.py, e.g.
  # a rectified-flow network seen as TrigFlow) declares `present(process, prediction)`; then
  # `process` / `prediction` are the presented ones and these keep the network's own.
  inner_process: Any = None
  inner_prediction: Optional[str] = None
  # The data's null prompt as batch keys without the batch axis (`Source.null_inputs`, e.g. the
  # encoded empty prompt); empty: zeros (see `null_condition`).
  null_inputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    present = getattr(self.wrapper, "present", None)
    if present is None or self.inner_process is not None:
      return
    process, prediction = present(self.process, self.prediction)
    object.__setattr__(self, "inner_process", self.process)
    object.__setattr__(self, "inner_prediction", self.prediction)
    object.__setattr__(self, "process", process)
    object.__setattr__(self, "prediction", prediction)

  @property
  def own_process(self) -> Any:
    """The process of the network's raw output (what it computes, under any wrapper)."""
    return self.inner_process if self.inner_process is not None else self.process

  @property
  def own_prediction(self) -> str:
    """The prediction kind of the network's raw output."""
    return self.inner_prediction if self.inner_prediction is not None else self.prediction


def merge_params(info: NetInfo, params: Params, all_params: Mapping[str, Params]) -> Params:
  """The full weights of a network: its own, or its base's with a LoRA adapter merged."""
  if info.base is None:
    return params
  from models import lora
  return lora.lora_merge(all_params[info.base], params, info.lora_scale)


class Networks(dict):
  """name -> NetInfo of an objective's networks; a name it lacks (a misspelt `ctx.x0("teachr",
  ...)` in a loss) is a KeyError that lists the names it has."""

  def __missing__(self, name):
    raise KeyError(f"no network {name!r} in this objective (it has {', '.join(self)})")


@struct.dataclass
class Context:
  params: dict               # name -> params of networks this phase does not train
  ema: dict                  # name -> role -> params
  model_state: dict          # name -> mutable collections
  nets: dict = struct.field(pytree_node=False)        # name -> NetInfo
  mesh: Any = struct.field(pytree_node=False, default=None)

  # -- raw application -------------------------------------------------------------------
  def variables(self, name: str, params: Optional[Params] = None) -> dict:
    info = self.nets[name]
    p = self.params[name] if params is None else params
    p = merge_params(info, p, self.params)
    variables = {"params": p}
    variables.update(self.model_state.get(name, {}))
    return variables

  def call(self, name: str, *args, params: Optional[Params] = None, **kwargs):
    """module.apply(variables, *args, **kwargs) with this network's (merged) weights."""
    info = self.nets[name]
    apply = info.apply_fn or info.module.apply
    out = apply(self.variables(name, params), *args, **kwargs)
    if info.output_channels:
      keep = lambda y: y[..., :info.output_channels]
      out = (keep(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else keep(out)
    return out

  # -- denoiser view (t in process units) ------------------------------------------------
  def process(self, name: str):
    return self.nets[name].process

  def apply(self, name: str, x_t, t, cond: Optional[Mapping] = None, *,
            params: Optional[Params] = None, **extras):
    """Raw network output for noisy x_t at process time t (scalar or per-sample)."""
    info = self.nets[name]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
    timestep = info.process.timestep(t)

    def raw(x, ts, **kw):
      return self.call(name, x, ts, params=params, **kw)

    fn = info.wrapper(info, raw, t) if info.wrapper is not None else raw
    return fn(x_t, timestep, **dict(cond or {}), **extras)

  def x0(self, name: str, x_t, t, cond=None, *, params=None, **extras):
    out = self.apply(name, x_t, t, cond, params=params, **extras)
    return to_kind(self.nets[name], out, "x0", x_t, t)

  def eps(self, name: str, x_t, t, cond=None, *, params=None, **extras):
    out = self.apply(name, x_t, t, cond, params=params, **extras)
    return to_kind(self.nets[name], out, "eps", x_t, t)

  def guidance_inputs(self, name: str, w) -> dict:
    """The call keywords that give network `name` the CFG scale w (`guidance_inputs`)."""
    return guidance_inputs(self.nets[name].module, w)



def to_kind(info: NetInfo, out, kind: str, x_t, t):
  """Converts a network's output from its prediction kind to `kind` at (x_t, t)."""
  if info.prediction == kind:
    return out
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x_t.shape[0],))
  alpha, sigma = info.process.alpha_sigma(t)
  shape = (-1,) + (1,) * (x_t.ndim - 1)
  return procs.convert(out, info.prediction, kind, x_t, alpha.reshape(shape),
                       sigma.reshape(shape))
