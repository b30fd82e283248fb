"""The training loop: run directory, resume, phases, logging, checkpoints, evaluation, signals.

    python -m launch.train --config configs/toy/teacher.py --workdir runs/teacher

Running the same command again resumes from the latest checkpoint (`resumed from step K`).
SIGTERM (preemptible TPU VMs) saves a checkpoint and exits 0. A run whose updates keep coming
out non-finite stops with a clear message, keeping its last good checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
from typing import Any, Mapping, Optional

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from distill import checkpoint as ckpt_lib
from distill import config as config_lib
from distill import context as ctx_lib
from distill import evaluation
from distill import processes as procs
from distill import resume
from distill import runlog
from distill import sharding as shd
from distill import teacher as teacher_lib
from distill.data import sources
from distill.engine import Engine, module_fields
from distill.objective import OBJECTIVES
from models import attention as attention_lib
from models.registry import MODELS

log = logging.getLogger(__name__)

# Importing the packages registers the built-in objectives and models.
import distill.objectives  # noqa: E402,F401
import models.all  # noqa: E402,F401


class TrainingError(RuntimeError):
  pass


# ----------------------------------------------------------------------------- config


def schema_for(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The base schema plus the keys of the chosen objective, dataset, model and process."""
  schema = config_lib.base_config()
  name = config.objective.get("name", "denoise")
  config_lib.merge_defaults(schema, "objective", OBJECTIVES.get(name).defaults)
  config_lib.merge_defaults(schema, "data", sources.default_config(config.data.name))
  model_cls = MODELS.get(config.model.get("name", "mlp"))
  config_lib.merge_defaults(schema, "model", module_fields(model_cls))
  process_cls = procs.PROCESSES.get(config.process.get("name", "rectified_flow"))
  config_lib.merge_defaults(schema, "process", module_fields(process_cls))
  return schema


def fill_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds the objective's and dataset's declared defaults for keys the config leaves out."""
  obj_defaults = OBJECTIVES.get(config.objective.name).defaults
  with config.unlocked():
    for k, v in obj_defaults.items():
      if k not in config.objective:
        config.objective[k] = v
    for k, v in sources.default_config(config.data.name).items():
      if k not in config.data:
        config.data[k] = v
  return config


# Config sections whose `name` picks a component that declares the section's other keys.
COMPONENTS = {"objective": "objective", "data": "dataset", "model": "model", "process": "process"}


def load_config(spec: str, overrides=()) -> ml_collections.ConfigDict:
  """Loads `configs/X.py[:arg]` and applies `a.b=value` overrides (keys the file left out are
  accepted when the chosen objective, dataset or model declares them). A component the command
  line swaps (`--config.data.name=synthetic` on a digits config) drops the keys the file set
  for the one it replaces that the new one does not declare, with a line saying which."""
  config = config_lib.load_config_file(spec)
  names, rest = config_lib.split_overrides(overrides)
  chosen = {s: config[s].get("name") for s in COMPONENTS if s in config}
  config = config_lib.apply_overrides(config, names)
  try:
    schema = schema_for(config)
  except KeyError as e:
    raise config_lib.ConfigError(e.args[0]) from None
  for section, old in chosen.items():
    new = config[section].get("name")
    stale = [k for k in config[section] if k not in schema[section]] if new != old else []
    if stale:
      with config.unlocked():
        for k in stale:
          del config[section][k]
      what = COMPONENTS[section]
      log.warning("%s.name=%r replaces the config file's %s %r: dropped %s (not keys of %r)",
                  section, new, what, old, ", ".join(f"{section}.{k}" for k in stale), new)
  return config_lib.apply_overrides(config, rest, schema)


def prepare_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None,
                   eval_files: bool = True) -> ml_collections.ConfigDict:
  """Validates a config before any work; raises ConfigError naming the key. The mesh is checked
  against `num_devices` (default: this host's jax.device_count(); launch.aot: the topology's).
  `eval_files`: also check the files the evaluation metrics need when training will evaluate
  (`open_run` leaves that to the evaluation itself: sampling a run needs no metric files)."""
  try:
    OBJECTIVES.get(config.objective.name)
  except KeyError as e:
    raise config_lib.ConfigError(f"config key 'objective.name': {e.args[0]}") from None
  try:
    sources.DATASETS.get(config.data.name)
  except KeyError as e:
    raise config_lib.ConfigError(f"config key 'data.name': {e.args[0]}") from None
  try:
    MODELS.get(config.model.name)
  except KeyError as e:
    raise config_lib.ConfigError(f"config key 'model.name': {e.args[0]}") from None
  config_lib.validate_keys(config, schema_for(config))
  config = fill_defaults(config)
  _check_counts(config)
  _check_names(config)
  n_dev = jax.device_count() if num_devices is None else int(num_devices)
  try:
    mesh = shd.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, n_dev)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  dp = mesh[0] * mesh[1]
  if config.train.batch_size % dp:
    raise config_lib.ConfigError(
        f"config key 'train.batch_size': {config.train.batch_size} is not divisible by the "
        f"data-parallel size {dp} (mesh.data x mesh.fsdp)")
  if config.train.batch_size % (config.train.grad_accum * dp):
    raise config_lib.ConfigError(
        f"config key 'train.grad_accum': batch {config.train.batch_size} does not split into "
        f"{config.train.grad_accum} micro-batches over {dp} data-parallel devices")
  if config.teacher.checkpoint and not os.path.exists(config.teacher.checkpoint):
    raise config_lib.ConfigError(
        f"config key 'teacher.checkpoint': {config.teacher.checkpoint!r} does not exist")
  if config.teacher.params not in ("ema", "raw"):
    raise config_lib.ConfigError(
        f"config key 'teacher.params': expected 'ema' or 'raw', got {config.teacher.params!r}")
  for stream, (data_cfg, bs) in _stream_settings(config).items():
    if stream == sources.TRAIN_STREAM:
      continue
    try:
      sources.resolve_config(data_cfg)
    except ValueError as e:
      raise config_lib.ConfigError(sources.for_stream(str(e), stream)) from None
    if bs < 1 or bs % (config.train.grad_accum * dp):
      raise config_lib.ConfigError(
          f"config key 'data_streams.{stream}.batch_size': {bs} does not split into "
          f"{config.train.grad_accum} micro-batches over {dp} data-parallel devices")
  try:
    sources.resolve_config(config.data)
    for prefix, node in _attention_nodes(config):
      attention_lib.check_impls(node.get("attention", "xla"), node.get("jvp_attention", "xla"),
                                prefix)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  try:  # metric names (and, when training will evaluate, the files they need) before work
    evaluation.check_eval_config(
        config.eval, files=eval_files and bool(config.eval.at_end or config.eval.every_steps))
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  return config


def _attention_nodes(config: ml_collections.ConfigDict) -> tuple:
  """(key prefix, config node) of every place a config names attention kernels: the model and
  the loaded teacher's runtime options."""
  return (("model", config.model), ("teacher.runtime", config.teacher.get("runtime") or {}))


