"""The engine: builds every network of an objective, the sharded train state, and one jitted,
sharded, donating step function per phase (and per stage, where stages override the
objective's keys).

    engine = Engine(config, teacher=teacher)
    state, frozen = engine.init_state()
    for step in ...:
      state, frozen, metrics = engine.train_step(state, frozen, step)

The loop around it (logging, checkpoints, evaluation, signals) is distill/trainer.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import re
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.core import meta

from distill import context as ctx_lib
from distill import optim as optim_lib
from distill import processes as procs
from distill import sharding as shd
from distill import solvers
from distill import teacher as teacher_lib
from distill.data import sources
from distill.objective import (OBJECTIVES, Network, Objective, Stage, Time, make_time,
                              promotion_source)
from distill.state import TrainState, new_state
from models.registry import MODELS, build_model

# Config keys of `model` that the engine reads itself (the rest are constructor arguments).
ENGINE_MODEL_KEYS = ("name", "prediction", "attention", "jvp_attention", "output_channels")

# Constructor fields some models use for their class count (the null class is one past it).
CLASS_COUNT_FIELDS = ("num_classes", "num_embeds_ada_norm")


def module_fields(cls) -> dict:
  """Constructor arguments of a dataclass (a Linen module, a process) with their defaults.

  Fields a class lists in `any_type_fields` (e.g. the UNet's per-block values: an int or one
  per block) map to None, so config validation accepts any type for them."""
  out = {}
  any_type = set(getattr(cls, "any_type_fields", ()))
  for f in dataclasses.fields(cls):
    if f.name in ("parent", "name") or not f.init:
      continue
    if f.name in any_type:
      out[f.name] = None
    elif f.default is not dataclasses.MISSING:
      out[f.name] = _config_value(f.default)
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
      out[f.name] = f.default_factory()  # type: ignore[misc]
    else:
      out[f.name] = None
  return out


def init_inputs(module, source, num_classes: int = 0):
  """(args, kwargs) of a network's init call: x and t, plus one example of each conditioning
  input the data carries that the network accepts (class labels only for class-conditional
  networks) and the network's own required extras (`dummy_kwargs`, e.g. SANA-Sprint's
  guidance)."""
  x = jnp.zeros((1,) + tuple(source.shape), jnp.float32)
  t = jnp.zeros((1,), jnp.float32)
  probe = source.batch(0, 1, 0, 1)
  kw = ctx_lib.cond_from_batch({k: jnp.zeros((1,) + np.shape(v)[1:], np.asarray(v).dtype)
                                for k, v in probe.items() if k != "x"})
  if not num_classes:
    kw.pop("class_labels", None)
  accepted = inspect.signature(type(module).__call__).parameters
  if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
    kw = {k: v for k, v in kw.items() if k in accepted}   # heads take no text conditioning
  if hasattr(module, "dummy_kwargs"):
    kw.update({k: v for k, v in module.dummy_kwargs(1).items() if k not in kw})
  return (x, t), kw


def _config_value(v):
  """Module defaults as config values: dtypes become their names."""
  if isinstance(v, type) or isinstance(v, np.dtype):
    try:
      return np.dtype(v).name
    except TypeError:
      return v
  return v


def data_derived_kwargs(cls, source) -> dict:
  """Constructor arguments a model takes from its data (sizes, channels, classes)."""
  fields = module_fields(cls)
  shape = tuple(source.shape)
  derived = {}
  if "dim" in fields:
    derived["dim"] = int(np.prod(shape))
  for f in CLASS_COUNT_FIELDS:
    if f in fields:
      derived[f] = int(source.num_classes)
  if len(shape) == 3:
    if "sample_size" in fields:
      derived["sample_size"] = shape[0]
    if "in_channels" in fields:
      derived["in_channels"] = shape[-1]
  return derived


def resolve_model_config(model_cfg: Mapping[str, Any], source) -> dict:
  """The student's model config with data-derived arguments filled in where unset."""
  cfg = dict(model_cfg)
  cls = MODELS.get(cfg["name"])
  fields = module_fields(cls)
  for k, v in data_derived_kwargs(cls, source).items():
    if cfg.get(k) in (None, 0, ()) or k not in cfg:
      cfg[k] = v
  # Attention implementation goes to modules that take it.
  if "attention" in fields:
    cfg["attention"] = model_cfg.get("attention", "xla")
  if "jvp_attention" in fields:
    cfg["jvp_attention"] = model_cfg.get("jvp_attention", "xla")
  unknown = [k for k in cfg if k not in fields and k not in ENGINE_MODEL_KEYS]
  if unknown:
    raise ValueError(f"unknown config key 'model.{unknown[0]}' for model {cfg['name']!r}")
  return cfg


def num_classes_of(cfg: Mapping[str, Any]) -> int:
  """A model config's class count (0: unconditional)."""
  for f in CLASS_COUNT_FIELDS:
    if cfg.get(f):
      return int(cfg[f])
  return 0


def network_kwargs(net: Network, mcfg: Mapping[str, Any]) -> dict:
  """A network's constructor overrides for its model: `guidance_embed=True` (an objective's
  "this student takes the CFG scale w as an input") becomes the model's own way of embedding w
  (`context.guidance_embed_kwargs`: DiT guidance_embed, SANA guidance_embeds, UNet LCM's
  time_cond_proj_dim; a value the model config already sets is kept)."""
  kwargs = dict(net.kwargs)
  if kwargs.pop("guidance_embed", False):
    for k, v in ctx_lib.guidance_embed_kwargs(MODELS.get(mcfg["name"])).items():
      kwargs[k] = mcfg.get(k) or v
  return kwargs


def check_network_kwargs(net: Network, mcfg) -> None:
  """An objective's constructor overrides must be options of the network's model (a silently
  dropped option, e.g. an adapter the model does not have, would train something else).
  `mcfg`: the model config, or just the model's registry name."""
  mcfg = {"name": mcfg} if isinstance(mcfg, str) else mcfg
  model = mcfg["name"]
  fields = module_fields(MODELS.get(model))
  unknown = sorted(k for k in network_kwargs(net, mcfg) if k not in fields)
  if unknown:
    raise ValueError(f"network {net.name!r}: model {model!r} has no option {unknown}; the "
                     f"objective needs a model that has it")