def check_platform(config: ml_collections.ConfigDict, platform: Optional[str] = None) -> None:
  """Raises ConfigError when an attention kernel the config names cannot run on `platform`
  (default: this host's backend; launch.aot: the topology's). Separate from `prepare_config`,
  which validates a config wherever it will run."""
  try:
    for prefix, node in _attention_nodes(config):
      attention_lib.check_platform(node.get("attention", "xla"), node.get("jvp_attention", "xla"),
                                   platform or jax.default_backend(), prefix)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def runnable_here(config: ml_collections.ConfigDict,
                  platform: Optional[str] = None) -> ml_collections.ConfigDict:
  """`config` with every attention kernel that cannot run on `platform` (default: this host's)
  replaced by XLA's: a run trained with cuDNN or splash is sampled, evaluated or exported
  anywhere (the kernels compute the same function; the weights do not depend on them)."""
  platform = platform or jax.default_backend()
  with config.unlocked():
    for prefix, node in _attention_nodes(config):
      for key in attention_lib.unrunnable_kernels(node, platform):
        log.info("%s.%s=%r does not run on %s: using xla", prefix, key, node[key], platform)
        node[key] = "xla"
  return config


# Config keys whose value must be at least a minimum.
_MINIMUMS = (("train.batch_size", 1), ("train.grad_accum", 1), ("train.steps", 0),
             ("train.log_every", 1), ("checkpoint.every_steps", 0), ("checkpoint.keep", 1),
             ("eval.num_samples", 1), ("eval.teacher_steps", 1), ("eval.batch_size", 1),
             ("eval.feature_batch", 1), ("eval.every_steps", 0), ("sample.num", 0),
             ("sample.every_steps", 0))


def _stream_settings(config) -> dict:
  try:
    return sources.stream_settings(config)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None


def _check_counts(config) -> None:
  for key, low in _MINIMUMS:
    node = config
    for part in key.split("."):
      node = node[part]
    if int(node) < low:
      raise config_lib.ConfigError(f"config key '{key}': must be >= {low}, got {node}")


def _check_names(config) -> None:
  kinds = procs.prediction_kinds()
  if config.model.get("prediction", "flow") not in kinds:
    raise config_lib.ConfigError(f"config key 'model.prediction': unknown prediction kind "
                                 f"{config.model.prediction!r} (known: {', '.join(kinds)})")


def _naming_the_key(message: str, config) -> str:
  """`message` prefixed with the config key that holds the unknown name it reports ("unknown
  loss weighting 'foo'" -> "config key 'objective.weighting': ..."), when exactly one does."""
  if "config key" in message:
    return message
  flat = resume.flat(config.to_dict())
  m = re.search(r"unknown [\w ]+ '([^']*)'", message)
  if m:
    keys = [k for k, v in flat.items() if v == m.group(1)]
  else:   # a feature block an objective reads that the network lacks
    m = re.search(r"return_features index (-?\d+) out of range", message)
    if not m:
      return message
    i = int(m.group(1))
    keys = [k for k, v in flat.items() if k.startswith("objective.") and "feature_block" in k
            and (v == i or (isinstance(v, (list, tuple)) and i in v))]
  return f"config key '{keys[0]}': {message}" if len(keys) == 1 else message


# ----------------------------------------------------------------------------- helpers


def _resolved(engine: Engine, data_hash: Optional[str] = None) -> dict:
  """What config.json records beyond the config: each network's model, its own process (the
  one its raw output and `prediction` refer to) and how the objective presents it (wrapper),
  the frozen networks' and the data's hashes (a resume compares them)."""
  model_cfgs, processes = {}, {}
  for name, plan in engine.plans.items():
    model_cfgs[name] = plan.model_config
    own = plan.info.own_process
    if own is not None:
      processes[name] = procs.process_config(own)
  obj = engine.objective
  return {"models": model_cfgs, "processes": processes, "frozen": frozen_references(engine),
          # where trained networks started (`init.<net>`: that run's path, step and hash)
          "init_runs": {n: ref for n, ref in engine.init_references.items()
                        if not engine.plans[n].frozen},
          "evaluated_network": obj.student, "evaluated_as": obj.evaluates_as,
          "sampler": student_sampler(engine), "num_classes": int(engine.source.num_classes),
          "data_shape": list(engine.source.shape), "total_steps": engine.total_steps,
          "stage_bounds": engine.stage_bounds,
          "data_hash": engine.data_hash() if data_hash is None else data_hash,
          "networks": {n: {"init": p.init_from, "frozen": p.frozen,
                           "wrapper": engine.objective.network(n).wrapper,
                           "base": engine.objective.network(n).base,
                           # a LoRA adapter's multiplier (alpha / rank): how it merges
                           **({"lora_scale": p.info.lora_scale} if p.info.base else {})}
                       for n, p in engine.plans.items()},
          "devices": jax.device_count(), "mesh": dict(engine.mesh.shape)}


def check_data_fits(engine: Engine) -> None:
  """The data's labels and prompt embeddings are ones the networks can read (ValueError)."""
  _check_class_labels(engine)
  _check_text_inputs(engine)
  _check_latents_vae(engine)


def _check_latents_vae(engine: Engine) -> None:
  """Latents that the teacher pipeline's own VAE (its `vae/`) did not make, e.g. an SD1.5
  teacher on SDXL-VAE latents (both 4 channels, other scales), or that `eval.vae` would decode
  as another VAE's, stop in one line (`data.other_vae = True` goes on)."""
  path = (engine.teacher.reference or {}).get("path", "") if engine.teacher is not None else ""
  vaes = [(os.path.join(path, "vae"), "the teacher's VAE")] if path else []
  if engine.config.eval.get("vae"):
    vaes.append((str(engine.config.eval.get("vae")), "eval.vae"))
  for stream, source in engine.streams.items():
    if not hasattr(source, "vae_mismatch") or source.other_vae:
      continue
    for vae_dir, what in vaes:
      why = source.vae_mismatch(vae_dir, what) if vae_dir and os.path.isdir(vae_dir) else None
      if why:
        raise ValueError(sources.for_stream(
            f"config key 'data.path': {why}; precompute with that VAE, or set "
            "data.other_vae=True if you mean it", stream))


def _check_guidance_condition(engine: Engine) -> None:
  """An objective that distils classifier-free guidance (`Objective.distils_guidance`), or an
  evaluation at a guidance scale (`eval.guidance`), needs a teacher with a condition to drop
  (the train data's classes or prompts): with an unconditional one u + w (c - u) = u, and the
  run would distil no guidance, or report rows at a w that changed nothing, while looking
  fine."""
  teacher = _teacher_name(engine)
  if teacher is None:
    return
  keys = dict.fromkeys(engine.abstract_batch(sources.TRAIN_STREAM))
  if ctx_lib.conditional(engine.nets[teacher], ctx_lib.cond_from_batch(keys)):
    return
  if any(o.distils_guidance for o in engine.stage_objectives):
    raise ValueError(
        f"objective {engine.config.objective.name!r} distils classifier-free guidance, but its "
        f"teacher is unconditional on data {engine.stream_datasets[sources.TRAIN_STREAM]!r} (no "
        f"classes or prompts to drop, so guidance changes nothing): use a class-conditional "
        f"dataset and teacher (toy: gmm, spiral) or one with prompts")
  if configured_guidance(engine.config) != 1.0:
    raise ValueError(
        f"config key 'eval.guidance': {engine.config.eval.guidance} guides an unconditional "
        f"teacher on data {engine.stream_datasets[sources.TRAIN_STREAM]!r} (no classes or "
        f"prompts to drop): its rows would equal w = 1's under another label; use 1")


def _check_what_training_evaluates(engine: Engine) -> None:
  """When the run evaluates or samples, the network it evaluates exists and its metrics score
  this data (ValueError): found after training otherwise."""
  e, obj = engine.config.eval, engine.objective
  evaluates = bool(e.at_end) or int(e.every_steps) > 0
  if not (evaluates or int(engine.config.sample.num) > 0):
    return
  if obj.student not in engine.plans:
    raise ValueError(f"objective {engine.config.objective.name!r}: student {obj.student!r} "
                     f"(the network it evaluates and samples) is not one of its networks "
                     f"({', '.join(engine.plans)})")
  check_eval_steps(engine)
  if evaluates:
    evaluation.check_metric_data(
        evaluation.resolve_metrics(engine.source, e.get("metric", ""), e.get("metrics", ())),
        engine.source.shape)


def check_eval_steps(engine: Engine) -> None:
  """`eval.steps` (and `eval.ideal_steps`) of the student and `eval.teacher_steps` of the
  teacher fit their networks' time grids (`evaluation.check_steps`)."""
  e, obj = engine.config.eval, engine.objective
  teacher = obj.student if obj.evaluates_as == "teacher" else _teacher_name(engine)
  if obj.evaluates_as != "teacher" and obj.student in engine.nets:
    process = engine.nets[obj.student].process
    evaluation.check_steps(process, e.steps, "config key 'eval.steps'")
    evaluation.check_steps(process, e.get("ideal_steps", ()), "config key 'eval.ideal_steps'")
  if teacher is not None:
    evaluation.check_steps(engine.nets[teacher].process, (e.teacher_steps,),
                           "config key 'eval.teacher_steps'")


def _check_class_labels(engine: Engine) -> None:
  """A class-conditional network embeds classes 0..K-1 (K: the null class); labels beyond
  them (data of another label set) would index past its table and train on NaNs silently."""
  for stream, source in engine.streams.items():
    data = int(source.num_classes)
    for name, info in engine.nets.items():
      if info.num_classes and data > info.num_classes:
        raise ValueError(sources.for_stream(
            f"config key 'data.name': data {engine.stream_datasets[stream]!r} has {data} "
            f"classes (labels 0..{data - 1}), but network {name!r} embeds {info.num_classes} "
            f"(a teacher or model for another label set?)", stream))


def _check_text_inputs(engine: Engine) -> None:
  """A network that reads prompt embeddings needs them in the data (the train stream, and a
  stream of real images the networks read under their own captions), at its width in every
  stream (embeddings encoded for another pipeline, or class-labelled latents, fail here in one
  line)."""
  conditioned = {sources.TRAIN_STREAM} | {o.real_data for o in engine.stage_objectives
                                          if isinstance(o.real_data, str)}
  for stream in engine.streams:
    batch = engine.abstract_batch(stream)
    for name, info in engine.nets.items():
      width = getattr(info.module, "text_width", None)
      if width is None:
        continue
      if "text_embeds" not in batch and stream in conditioned:
        raise ValueError(sources.for_stream(
            f"config key 'data.text_embeds': network {name!r} reads prompt embeddings of width "
            f"{width}, but data {engine.stream_datasets[stream]!r} gives none (a directory "
            "from launch.encode_prompts)", stream))
      if getattr(info.module, "addition_embed_type", None) == "text_time" and (
          stream in conditioned):   # SDXL's pooled prompt and size / crop ids
        for key, need in (("pooled_text_embeds", "data.text_embeds' (its pooled.npy"),
                          ("time_ids", "data.time_ids' (True for precomputed latents, the "
                                       "image size for prompts")):
          if key not in batch:
            raise ValueError(sources.for_stream(
                f"config key '{need}): network {name!r} is an SDXL-style UNet that reads "
                f"{key}, which data {engine.stream_datasets[stream]!r} does not give", stream))
      got = batch["text_embeds"].shape[-1] if "text_embeds" in batch else width
      if got != width:
        raise ValueError(sources.for_stream(
            f"config key 'data.text_embeds': prompt embeddings of width {got}, but network "
            f"{name!r} reads width {width} (encoded for another pipeline?)", stream))


def _trace(engine: Engine, state, frozen, stage: int) -> None:
  """`engine.trace_phases`, a config error it meets as one SetupError line naming the key."""
  try:
    engine.trace_phases(state, frozen, stage)
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise SetupError(_naming_the_key(str(e.args[0] if e.args else e), engine.config)) from e