def with_network_kwargs(net: Network, mcfg: dict) -> dict:
  """The model config `mcfg` with the network's constructor overrides applied (checked)."""
  check_network_kwargs(net, mcfg)
  return {**mcfg, **network_kwargs(net, mcfg)}


def module_from_config(cfg: Mapping[str, Any]):
  kwargs = {k: v for k, v in cfg.items() if k not in ("name", "prediction")}
  cls = MODELS.get(cfg["name"])
  fields = module_fields(cls)
  kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items() if k in fields}
  for k in ("dtype", "param_dtype"):
    if isinstance(kwargs.get(k), str):
      kwargs[k] = jnp.dtype(kwargs[k])
  return build_model(cfg["name"], **kwargs)


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def overlay_params(target: Any, source: Any, what: str) -> Any:
  """Copies every source parameter into target (same paths and shapes); strict."""
  src = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(source)[0]}
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  out, used = [], set()
  for p, v in flat:
    k = path_str(p)
    if k in src:
      if tuple(np.shape(src[k])) != tuple(np.shape(v)):
        raise ValueError(f"{what}: parameter {k} has shape {np.shape(src[k])}, "
                         f"the network expects {np.shape(v)}")
      out.append(src[k])
      used.add(k)
    else:
      out.append(v)
  missing = sorted(set(src) - used)
  if missing:
    raise ValueError(f"{what}: parameters {missing[:5]} have no place in the new network")
  return jax.tree_util.tree_unflatten(treedef, out)


def params_for(module, params: Any, source_config: Mapping[str, Any]) -> Any:
  """A source network's `params` laid out for `module` where the model moves weights when its
  architecture changes (its `params_from(params, source_config)`, e.g. SANA's timestep MLP when
  a guidance embedding is added); unchanged for models without that hook."""
  hook = getattr(module, "params_from", None)
  return params if hook is None else hook(params, source_config)


@dataclasses.dataclass
class NetPlan:
  """How one network is made: module, its process, and where its first weights come from."""
  info: ctx_lib.NetInfo
  model_config: dict
  init_from: str               # random | teacher | checkpoint | <network>
  frozen: bool
  trainable_regex: Optional[str]
  lora: Any = None


def _loss_parts(out: Any, where: str) -> tuple[Any, dict, dict]:
  """(loss, metrics, updates) of a phase loss's return value, checked while the step is traced
  (before a run writes anything): `(loss, metrics)` or `(loss, metrics, updates)` with a
  scalar loss and a dict of scalar metrics. A mistake is one line naming `where`."""
  shape = "(loss, metrics) or (loss, metrics, updates)"
  if not isinstance(out, tuple) or len(out) not in (2, 3):
    got = (f"an array of shape {jnp.shape(out)}" if hasattr(out, "shape") else
           f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, tuple) else ""))
    raise ValueError(f"{where}: the loss must return {shape}, got {got}")
  loss, metrics, updates = out if len(out) == 3 else (*out, {})
  if jnp.shape(loss) != ():
    raise ValueError(f"{where}: the loss must be a scalar, got shape {jnp.shape(loss)} (average "
                     "it over the batch)")
  if not isinstance(metrics, Mapping):
    raise ValueError(f"{where}: metrics must be a dict of scalars, got "
                     f"{type(metrics).__name__}")
  for k, v in metrics.items():
    if jnp.shape(v) != ():
      raise ValueError(f"{where}: metric {k!r} must be a scalar, got shape {jnp.shape(v)}")
  if not isinstance(updates, Mapping):
    raise ValueError(f"{where}: updates (mutable collections) must be a dict, got "
                     f"{type(updates).__name__}")
  return loss, dict(metrics), updates