def frozen_references(engine: Engine) -> dict:
  """{network: reference (path, step, hash)} of each network loaded from the teacher checkpoint,
  and of each frozen network loaded from another run (`init.<network>`; its reference names
  that key): a resume compares their hashes, since frozen weights are not checkpointed."""
  refs = {name: engine.teacher.reference for name, plan in engine.plans.items()
          if plan.init_from == "checkpoint"}
  refs.update({name: ref for name, ref in engine.init_references.items()
               if engine.plans[name].frozen})
  return refs


def context_for(engine: Engine, state, frozen) -> ctx_lib.Context:
  params = dict(frozen)
  params.update(state.params)
  return ctx_lib.Context(params=params, ema=state.ema, model_state=state.model_state,
                         nets=engine.nets, mesh=engine.mesh)


def eval_params(engine: Engine, state, frozen) -> dict:
  """Weights used for sampling: each network's `eval` EMA where it has one; the teacher
  checkpoint's own weights for the teacher rows after a stage promoted a student into it
  (progressive and staged distillation compare against the original teacher)."""
  params = dict(frozen)
  params.update(state.params)
  for net, roles in state.ema.items():
    if "eval" in roles:
      params[net] = roles["eval"]
  teacher = _teacher_name(engine)
  if teacher is not None and engine.promoted(teacher, int(state.stage)):
    params[teacher] = engine.checkpoint_params(teacher)
  return params


TEACHER_EVAL_CACHE = "teacher_eval.json"


def teacher_cache_file(engine: Engine) -> Optional[str]:
  """`<teacher dir>/teacher_eval.json`: a frozen teacher's eval rows computed once (written
  beside a teacher when it is shipped, e.g. by launch.demo; read by every run that uses it)."""
  if engine.teacher is None or not engine.teacher.reference.get("path"):
    return None
  path = os.path.join(engine.teacher.reference["path"], TEACHER_EVAL_CACHE)
  return path if os.path.isfile(path) else None


def load_teacher_cache(engine: Engine) -> dict:
  """The frozen teacher's cached eval rows (`teacher_cache_file`), or {} (a cache to fill)."""
  cache_file = teacher_cache_file(engine)
  if not cache_file:
    return {}
  with open(cache_file) as f:
    return json.load(f)


def update_teacher_cache(engine: Engine, cache: Optional[dict]) -> None:
  """Adds the rows of `cache` that its frozen teacher's cache file lacks to that file, when
  `eval.update_teacher_cache` asks (a shipped teacher's cache then holds every row its runs
  computed once, e.g. the demo's ideal rows); written atomically, existing rows kept."""
  path = teacher_cache_file(engine)
  if not (cache and path and engine.config.eval.get("update_teacher_cache", False)):
    return
  with open(path) as f:
    on_disk = json.load(f)
  if set(cache) - set(on_disk):
    runlog.write_json(path, {**cache, **on_disk})


def eval_metrics(engine: Engine) -> tuple[str, ...]:
  """The run's metric names: `eval.metrics`, else (`eval.metric` or the data's default)."""
  cfg = engine.config.eval
  return evaluation.resolve_metrics(engine.source, cfg.metric, tuple(cfg.get("metrics", ())))


def run_evaluation(engine: Engine, state, frozen, step: int,
                   teacher_cache: Optional[dict] = None) -> dict:
  """The eval.json report. Teacher rows come from `teacher_cache` (else the frozen teacher's
  cache file, if any) when their settings match; rows computed here are added to
  `teacher_cache` (the training loop passes one dict to every evaluation of a run, so a frozen
  teacher's rows are computed once). The metrics and what they need are the `eval.*` keys
  (`eval.metrics`, `eval.inception_weights`, ...; distill/metrics/suite.py)."""
  cfg = engine.config
  obj = engine.objective
  ctx = context_for(engine, state, frozen)
  params = eval_params(engine, state, frozen)
  teacher = obj.student if obj.evaluates_as == "teacher" else _teacher_name(engine)
  student = None if obj.evaluates_as == "teacher" else obj.student
  teacher_hash = ""
  cache_file = teacher_cache_file(engine) if teacher_cache is None else None
  if cache_file:
    with open(cache_file) as f:
      teacher_cache = json.load(f)
  metrics = eval_metrics(engine)
  setup = evaluation.MetricSetup.from_config(cfg.eval, metrics)
  if teacher_cache is not None and teacher is not None:
    frozen_teacher = engine.teacher is not None and obj.evaluates_as != "teacher"
    teacher_hash = (engine.teacher.reference["hash"] if frozen_teacher
                    else teacher_lib.params_hash(jax.device_get(params[teacher])))
  return evaluation.evaluate(
      ctx=ctx, source=engine.source, params=params, step=step,
      student=student, student_role="student", student_solver=student_sampler(engine),
      student_steps=tuple(cfg.eval.steps), teacher=teacher, teacher_steps=cfg.eval.teacher_steps,
      num_samples=cfg.eval.num_samples, seed=cfg.eval.seed, metrics=metrics,
      class_conditional=cfg.eval.class_conditional, teacher_cache=teacher_cache,
      teacher_hash=teacher_hash, guidance=configured_guidance(cfg), setup=setup,
      batch=int(cfg.eval.get("batch_size", 4096)),
      ideal_steps=tuple(int(n) for n in cfg.eval.get("ideal_steps", ())))


def student_sampler(engine: Engine) -> str:
  """The student's sampler spec: `eval.sampler` when set, else its objective's."""
  return engine.config.eval.get("sampler", "") or engine.objective.sampler


def configured_guidance(config) -> float:
  """`eval.guidance`: the w that guided networks are evaluated at (1 where unset)."""
  return float(config.eval.get("guidance", 1.0))


def eval_guidance(engine: Engine, ctx: ctx_lib.Context, net: str, is_teacher: bool) -> float:
  """The guidance scale the evaluation samples network `net` at: `eval.guidance` for the
  teacher (CFG) and for a network that takes w as its input, 1 for any other student (its
  guidance, if any, is distilled in)."""
  guidance = configured_guidance(engine.config)
  return guidance if is_teacher or evaluation.embeds_guidance(ctx, net) else 1.0