class Engine:
  """Builds networks, state and phase steps for one config."""

  def __init__(self, config: ml_collections.ConfigDict, teacher=None, mesh=None,
               source=None):
    self.config = config
    self.teacher = teacher
    self.mesh = mesh if mesh is not None else shd.make_mesh(
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    self.rules = shd.parse_rules(config.sharding.rules)
    self.source = source if source is not None else sources.make_source(config.data, config.seed)
    # Every data stream a phase may read (`Phase.data`): "train" is `self.source`.
    settings = sources.stream_settings(config)
    self.streams = sources.make_stream_sources(settings, config.seed, train=self.source)
    self.stream_batch = {n: bs for n, (_, bs) in settings.items()}
    self.stream_datasets = {n: data["name"] for n, (data, _) in settings.items()}
    self.entry = OBJECTIVES.get(config.objective.name)
    self.stage_objectives = self._build_stage_objectives()
    self.objective: Objective = self.stage_objectives[0]
    self.stage_bounds = self._stage_bounds()
    self.total_steps = self.stage_bounds[-1]   # a staged objective's stages set the length
    self.plans = self._plan_networks()
    self.nets = ctx_lib.Networks({n: p.info for n, p in self.plans.items()})
    self._check_objective_names()
    self._check_promotions()
    self.init_runs = self._init_runs()
    self.init_references: dict[str, dict] = {}   # network -> reference of its init.<net> run
    self._check_data_free()
    self.trained = [n for n in self.objective.trained]
    self.frozen_names = [n for n, p in self.plans.items() if n not in self.trained]
    self._abstract = {}
    self._steps: dict[tuple[int, int], Callable] = {}
    self._reader = None   # the data read-ahead thread (global_batch)
    self._next = {}       # stream -> (key, future) of its batch being read ahead
    self.optimizers = {}
    self.schedules = {}
    for n in self.trained:
      s = optim_lib.network_settings(config.optim, n)
      self.optimizers[n] = optim_lib.make_optimizer(s)
    self.state_shardings = None
    self.frozen_shardings = None

  # ------------------------------------------------------------------ objective and stages
  def _build_stage_objectives(self) -> list[Objective]:
    ocfg = self.config.objective
    first = self._build_objective(ocfg)
    # The stage list is the one the configured objective declares (a stage's own objective is
    # built from overridden keys and may declare other stages: those are not used).
    self.stages: tuple[Stage, ...] = tuple(first.stages)
    if not first.stages:
      return [first]
    out = []
    for stage in first.stages:
      c = ml_collections.ConfigDict(ocfg.to_dict())
      for k, v in stage.overrides.items():
        if k not in c:
          raise ValueError(f"stage override: unknown config key 'objective.{k}'")
        with c.ignore_type():
          c[k] = v
      out.append(self._build_objective(c))
    return out

  def _build_objective(self, ocfg: ml_collections.ConfigDict) -> Objective:
    """The registered builder's Objective; a key it reads that the config lacks (one missing
    from its `register_objective(defaults=...)`) is one line naming it."""
    try:
      return self.entry.build(ocfg)
    except (AttributeError, KeyError) as e:
      m = re.fullmatch(r"""["']*(\w+)["']*""", str(e.args[0]) if e.args else "")
      if not m or m.group(1) in ocfg:
        raise
      raise ValueError(f"objective {ocfg.name!r}: its builder reads config key "
                       f"'objective.{m.group(1)}', which the config lacks (declare it in "
                       f"register_objective(..., defaults=...))") from None

  def _check_objective_names(self) -> None:
    """The names an objective gives (its sampler, each phase's networks and data stream) exist,
    and every configured stream is read, so that a misspelt one stops at setup instead of after
    training (its `student`: checked where the run evaluates it)."""
    name = self.config.objective.name
    for obj in self.stage_objectives:
      solvers.check_sampler(obj.sampler, f"objective {name!r}: sampler")
      for phase in obj.phases:
        missing = [n for n in phase.trains if n not in self.plans]
        if missing:
          raise ValueError(f"objective {name!r}: phase {phase.name!r} trains {missing[0]!r}, "
                           f"not one of its networks ({', '.join(self.plans)})")
        for stream in phase.streams:
          if stream not in self.streams:
            raise ValueError(f"objective {name!r}: phase {phase.name!r} reads data stream "
                             f"{stream!r}, which the config does not give (its streams: "
                             f"{', '.join(self.streams)}): add it with --config.data_streams."
                             f"{stream}.name=DATASET and that dataset's keys")
        self._check_stream_keys(phase)
    read = {s for obj in self.stage_objectives for p in obj.phases for s in p.streams}
    for stream in self.streams:
      if stream != sources.TRAIN_STREAM and stream not in read:
        raise ValueError(f"config key 'data_streams.{stream}': no phase of objective {name!r} "
                         f"reads it (its phases read: {', '.join(sorted(read))})")
    self._check_per_network_entries()

  def _check_stream_keys(self, phase) -> None:
    """A phase reading several streams gets each further one under its name: that name must not
    be a key of its first stream's batch (it would hide that key)."""
    first, *more = phase.streams
    clash = [n for n in more if n in self._batch_shapes(first)]
    if clash:
      raise ValueError(f"config key 'data_streams.{clash[0]}': phase {phase.name!r} reads this "
                       f"stream under batch[{clash[0]!r}], which is also a key of stream "
                       f"{first!r}'s batch: name the stream otherwise")

  def _check_per_network_entries(self) -> None:
    """The config's `ema.<net>.<role>` and `optim.networks.<net>` name what the objective has
    (else they would be silently unused)."""
    name = self.config.objective.name
    roles = {}
    for obj in self.stage_objectives:
      for net, rs in obj.ema.items():
        if not isinstance(rs, Mapping):
          raise ValueError(f"objective {name!r}: ema[{net!r}] must map roles to decays, e.g. "
                           f"{{{net!r}: {{'eval': 0.999}}}}, got {rs!r}")
        roles.setdefault(net, set()).update(rs)
    have = "; ".join(f"{n}: {', '.join(sorted(r))}" for n, r in roles.items()) or "none"
    for net, entry in (self.config.get("ema") or {}).items():
      for role in (entry or {}):
        if role not in roles.get(net, ()):
          raise ValueError(f"config key 'ema.{net}.{role}': objective {name!r} keeps no EMA "
                           f"role {role!r} of network {net!r} (its EMA roles: {have})")
    trained = {n for obj in self.stage_objectives for n in obj.trained}
    for net in (self.config.optim.get("networks") or {}):
      if net not in trained:
        raise ValueError(f"config key 'optim.networks.{net}': objective {name!r} trains no "
                         f"network {net!r} (it trains {', '.join(sorted(trained))})")

  def _check_promotions(self) -> None:
    """A promotion's source is a network (or one of its EMA roles) of the objective; a LoRA
    network promoted into its own base would carry its adapter twice afterwards."""
    roles = self.ema_roles()
    for stage in self.stages:
      for target, source in stage.promote.items():
        network, role = promotion_source(source)
        if role is not None and role not in roles.get(network, {}):
          raise ValueError(f"stage promotion {source!r} -> {target!r}: network {network!r} has "
                           f"no EMA role {role!r} (it has "
                           f"{', '.join(roles.get(network, {})) or 'none'})")
        if self.nets[network].base == target:
          raise ValueError(f"stage promotion {source!r} -> {target!r}: {target!r} is the base "
                           f"of the LoRA network {source!r} (give the adapter its own frozen "
                           "base network)")

  def _stage_bounds(self) -> list[int]:
    stages = self.stages
    if not stages:
      return [0, int(self.config.train.steps)]
    bounds = [0]
    for i, s in enumerate(stages):
      if int(s.steps) < 1:   # a zero-length stage would be promoted from untrained weights
        raise ValueError(f"objective {self.config.objective.name!r}: stage {i} has {s.steps} "
                         f"steps; each stage needs > 0 (its objective.*steps key)")
      bounds.append(bounds[-1] + int(s.steps))
    return bounds

  def stage_of(self, step: int) -> tuple[int, int]:
    """(stage index, step within the stage) of a global step."""
    for i in range(len(self.stage_bounds) - 1):
      if step < self.stage_bounds[i + 1]:
        return i, step - self.stage_bounds[i]
    last = len(self.stage_bounds) - 2
    return last, step - self.stage_bounds[last]

  def stage_length(self, stage: int) -> int:
    return self.stage_bounds[stage + 1] - self.stage_bounds[stage]

  @property
  def boundary_steps(self) -> list[int]:
    """Steps whose checkpoints end a stage (kept outside keep-N)."""
    return self.stage_bounds[1:-1]

  # ------------------------------------------------------------------ networks
  def _student_plan(self, net: Network) -> tuple[Any, dict, Any, str, int]:
    cfg = self.config
    if net.model is not None:
      mcfg = {"name": net.model, "prediction": "raw", **dict(net.kwargs)}
      mcfg = resolve_model_config(mcfg, self.source)
      return module_from_config(mcfg), mcfg, None, "raw", 0
    mcfg = with_network_kwargs(net, resolve_model_config(cfg.model.to_dict(), self.source))
    process = procs.make_process(**cfg.process.to_dict())
    return (module_from_config(mcfg), mcfg, process, mcfg["prediction"], num_classes_of(mcfg))

  def _plan_networks(self) -> dict[str, NetPlan]:
    plans: dict[str, NetPlan] = {}
    trained = set(self.objective.trained)
    t = self.teacher
    null_inputs = {k: np.asarray(v) for k, v in self.source.null_inputs().items()}
    for net in self.objective.networks:
      if net.init in plans or net.init in ("checkpoint", "teacher"):
        if net.init in plans:  # a copy of an earlier network (also one named 'teacher')
          src = plans[net.init].info
          base_cfg, base_module = plans[net.init].model_config, src.module
          process, prediction, ncls = src.process, src.prediction, src.num_classes
        else:
          if t is None:
            raise ValueError(f"config key 'teacher.checkpoint': objective "
                             f"{self.config.objective.name!r} needs a teacher (network "
                             f"{net.name!r})")
          base_cfg, base_module = t.model_config, t.module
          process, prediction, ncls = t.process, t.prediction, t.num_classes
        # `model` and `reparameterize` apply to a copy of the teacher however it is reached.
        mcfg = with_network_kwargs(net, {**base_cfg,
                                         **({"name": net.model} if net.model is not None else {})})
        module = (base_module if (net.model is None and not net.kwargs)
                  else module_from_config(mcfg))
        prediction = mcfg.get("prediction", prediction)
        if net.reparameterize:  # the teacher's weights, trained in the config's parameterisation
          process = procs.make_process(**self.config.process.to_dict())
          prediction = mcfg["prediction"] = self.config.model.prediction
      elif net.init == "random":
        module, mcfg, process, prediction, ncls = self._student_plan(net)
      else:
        raise ValueError(f"network {net.name!r}: init {net.init!r} is neither random, teacher, "
                         "checkpoint nor an earlier network")
      frozen = net.frozen or net.name not in trained
      if net.name in trained and net.frozen:
        raise ValueError(f"network {net.name!r} is trained by a phase but declared frozen")
      lora_scale = 1.0
      if net.adapter is not None:
        if net.base is None:
          raise ValueError(f"network {net.name!r}: a LoRA adapter needs `base`")
        r = net.adapter
        lora_scale = (r.alpha if r.alpha is not None else r.rank) / r.rank
      wrapper = None
      if net.wrapper:
        from distill import wrappers
        wrapper = wrappers.WRAPPERS.get(net.wrapper)
      flops = 0.0
      if hasattr(module, "flops_per_example"):
        try:
          flops = float(module.flops_per_example())
        except Exception:  # a model may need its input shape; leave MFU unknown then
          flops = 0.0
      try:
        info = ctx_lib.NetInfo(name=net.name, module=module, prediction=prediction,
                               output_channels=int(mcfg.get("output_channels") or 0),
                               process=process, num_classes=ncls, base=net.base,
                               lora_scale=lora_scale, wrapper=wrapper, flops_per_example=flops,
                               null_inputs=null_inputs)
      except ValueError as e:   # a wrapper that cannot present the teacher's process
        if t is None or process is not t.process:
          raise
        raise ValueError(f"config key 'teacher.checkpoint': objective "
                         f"{self.config.objective.name!r} cannot read the teacher "
                         f"{t.reference.get('path', '')} (a {process.name} network, "
                         f"prediction {prediction!r}): {e}") from None
      plans[net.name] = NetPlan(info=info, model_config=mcfg, init_from=net.init,
                                frozen=frozen, trainable_regex=net.trainable, lora=net.adapter)
    return plans

  def _check_data_free(self) -> None:
    """A source without real data (`prompts`) feeds only data-free objectives and cannot be
    evaluated against: one line naming the key otherwise."""
    for objective in self.stage_objectives:
      stream = (objective.real_data if isinstance(objective.real_data, str)
                else sources.TRAIN_STREAM if objective.real_data else None)
      if stream is None or self.streams[stream].real_data:
        continue
      data = self.stream_datasets[stream]
      raise ValueError(sources.for_stream(
          f"config key 'data.name': {data!r} serves prompts without images, but objective "
          f"{self.config.objective.name!r} with these settings reads real data from stream "
          f"{stream!r} (data-free: vsd, sid / dmd2 with gan_weight = 0, agd with states = "
          "teacher; dmd2 / sid with objective.real_stream read their GAN's real images from "
          "that stream)", stream))
    if self.source.real_data:
      return
    data = self.config.data.name
    ev = self.config.eval
    if ev.at_end or ev.every_steps:
      raise ValueError(
          f"config keys 'eval.at_end' / 'eval.every_steps': {data!r} has no reference images; "
          "set eval.at_end=False and eval.every_steps=0, then evaluate the run with launch."
          "evaluate --workdir W --config.data.name=latents --config.data.path=DIR")

  def _init_runs(self) -> dict[str, str]:
    """`init.<network>` -> run directory, checked against this objective's networks."""
    runs = {k: str(v) for k, v in (self.config.get("init") or {}).items() if v}
    for name in runs:
      if name not in self.plans:
        raise ValueError(f"config key 'init.{name}': the objective has no network {name!r} "
                         f"(it has {', '.join(self.plans)})")
      if self.plans[name].lora is not None:
        raise ValueError(f"config key 'init.{name}': {name!r} is a LoRA adapter; initialise "
                         f"its base {self.plans[name].info.base!r} instead")
    return runs

  def _dummy_inputs(self, info: ctx_lib.NetInfo):
    return init_inputs(info.module, self.source, info.num_classes)

  def _init_fn(self, name: str):
    info = self.plans[name].info
    args, kw = self._dummy_inputs(info)

    def init(rng):
      variables = info.module.init(rng, *args, **kw)
      return variables
    return init

  def abstract_variables(self, name: str):
    """Boxed abstract variables of a network (logical axis metadata kept)."""
    if name not in self._abstract:
      self._abstract[name] = jax.eval_shape(self._init_fn(name), jax.random.PRNGKey(0))
    return self._abstract[name]

  def param_shardings(self, name: str):
    boxed = self.abstract_variables(name)["params"]
    sh = shd.logical_shardings(boxed, self.mesh, self.rules)
    unboxed = meta.unbox(boxed)
    return shd.tree_shardings(unboxed, sh)

  def _model_state_shardings(self, name: str):
    v = meta.unbox(self.abstract_variables(name))
    rest = {k: c for k, c in v.items() if k != "params"}
    return jax.tree_util.tree_map(lambda _: shd.replicated(self.mesh), rest)

  def _param_dtype(self, name: str):
    if name in self.trained:
      return jnp.dtype(optim_lib.network_settings(self.config.optim, name)["param_dtype"])
    return None

  def _init_params(self, name: str, rng, built: dict) -> tuple[Any, Any]:
    """Initial (params, model_state) of one network, already sharded."""
    plan = self.plans[name]
    shardings = self.param_shardings(name)
    init = self._init_fn(name)
    ms_sh = self._model_state_shardings(name)

    def random_init(r):
      v = meta.unbox(init(r))
      return v["params"], {k: c for k, c in v.items() if k != "params"}

    run = self.init_runs.get(name)
    if plan.init_from == "random" and not run:
      params, mstate = jax.jit(random_init, out_shardings=(shardings, ms_sh))(rng)
    else:
      source = run or plan.init_from
      if run:  # init.<name>: the same network of another run
        src = teacher_lib.load_run_network(run, name, key=f"init.{name}")
        self.init_references[name] = {**src.reference, "key": f"init.{name}"}
        src_params, src_state, src_cfg = src.params, src.model_state or {}, src.model_config
      elif plan.init_from in self.plans:  # an earlier network
        src_params, src_state = built[plan.init_from]
        src_cfg = self.plans[plan.init_from].model_config
      else:  # the teacher checkpoint
        src_params, src_state = self.teacher.params, self.teacher.model_state or {}
        src_cfg = self.teacher.model_config
      # Copies (jnp.array): a network initialised from another must not share its buffers
      # (the train state is donated to every step).
      src_params = jax.tree_util.tree_map(jnp.array, src_params)
      if plan.model_config == src_cfg:
        params = jax.device_put(src_params, shardings)
        mstate = jax.device_put(jax.tree_util.tree_map(jnp.array, src_state), ms_sh)
      else:  # a changed architecture (e.g. an added time input): overlay the source weights
        params, mstate = jax.jit(random_init, out_shardings=(shardings, ms_sh))(rng)
        src_params = params_for(plan.info.module, src_params, src_cfg)
        params = jax.device_put(
            overlay_params(params, src_params, f"network {name!r} from {source!r}"),
            shardings)
    dtype = self._param_dtype(name)
    if dtype is not None:
      params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
    return params, mstate

  def promoted(self, name: str, stage: int) -> bool:
    """Whether a stage up to `stage` promoted another network into `name`."""
    last = min(stage, len(self.stages) - 1)
    return any(name in self.stages[s].promote for s in range(1, last + 1))

  def checkpoint_params(self, name: str):
    """The loaded teacher checkpoint's weights as network `name` holds them at the start (the
    reference that teacher rows are computed with after a stage promoted into `name`)."""
    if self.plans[name].init_from != "checkpoint":
      raise ValueError(f"network {name!r} is not the teacher checkpoint")
    return self._init_params(name, jax.random.PRNGKey(0), {})[0]

  def _init_lora(self, name: str, rng, base_params):
    from models import lora
    r = self.plans[name].lora
    params = lora.lora_init(base_params, r.pattern, r.rank, rng)
    return jax.device_put(params, shd.replicated(self.mesh))

  def init_state(self, seed: Optional[int] = None) -> tuple[TrainState, dict]:
    """The sharded train state and the frozen networks."""
    seed = self.config.seed if seed is None else seed
    root = jax.random.PRNGKey(seed)
    init_key, state_key = jax.random.split(root)
    built: dict[str, tuple[Any, Any]] = {}
    for i, name in enumerate(self.plans):
      plan = self.plans[name]
      key = jax.random.fold_in(init_key, i)
      if plan.lora is not None:
        base = built[plan.info.base][0]
        built[name] = (self._init_lora(name, key, base), {})
      else:
        built[name] = self._init_params(name, key, built)
    params = {n: built[n][0] for n in self.trained}
    model_state = {n: built[n][1] for n in self.plans if built[n][1]}
    frozen = {n: built[n][0] for n in self.frozen_names}
    opt_state = {n: self._opt_init(n, params[n]) for n in self.trained}
    ema = self._ema_init(params)
    # Counters and the key live replicated on the mesh (so every step sees the same shardings).
    rep = shd.replicated(self.mesh)
    state = new_state(jax.device_put(state_key, rep), params, opt_state, ema, model_state)
    state = state.replace(**{k: jax.device_put(getattr(state, k), rep)
                             for k in ("step", "stage", "skipped", "skipped_total")})
    self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    return state, frozen

  def abstract_state(self) -> tuple[TrainState, dict]:
    """(state, frozen) as jax.ShapeDtypeStructs carrying this engine's shardings: what
    `init_state` would build, with no computation and no memory (ahead-of-time compiles for
    meshes of devices this host does not have, launch/aot.py). Sets the step shardings."""
    def sds(x, sharding):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    rep = shd.replicated(self.mesh)
    params, model_state, frozen, shardings = {}, {}, {}, {}
    for name, plan in self.plans.items():
      if plan.lora is not None:
        from models import lora
        base = params.get(plan.info.base, frozen.get(plan.info.base))
        p = jax.eval_shape(lambda b: lora.lora_init(b, plan.lora.pattern, plan.lora.rank,
                                                    jax.random.PRNGKey(0)), base)
        sh = jax.tree_util.tree_map(lambda _: rep, p)
        ms = {}
      else:
        v = meta.unbox(self.abstract_variables(name))
        p, sh = v["params"], self.param_shardings(name)
        dtype = self._param_dtype(name)
        if dtype is not None:
          p = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), p)
        ms = {k: c for k, c in v.items() if k != "params"}
      p = jax.tree_util.tree_map(sds, p, sh)
      if ms:
        model_state[name] = jax.tree_util.tree_map(lambda a: sds(a, rep), ms)
      (params if name in self.trained else frozen)[name] = p
      shardings[name] = sh
    opt_state = {n: jax.tree_util.tree_map(sds, *self._opt_state_shapes(n, params[n],
                                                                        shardings[n]))
                 for n in self.trained}
    ema = {net: {role: params[net] for role in roles} for net, roles in self.ema_roles().items()}
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    state = jax.eval_shape(new_state, key, params, opt_state, ema, model_state)
    state = state.replace(params=params, opt_state=opt_state, ema=ema, model_state=model_state,
                          **{k: sds(getattr(state, k), rep)
                             for k in ("rng", "step", "stage", "skipped", "skipped_total")})
    self.state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    return state, frozen

  def abstract_batch(self, stream: str = sources.TRAIN_STREAM) -> dict:
    """The global batch of a step of data stream `stream` as sharded jax.ShapeDtypeStructs."""
    bs = self.stream_batch[stream]
    return {k: jax.ShapeDtypeStruct((bs,) + shape[1:], dtype,
                                    sharding=shd.batch_sharding(self.mesh, len(shape)))
            for k, (shape, dtype) in self._batch_shapes(stream).items()}

  @staticmethod
  def _phase_view(phase, of_stream: Callable[[str], dict]) -> dict:
    """What `phase`'s loss reads as its batch, from `of_stream(name)` of each stream it reads:
    its first stream's keys, and each further stream's dict under that stream's name."""
    first, *more = phase.streams
    return {**of_stream(first), **{n: of_stream(n) for n in more}}

  def phase_batch_shapes(self, phase) -> dict:
    """{key: (shape, dtype)} of `phase`'s batch (small probe batches)."""
    return self._phase_view(phase, self._batch_shapes)

  def abstract_phase_batch(self, phase) -> dict:
    """The global batch `phase`'s loss reads as sharded jax.ShapeDtypeStructs."""
    return self._phase_view(phase, self.abstract_batch)

  def phase_batch(self, step: int, phase, batches: Optional[dict] = None) -> dict:
    """This process's slice of the global batch `phase` reads at `step`; `batches` caches each
    stream's batch of the step, so that phases reading the same stream share it."""
    batches = {} if batches is None else batches
    for stream in phase.streams:
      if stream not in batches:
        batches[stream] = self.global_batch(step, stream)
    return self._phase_view(phase, batches.__getitem__)

  def _opt_state_shapes(self, name: str, params, param_sh):
    """(abstract optimizer state, its shardings): moments follow their parameters, scalars
    replicate."""
    tx = self.optimizers[name]
    abstract = jax.eval_shape(tx.init, params)
    out_sh = optax.tree_map_params(tx, lambda _, s: s, abstract, param_sh,
                                   transform_non_params=lambda _: shd.replicated(self.mesh))
    return abstract, out_sh

  def _opt_init(self, name: str, params):
    """Optimizer state created sharded (`_opt_state_shapes`)."""
    param_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
    _, out_sh = self._opt_state_shapes(name, params, param_sh)
    return jax.jit(self.optimizers[name].init, out_shardings=out_sh)(params)

  def ema_roles(self, objective: Optional[Objective] = None) -> dict[str, dict[str, Any]]:
    """{net: {role: decay or callable(Time) -> decay}} with config overrides applied."""
    objective = objective or self.objective
    out = {}
    for net, roles in objective.ema.items():
      out[net] = {}
      for role, decay in dict(roles).items():
        cfg_net = self.config.ema.get(net) if net in self.config.ema else None
        if cfg_net is not None and role in cfg_net:
          decay = float(cfg_net[role])
        out[net][role] = decay
    return out

  def _ema_init(self, params: dict) -> dict:
    """Every EMA role starts as a copy of its network (one jitted copy, same shardings)."""
    roles = self.ema_roles()
    for net in roles:
      if net not in params:
        raise ValueError(f"objective EMA role on {net!r}, which no phase trains")
    sub = {net: params[net] for net in roles}
    shardings = {net: {r: jax.tree_util.tree_map(lambda x: x.sharding, sub[net]) for r in rs}
                 for net, rs in roles.items()}
    copy = lambda p: {net: {r: jax.tree_util.tree_map(lambda x: x * 1, p[net]) for r in rs}
                      for net, rs in roles.items()}
    return jax.jit(copy, out_shardings=shardings)(sub)

  # ------------------------------------------------------------------ steps
  def _trainable_mask(self, name: str, params):
    regex = self.plans[name].trainable_regex
    if regex in (None, ".*"):
      return None
    pat = re.compile(regex)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(pat.search(path_str(p))), params)

  def _phase_fn(self, stage: int, phase_index: int) -> Callable:
    objective = self.stage_objectives[stage]
    phase = objective.phases[phase_index]
    nets = self.nets
    mesh = self.mesh
    accum = int(self.config.train.grad_accum)
    ema_roles = self.ema_roles(objective)
    schedules = {n: optim_lib.make_schedule(optim_lib.network_settings(self.config.optim, n),
                                            self.stage_length(stage)) for n in phase.trains}
    optimizers = self.optimizers

    where = f"objective {self.config.objective.name!r}, phase {phase.name!r}"

    def loss_fn(trainable, ctx, batch, rng, t):
      try:
        out = phase.loss(trainable, ctx, batch, rng, t)
      except KeyError as e:   # a name the loss looked up (a network, a batch key)
        message = str(e.args[0] if e.args else e)
        if re.match(r"unknown [\w ]+ '", message):   # a config value's name: it names the key
          raise
        raise KeyError(f"{where}: {message}") from e
      loss, metrics, updates = _loss_parts(out, where)
      return loss, (metrics, updates)

    def step(state: TrainState, frozen: dict, batch: dict, t: Time):
      # The mesh is the trace's context mesh: models find it there (jax.sharding.
      # get_abstract_mesh) to run attention kernels per shard inside shard_map.
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return step_body(state, frozen, batch, t)

    def step_body(state: TrainState, frozen: dict, batch: dict, t: Time):
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, t.step), phase_index)
      trainable = {n: state.params[n] for n in phase.trains}
      others = {n: v for n, v in state.params.items() if n not in phase.trains}
      others.update(frozen)
      ctx = ctx_lib.Context(params=others, ema=state.ema, model_state=state.model_state,
                            nets=nets, mesh=mesh)
      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      if accum == 1:
        (loss, (metrics, updates)), grads = grad_fn(trainable, ctx, batch, rng, t)
      else:
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def body(carry, i_mb):
          i, mb = i_mb
          (l, (m, u)), g = grad_fn(trainable, ctx, mb, jax.random.fold_in(rng, i), t)
          acc = jax.tree_util.tree_map(jnp.add, carry, (l, m, g))
          return acc, u
        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        (l0, (m0, u0)), _ = jax.eval_shape(grad_fn, trainable, ctx,
                                           jax.tree_util.tree_map(lambda x: x[0], micro), rng, t)
        init = (jnp.zeros((), jnp.float32),
                jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), m0), zeros)
        (loss, metrics, grads), us = jax.lax.scan(body, init, (jnp.arange(accum), micro))
        loss, metrics, grads = jax.tree_util.tree_map(lambda v: v / accum, (loss, metrics, grads))
        updates = jax.tree_util.tree_map(lambda u: u[-1], us)

      finite = jnp.isfinite(loss)
      for g in jax.tree_util.tree_leaves(grads):
        finite &= jnp.all(jnp.isfinite(g))

      new_params, new_opt, new_ema = dict(state.params), dict(state.opt_state), dict(state.ema)
      out_metrics = {f"{phase.name}/{k}": v for k, v in metrics.items()}
      out_metrics[f"{phase.name}/loss"] = loss
      for n in phase.trains:
        g = grads[n]
        mask = self._trainable_mask(n, g)
        if mask is not None:
          g = jax.tree_util.tree_map(lambda gi, m: gi if m else jnp.zeros_like(gi), g, mask)
        lr = schedules[n](t.stage_step)
        opt_state = optim_lib.set_lr(state.opt_state[n], lr)
        upd, opt_state = optimizers[n].update(g, opt_state, state.params[n])
        p = jax.tree_util.tree_map(lambda a, b: (a + b).astype(a.dtype), state.params[n], upd)
        out_metrics[f"{phase.name}/grad_norm/{n}"] = optax_global_norm(g)
        out_metrics[f"{phase.name}/lr/{n}"] = jnp.asarray(lr, jnp.float32)
        keep = lambda new, old: jax.tree_util.tree_map(
            lambda a, b: jnp.where(finite, a, b), new, old)
        new_params[n] = keep(p, state.params[n])
        new_opt[n] = keep(opt_state, state.opt_state[n])
        if n in ema_roles:
          roles = {}
          for role, decay in ema_roles[n].items():
            d = decay(t) if callable(decay) else decay
            old = state.ema[n][role]
            upd_ema = jax.tree_util.tree_map(lambda e, q: (d * e + (1 - d) * q).astype(e.dtype),
                                             old, new_params[n])
            roles[role] = keep(upd_ema, old)
          new_ema[n] = roles
      new_model_state = dict(state.model_state)
      for n, u in updates.items():
        new_model_state[n] = jax.tree_util.tree_map(
            lambda a, b: jnp.where(finite, a, b), u, state.model_state[n])
      skipped = jnp.where(finite, 0, state.skipped + 1)
      out_metrics[f"{phase.name}/nonfinite"] = (~finite).astype(jnp.float32)
      new_state = state.replace(step=t.step + 1, params=new_params, opt_state=new_opt,
                                ema=new_ema, model_state=new_model_state, skipped=skipped,
                                skipped_total=state.skipped_total + (~finite).astype(jnp.int32),
                                stage=t.stage)
      return new_state, out_metrics

    batch_sh = jax.tree_util.tree_map(
        lambda spec: shd.batch_sharding(self.mesh, len(spec[0])), self.phase_batch_shapes(phase),
        is_leaf=lambda v: isinstance(v, tuple))
    return jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings, batch_sh,
                                       None),
                   out_shardings=(self.state_shardings, None), donate_argnums=(0,))

  def data_hash(self) -> str:
    """The content hash of the run's data: the train stream's, combined with the other
    streams' when there are any (a resume compares it)."""
    train = self.source.content_hash()
    others = sorted(n for n in self.streams if n != sources.TRAIN_STREAM)
    if not others:
      return train
    h = hashlib.sha256(train.encode())
    for name in others:
      h.update(f"{name}:{self.streams[name].content_hash()}".encode())
    return h.hexdigest()

  def _batch_shapes(self, stream: str = sources.TRAIN_STREAM) -> dict[str, tuple]:
    """{key: (shape, dtype)} of a small batch of `stream` (the leading size is a probe's)."""
    b = self.streams[stream].batch(0, self.per_process_batch_probe(), 0, 1)
    return {k: (v.shape, v.dtype) for k, v in b.items()}

  def per_process_batch_probe(self) -> int:
    return max(1, shd.data_parallel_size(self.mesh))

  def trace_phases(self, state: TrainState, frozen: dict, stage: int = 0) -> None:
    """Traces every phase step of `stage` (no compile, no computation): what a config names
    only inside the losses (a weighting, a prediction kind, shapes that do not fit) fails here,
    before a run writes anything. jit keeps the traces, so the first real step reuses them."""
    for i, phase in enumerate(self.stage_objectives[stage].phases):
      self.phase_step(stage, i).trace(state, frozen, self.abstract_phase_batch(phase),
                                      make_time(phase.start, 0, stage, 0))

  def phase_plan(self) -> list[tuple[int, int, Any, str]]:
    """(stage, phase index, phase, label) of every phase step of every stage (what launch.aot
    and launch.bench compile): label = the phase's name, "stage<s>/<name>" when the objective
    has stages (a stage may change what a phase computes, e.g. its teacher or step count)."""
    staged = len(self.stage_objectives) > 1
    return [(s, i, phase, f"stage{s}/{phase.name}" if staged else phase.name)
            for s, obj in enumerate(self.stage_objectives) for i, phase in enumerate(obj.phases)]

  def phase_step(self, stage: int, phase_index: int) -> Callable:
    key = (stage, phase_index)
    if key not in self._steps:
      self._steps[key] = self._phase_fn(stage, phase_index)
    return self._steps[key]

  # ------------------------------------------------------------------ data
  def global_batch(self, step: int, stream: str = sources.TRAIN_STREAM) -> dict:
    """This process's slice of the global batch of `step` of data stream `stream`, assembled
    into global arrays."""
    bs = self.stream_batch[stream]
    local = self._read_ahead(stream, step, bs)
    out = {}
    for k, v in local.items():
      sh = shd.batch_sharding(self.mesh, v.ndim)
      out[k] = jax.make_array_from_process_local_data(sh, np.asarray(v), (bs,) + v.shape[1:])
    return out

  def _read_ahead(self, stream: str, step: int, bs: int) -> dict:
    """This process's rows of `step` of `stream`, read one step ahead on a background thread
    while the device runs the step before (sources are pure functions of the step, so reading
    ahead changes no batch; a jump, e.g. a resume, just reads `step` directly)."""
    import concurrent.futures  # pylint: disable=import-outside-toplevel
    source = self.streams[stream]
    args = (bs, jax.process_index(), jax.process_count())
    if self._reader is None:
      self._reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="data")
    pending = self._next.pop(stream, None)
    try:
      if pending is not None and pending[0] == (step,) + args:
        local = pending[1].result()
      else:
        local = source.batch(step, *args)
    except (ValueError, KeyError, IndexError, OSError) as e:   # bad records met while training
      raise sources.DataReadError(sources.for_stream(
          f"data (config key 'data.name': {self.stream_datasets[stream]!r}) at step {step}: "
          f"{e}", stream)) from e
    self._next[stream] = ((step + 1,) + args, self._reader.submit(source.batch, step + 1, *args))
    return local

  # ------------------------------------------------------------------ stages
  def full_params(self, source: str, params: dict, frozen: dict, ema: dict):
    """A promotion source's full weights (Stage.promote: a network, or "network@role" for one
    of its EMA averages) from a state's `params` and `ema` and the `frozen` networks (a LoRA
    network's adapter merged into its base): what a stage promotes."""
    name, role = promotion_source(source)
    if role is not None:
      value = ema[name][role]
    else:
      value = params[name] if name in params else frozen[name]
    return ctx_lib.merge_params(self.nets[name], value, {**frozen, **params})

  def enter_stage(self, state: TrainState, frozen: dict, stage: int) -> tuple[TrainState, dict]:
    """Applies a stage's promotions and resets (at the first step of `stage`)."""
    spec: Stage = self.stages[stage]
    params = dict(state.params)
    for target, source in spec.promote.items():
      value = self.full_params(source, state.params, frozen, state.ema)
      copy = jax.tree_util.tree_map(jnp.copy, value)
      if target in frozen:
        frozen = dict(frozen)
        frozen[target] = jax.device_put(copy, self.frozen_shardings[target])
      else:
        params[target] = copy
    opt_state, ema = dict(state.opt_state), dict(state.ema)
    if spec.reset_opt:
      opt_state = {n: self._opt_init(n, params[n]) for n in self.trained}
    if spec.reset_ema:
      ema = self._ema_init(params)
    state = state.replace(params=params, opt_state=opt_state, ema=ema,
                          stage=jnp.asarray(stage, jnp.int32))
    state = jax.device_put(state, self.state_shardings)
    return state, frozen

  # ------------------------------------------------------------------ one training step
  def train_step(self, state: TrainState, frozen: dict, step: int,
                 batches: Optional[dict] = None) -> tuple[TrainState, dict, dict]:
    stage, stage_step = self.stage_of(step)
    objective = self.stage_objectives[stage]
    metrics = {}
    batches = {} if batches is None else batches
    for i, phase in enumerate(objective.phases):
      if not phase.active(step):
        continue
      batch = self.phase_batch(step, phase, batches)
      t = make_time(step, phase.count_before(step), stage, stage_step)
      state, m = self.phase_step(stage, i)(state, frozen, batch, t)
      metrics.update(m)
    return state, frozen, metrics


def optax_global_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