def trained_steps(engine: Engine, state) -> Optional[int]:
  """The step count the student is trained for at the run's stage (`Objective.student_steps`:
  a progressive student stopped in its 16 -> 8 stage is an 8-step model), or None where its
  objective fixes none."""
  objectives = engine.stage_objectives
  steps = objectives[min(int(state.stage), len(objectives) - 1)].student_steps
  return None if steps is None else int(steps)


def student_steps(engine: Engine, state) -> int:
  """The student's default step count: `trained_steps`, else the first of `eval.steps`."""
  return trained_steps(engine, state) or int(engine.config.eval.steps[0])


def _teacher_name(engine: Engine) -> Optional[str]:
  for name, plan in engine.plans.items():
    if plan.init_from == "checkpoint":
      return name
  return None


def write_samples(engine: Engine, state, frozen, step: int, workdir: str,
                  is_main: bool = True) -> str:
  """The sample grid of `step` (real data | teacher | student at each of eval.steps) as
  `workdir/samples/step_<step>.png`; latents are shown decoded by `eval.vae` when it is set.
  Every process must call it (sampling is collective); only `is_main` writes the file."""
  from distill import images
  cfg = engine.config
  obj = engine.objective
  ctx = context_for(engine, state, frozen)
  params = eval_params(engine, state, frozen)
  panels = []
  # Class-conditional panels cycle through the classes (one class per grid column when the
  # grid is num_classes wide); text-to-image data: the prompts of `source.conditions` (the same
  # for teacher and student); otherwise unconditional.
  labels = None
  if cfg.eval.class_conditional and engine.source.num_classes:
    labels = np.arange(cfg.sample.num, dtype=np.int32) % engine.source.num_classes
  conds = evaluation.network_conditions(
      evaluation.source_conditions(engine.source, cfg.sample.num, cfg.sample.seed))
  teacher = obj.student if obj.evaluates_as == "teacher" else _teacher_name(engine)
  # At the evaluation's guidance scale (eval.json's rows): the teacher's CFG, a w input.
  with_w = lambda w: f" w={w:g}" if w != 1.0 else ""
  if teacher is not None:
    w = eval_guidance(engine, ctx, teacher, True)
    x, _ = evaluation.generate(ctx, teacher, params[teacher], n=cfg.sample.num,
                               seed=cfg.sample.seed,
                               solver=evaluation.teacher_solver(engine.nets[teacher].process),
                               steps=cfg.eval.teacher_steps, shape=engine.source.shape,
                               guidance=w, labels=labels, conds=conds)
    panels.append((f"teacher {cfg.eval.teacher_steps} steps{with_w(w)}", x))
  if obj.evaluates_as != "teacher":
    w = eval_guidance(engine, ctx, obj.student, False)
    for steps in cfg.eval.steps:
      x, _ = evaluation.generate(ctx, obj.student, params[obj.student], n=cfg.sample.num,
                                 seed=cfg.sample.seed, solver=student_sampler(engine),
                                 steps=int(steps), shape=engine.source.shape, guidance=w,
                                 labels=labels, conds=conds)
      panels.append((f"student {steps} step{'s' if steps > 1 else ''}{with_w(w)}", x))
  if engine.source.real_data:
    panels.insert(0, ("data", engine.source.reference(cfg.sample.num, cfg.sample.seed)))
  if cfg.eval.get("vae"):  # latents -> images in [-1, 1]
    from distill.metrics import suite  # pylint: disable=import-outside-toplevel
    batch = int(cfg.eval.get("feature_batch", 200))
    panels = [(title, suite.decode_latents(cfg.eval.vae, x, batch) / 127.5 - 1.0)
              for title, x in panels]
  path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
  if is_main:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    images.save_panels(path, panels)
  return path


class _Stop:
  """Set by SIGTERM; the loop saves and exits at the next step boundary (SIGINT keeps its
  KeyboardInterrupt)."""

  def __init__(self):
    self.requested = False
    self.signal = None

  def install(self):
    def handler(signum, frame):  # noqa: ARG001
      self.requested = True
      self.signal = signum
    prev = {}
    for s in (signal.SIGTERM,):
      try:
        prev[s] = signal.signal(s, handler)
      except ValueError:  # not the main thread
        pass
    return prev


# ----------------------------------------------------------------------------- train


class SetupError(ValueError):
  """A run that cannot start (a missing teacher, an `init.<network>` run without that network,
  an architecture the weights do not fit): one line, raised before anything is written."""


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a run in `workdir`; returns a summary dict. SIGTERM, from the start
  (setup may take minutes on a large model), saves a checkpoint at the next step boundary and
  returns (exit 0): before the first step, of the state it would start from."""
  stop = _Stop()
  prev_handlers = stop.install()
  try:
    return _train(config, workdir, stop)
  finally:
    for s, h in prev_handlers.items():
      signal.signal(s, h)


def _train(config: ml_collections.ConfigDict, workdir: str, stop: "_Stop") -> dict:
  config = prepare_config(config)
  check_platform(config)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache)
  is_main = jax.process_index() == 0
  try:  # everything the config names must load before anything is written
    teacher = teacher_lib.from_config(config)
    teacher_lib.check_toy_data(teacher, config.data)
    engine = Engine(config, teacher=teacher)
    check_data_fits(engine)
    _check_guidance_condition(engine)
    _check_what_training_evaluates(engine)
    resuming = bool(_saved_steps(workdir))
    if resuming:
      _restoring_trained_networks(engine)
    if engine.mesh.size < jax.device_count():
      log.warning("mesh %s uses %d of the %d devices (mesh.data=-1 fills the rest)",
                  dict(engine.mesh.shape), engine.mesh.size, jax.device_count())
    state, frozen = engine.init_state()
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise SetupError(_naming_the_key(str(e.args[0] if e.args else e), config)) from e
  # A new run's steps are traced before its directory exists; a resumed one's after its
  # checkpoint is restored (the stage it resumes in), before anything is written either way.
  if not resuming:
    _trace(engine, state, frozen, 0)

  os.makedirs(workdir, exist_ok=True)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               every_steps=config.checkpoint.every_steps,
                               keep=config.checkpoint.keep, keep_steps=engine.boundary_steps,
                               async_save=config.checkpoint.async_save)
  changes, restored = {}, None
  data_hash = engine.data_hash()
  steps = ckpt.all_steps()
  if steps:  # a run is there: this command may only go on with it
    with _setup_failure_closes(ckpt):
      changes = resume.check(workdir, config.to_dict(), schema_for(config).to_dict(),
                             frozen_references(engine), allow=config.train.allow_config_change,
                             data_hash=data_hash)
      restored = ckpt.restore_latest(ckpt_lib.abstract_of(state))
      if restored is None:
        raise ValueError(
            f"--workdir {workdir}: none of its checkpoints (steps {steps}) restores into this "
            f"config's state ({ckpt.last_restore_error}); nothing was changed, use a new "
            f"--workdir")
      stage = engine.stage_of(restored[0])[0]
      if int(restored[1].stage) == stage:   # else the loop enters it first
        _trace(engine, restored[1], frozen, stage)
  rlog = runlog.RunLog(workdir, is_main=is_main)
  start = 0
  provenance = {"git_commit": runlog.git_commit(), "packages": runlog.package_versions(),
                "command": " ".join(sys.argv)}
  if restored is not None:
    start, state, meta = restored
    with _setup_failure_closes(ckpt):
      frozen = _restore_promoted(engine, ckpt, state, frozen, start, meta)
    _set_aside_skipped(ckpt, start, is_main)
    rlog.truncate_after(start)
    rlog.message(f"resumed from step {start}")
    history = resume.recorded_changes(workdir)
    if changes:
      history.append({"step": start, "changes": changes})
      rlog.message(f"config changed at step {start}: {', '.join(changes)}")
    if history:
      provenance["config_changes"] = history
  elif os.path.exists(rlog.metrics_path) and is_main:
    os.remove(rlog.metrics_path)

  if is_main:
    resolved = _resolved(engine, data_hash)
    if restored is not None:   # trained networks' init runs are read only when a run starts
      resolved["init_runs"] = {**resume.recorded_init_runs(workdir), **resolved["init_runs"]}
    runlog.write_json(os.path.join(workdir, "config.json"), {
        **config.to_dict(), "provenance": provenance, "resolved": resolved})

  if engine.stages and engine.total_steps != int(config.train.steps):
    rlog.message(f"objective {config.objective.name!r} runs {len(engine.stage_bounds) - 1} "
                 f"stages, {engine.total_steps} steps in all, set by its objective.*steps keys; "
                 f"train.steps={config.train.steps} is not used")
  total = engine.total_steps
  bs = int(config.train.batch_size)
  flops = sum(engine.nets[n].flops_per_example for n in engine.trained)
  rlog.start_progress(start, total)
  thr = runlog.Throughput()
  # One teacher-row cache for every evaluation of this run (a frozen teacher's rows once).
  frozen_teacher = engine.teacher is not None and engine.objective.evaluates_as != "teacher"
  eval_cache = load_teacher_cache(engine) if frozen_teacher else None
  sums: dict[str, Any] = {}
  counts: dict[str, int] = {}   # per key: a phase that runs every k-th step is averaged over its runs
  count = 0
  if restored is not None:   # the log window the checkpoint was saved in (exact metrics lines)
    window = meta.get("log_window") or {}
    sums, counts = dict(window.get("sums", {})), dict(window.get("counts", {}))
    count = int(window.get("count", 0))
  step = start
  summary = {"start_step": start}
  try:
    if stop.requested and step < total:   # the signal came while the run was set up
      if step not in ckpt.all_steps():
        ckpt.save(step, state, _meta(engine, step, sums, counts, count), force=True)
      ckpt.wait()
      rlog.message(f"signal {stop.signal} during setup: saved step {step}, exiting")
      summary.update(step=step, interrupted=True)
      return summary
    while step < total:
      stage, stage_step = engine.stage_of(step)
      if stage > 0 and stage_step == 0 and int(state.stage) < stage:
        if not ckpt.all_steps() or ckpt.latest_step() != step:
          ckpt.save(step, state, _meta(engine, step, sums, counts, count), force=True)
        state, frozen = engine.enter_stage(state, frozen, stage)
        rlog.message(f"stage {stage} begins at step {step}")
      try:
        state, frozen, metrics = engine.train_step(state, frozen, step)
      except sources.DataReadError as e:
        raise TrainingError(f"{e}; the last good checkpoint is step {ckpt.latest_step()} in "
                            f"{ckpt.directory}") from e
      for k, v in metrics.items():
        sums[k] = sums[k] + v if k in sums else v
        counts[k] = counts.get(k, 0) + 1
      count += 1
      thr.add(bs)
      step += 1
      if step % config.train.log_every == 0 or step == total:
        scalars = {k: float(v) / counts[k] for k, v in jax.device_get(sums).items()}
        skipped = int(state.skipped)
        scalars["img_per_s"] = thr.rate()
        scalars["skipped_total"] = float(state.skipped_total)
        scalars["stage"] = float(stage)
        if flops:
          peak = _peak_flops()
          if peak:
            scalars["mfu"] = 3 * flops * scalars["img_per_s"] / (peak * jax.device_count())
        rlog.write(step, scalars)
        loss_keys = [k for k in scalars if k.endswith("/loss")]
        rlog.progress(count, {k: scalars[k] for k in loss_keys[:2]} | {"img/s": scalars["img_per_s"]})
        sums, counts, count = {}, {}, 0
        if skipped > config.train.max_skipped_steps:
          raise TrainingError(
              f"{skipped} consecutive non-finite updates at step {step} (train.max_skipped_steps="
              f"{config.train.max_skipped_steps}); the last good checkpoint is step "
              f"{ckpt.latest_step()} in {ckpt.directory}")
      if ckpt.should_save(step) and step < total:
        ckpt.save(step, state, _meta(engine, step, sums, counts, count))
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < total:
        report = run_evaluation(engine, state, frozen, step, teacher_cache=eval_cache)
        _write_eval(engine, workdir, report, eval_cache, is_main)
      if (config.sample.num and config.sample.every_steps
          and step % config.sample.every_steps == 0 and step < total):
        write_samples(engine, state, frozen, step, workdir, is_main)
      if stop.requested:
        ckpt.save(step, state, _meta(engine, step, sums, counts, count), force=True)
        ckpt.wait()
        rlog.message(f"signal {stop.signal}: saved step {step}, exiting")
        summary.update(step=step, interrupted=True)
        return summary
    if count:
      rlog.progress(count)
    ckpt.save(total, state, _meta(engine, total), force=True)
    ckpt.wait()
    rlog.close()
    if config.eval.at_end:
      report = run_evaluation(engine, state, frozen, total, teacher_cache=eval_cache)
      _write_eval(engine, workdir, report, eval_cache, is_main)
      summary["eval"] = report
    if config.sample.num:  # sample.num = 0: no grids
      summary["samples"] = write_samples(engine, state, frozen, total, workdir, is_main)
    summary.update(step=total, interrupted=False)
    return summary
  finally:
    rlog.close()
    ckpt.close()


def _meta(engine: Engine, step: int, sums: Optional[dict] = None,
          counts: Optional[dict] = None, count: int = 0) -> dict:
  """The JSON item of a checkpoint: step, stage, data position and the metrics of the log
  window it was saved in (their sums, float32 values exact as JSON floats), so that a resumed
  run logs the very lines an uninterrupted one does."""
  stage, _ = engine.stage_of(min(step, max(engine.total_steps - 1, 0)))
  window = {"sums": {k: float(v) for k, v in jax.device_get(sums or {}).items()},
            "counts": dict(counts or {}), "count": int(count)}
  return {"step": int(step), "stage": int(stage), "stage_bounds": list(engine.stage_bounds),
          "data": {"kind": "stateless", "seed": int(engine.config.seed),
                   "processes": jax.process_count()}, "log_window": window}


def _check_stage_bounds(engine: Engine, ckpt, step: int, meta: Optional[dict]) -> None:
  """The stage boundaries a restored run has passed (those before `step`, recorded in the
  checkpoint's meta) must be this config's: with others (objective.stage_steps changed under
  train.allow_config_change) the run would go on in another stage than its state's, from a
  teacher re-read at the wrong step. Later boundaries may change (a longer last stage, a stage
  added to a finished run)."""
  recorded = (meta or {}).get("stage_bounds")
  if recorded is None:   # checkpoints written before the bounds were recorded
    return
  passed = lambda bounds: [int(b) for b in bounds[1:-1] if int(b) < step]
  if passed(recorded) != passed(engine.stage_bounds):
    raise ValueError(
        f"{ckpt.directory}: step {step} was trained with stage boundaries at steps "
        f"{passed(recorded)}, this config puts them at {passed(engine.stage_bounds)} "
        f"(objective.*steps keys); the stages a run has passed cannot change length: use a new "
        f"--workdir (--config.init.<network>=RUN starts one from its weights)")


def _restore_promoted(engine: Engine, ckpt, state, frozen, step: int,
                      meta: Optional[dict] = None) -> dict:
  """Frozen networks promoted at stage boundaries are re-read from the boundary checkpoint
  (after checking that the stages the run passed are this config's)."""
  _check_stage_bounds(engine, ckpt, step, meta)
  stage = int(state.stage)
  stages = engine.stages
  for s in range(1, stage + 1):
    spec = stages[s]
    if not spec.promote:
      continue
    boundary = engine.stage_bounds[s]
    try:
      b_state, _ = ckpt.restore(boundary, ckpt_lib.abstract_of(state))
    except Exception as e:  # noqa: BLE001 - missing or unreadable: the promoted weights are lost
      raise ValueError(
          f"{ckpt.directory}: the checkpoint of stage {s}'s first step {boundary} (the "
          f"weights promoted into {', '.join(spec.promote)}) is missing or unreadable "
          f"({type(e).__name__}); the stage lengths must stay those the run was trained "
          f"with, and the boundary checkpoints kept") from None
    for target, source in spec.promote.items():
      if target in frozen:
        src = engine.full_params(source, b_state.params, frozen, b_state.ema)
        frozen = dict(frozen)
        frozen[target] = jax.device_put(src, engine.frozen_shardings[target])
  return frozen


def _write_eval(engine: Engine, workdir: str, report: dict, teacher_cache: Optional[dict],
                is_main: bool) -> None:
  """eval.json, and the teacher rows the evaluation added into the teacher's cache file
  (`update_teacher_cache`); on the main process only."""
  if is_main:
    runlog.write_json(os.path.join(workdir, "eval.json"), report)
    update_teacher_cache(engine, teacher_cache)


def _peak_flops() -> float:
  """Peak dense bf16 FLOP/s of one device, where known (for MFU)."""
  kind = jax.devices()[0].device_kind.lower()
  table = {"h200": 989e12, "h100": 989e12, "a100": 312e12, "v5p": 459e12, "v6e": 918e12,
           "v5e": 197e12, "v5 lite": 197e12, "v4": 275e12}
  for k, v in table.items():
    if k in kind:
      return v
  return 0.0


# ----------------------------------------------------------------------------- reading runs


def _set_aside_skipped(ckpt: ckpt_lib.Checkpointer, start: int, is_main: bool) -> None:
  """Moves the checkpoints newer than `start` that the restore passed over (unreadable, or not
  this config's) out of the way: the resumed run saves those steps anew."""
  for step, why in sorted(ckpt.skipped.items()):
    if step > start and is_main:
      dest = ckpt.set_aside(step)
      log.warning("checkpoint %d moved to %s (%s); resuming from step %d", step, dest, why,
                  start)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("checkpoints set aside")
    ckpt.manager.reload()


def _restoring_trained_networks(engine: Engine) -> None:
  """The trained networks of a run that restores its checkpoint (a resume, reading a run) come
  from that checkpoint: their init.<net> runs are not read (they may have moved or gone)."""
  engine.init_runs = {n: r for n, r in engine.init_runs.items() if n not in engine.trained}


def _saved_steps(workdir: str) -> list[int]:
  """The steps saved in `workdir` as Orbax sees them (a train command there resumes), read
  without creating anything."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  reader = ckpt_lib.Checkpointer(directory, read_only=True)
  try:
    return reader.all_steps()
  finally:
    reader.close()


@contextlib.contextmanager
def _setup_failure_closes(ckpt: ckpt_lib.Checkpointer):
  """A resume's setup after the checkpoints are opened: a ValueError (a refused resume, a
  missing boundary checkpoint, a trace error) closes them and stops as one SetupError line."""
  try:
    yield
  except ValueError as e:
    ckpt.close()
    if isinstance(e, SetupError):
      raise
    raise SetupError(str(e)) from None


def _fit_mesh_here(config: ml_collections.ConfigDict) -> None:
  """A run read on another machine (a pod's run sampled or exported on a workstation): its
  recorded mesh is replaced by all local devices on the data axis when it does not fit them
  (the weights do not depend on the mesh; a restore reshards them)."""
  try:
    shd.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, jax.device_count())
  except ValueError:
    log.info("the run's mesh %s does not fit %d devices here: reading it on all of them",
             dict(config.mesh), jax.device_count())
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1


def _recorded_teacher(resolved: Mapping[str, Any]) -> Optional[dict]:
  """The teacher checkpoint's reference (path, step, hash) a run's config.json recorded (every
  network loaded from it shares it), or None (no teacher, or a run that predates the record)."""
  refs = [r for r in (resolved.get("frozen") or {}).values()
           if r and r.get("key", "teacher.checkpoint") == "teacher.checkpoint"]
  return dict(refs[0]) if refs else None


# Data keys naming a file or directory a run's data source reads when the run is reopened.
DATA_PATH_KEYS = ("path", "text_embeds")


def _check_recorded_data(config, overrides) -> None:
  """Reading a run back rebuilds its data sources: a recorded data path (data.path,
  data.text_embeds, data_streams.<s>.*) that is gone is one line saying which, and that
  --config.<key>=DIR names where that data is now."""
  sections = {"data": config.data, **{f"data_streams.{n}": d
                                      for n, d in (config.get("data_streams") or {}).items()}}
  given = {o.partition("=")[0] for o in overrides}
  for name, data in sections.items():
    for key in DATA_PATH_KEYS:
      value, full = data.get(key), f"{name}.{key}"
      if isinstance(value, str) and value and full not in given and not os.path.exists(value):
        raise FileNotFoundError(f"{full}: the run's recorded {value!r} is gone (reading the run "
                                f"back rebuilds its data source); pass --config.{full}=DIR "
                                "naming where that data is now")


# The keys a run's config.json must name: the registries that give every other key its schema.
RUN_IDENTITY_KEYS = ("objective.name", "model.name", "data.name")


def open_run(workdir: str, overrides=()) -> tuple[Engine, Any, dict, int]:
  """Rebuilds a run's engine from its config.json and restores its latest checkpoint.

  Returns (engine, state, frozen, step). `overrides` are `a.b=value` strings (e.g. eval keys);
  `data.name=<other>` evaluates on another data set: the run's own data keys are dropped (they
  belong to its data set) and the new one takes its defaults plus the `data.*` overrides (a run
  trained on `prompts` evaluated against `latents`). The teacher is read from the absolute
  path config.json recorded (unless `teacher.checkpoint=` is given) and must hash as it did.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--workdir: {workdir!r} has no config.json (not a run directory)")
  with open(path) as f:
    saved = json.load(f)
  saved.pop("provenance", None)
  recorded = _recorded_teacher(saved.pop("resolved", None) or {})
  for key in RUN_IDENTITY_KEYS:   # what the defaults of every other key hang on
    section, _, name = key.partition(".")
    if not isinstance(saved.get(section), dict) or not saved[section].get(name):
      raise config_lib.ConfigError(f"{path}: no {key!r} (a damaged or hand-edited config.json; "
                                   "the run cannot be rebuilt without it)")
  config = config_lib.from_dict(saved)
  names = [o.partition("=")[2] for o in overrides if o.startswith("data.name=")]
  if names and names[-1] != config.data.name:
    config.data = ml_collections.ConfigDict({"name": names[-1]})
  config = config_lib.apply_overrides(config, overrides, schema_for(config))
  if not any(o.startswith("mesh.") for o in overrides):
    _fit_mesh_here(config)
  given = any(o.startswith("teacher.checkpoint=") for o in overrides)
  if recorded and not given and os.path.exists(recorded.get("path") or ""):
    # config.json keeps teacher.checkpoint as typed (maybe relative to where training ran);
    # the recorded reference holds its absolute path.
    config.teacher.checkpoint = recorded["path"]
  try:
    config = prepare_config(config, eval_files=False)
  except config_lib.ConfigError as e:
    m = re.match(r"unknown config key '([^']+)'", str(e))
    if m and not any(o.startswith(m.group(1)) for o in overrides):
      raise config_lib.ConfigError(
          f"{path}: {e} (the run was trained with a version that had it; remove it from "
          f"config.json to read the run with this one)") from None
    raise
  config = runnable_here(config)
  _check_recorded_data(config, overrides)
  teacher = teacher_lib.from_config(config)
  if recorded and teacher is not None and teacher.reference.get("hash") != recorded.get("hash"):
    raise ValueError(
        f"config key 'teacher.checkpoint': {teacher.reference.get('path')} is not the teacher "
        f"the run {workdir} was trained with (weights hash {str(recorded.get('hash'))[:12]} "
        f"recorded, {str(teacher.reference.get('hash'))[:12]} there; it was "
        f"{recorded.get('path')}): give that teacher with --config.teacher.checkpoint=PATH")
  engine = Engine(config, teacher=teacher)
  check_data_fits(engine)
  _restoring_trained_networks(engine)
  state, frozen = engine.init_state()
  # Read-only: the run may be training in another process (its in-flight save stays).
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  try:
    restored = ckpt.restore_latest(ckpt_lib.abstract_of(state))
    if restored is None:
      steps = ckpt.all_steps()
      raise FileNotFoundError(
          f"--workdir: no checkpoint in {ckpt.directory}" if not steps else
          f"--workdir: no checkpoint in {ckpt.directory} fits this config (steps {list(steps)} "
          f"exist; {ckpt.last_restore_error}: the overrides change the networks, e.g. another "
          "data set's classes?)")
    step, state, meta = restored
    frozen = _restore_promoted(engine, ckpt, state, frozen, step, meta)
  finally:
    ckpt.close()
  return engine, state, frozen, step


def network_for_role(engine: Engine, role: str) -> str:
  """The network name behind `student` / `teacher` in a run."""
  obj = engine.objective
  if role == "teacher":
    name = obj.student if obj.evaluates_as == "teacher" else _teacher_name(engine)
  elif role == "student":
    name = None if obj.evaluates_as == "teacher" else obj.student
  else:
    name = role if role in engine.plans else None
  samplable = [n for n, info in engine.nets.items()
               if info.process is not None and info.prediction != "raw"]
  if name is None or name not in samplable:
    what = "no" if name is None else "no samplable"
    raise ValueError(f"--network: this run has {what} {role!r} network (denoisers: "
                     f"{', '.join(samplable)}; the others are not sampled)")
  return name
