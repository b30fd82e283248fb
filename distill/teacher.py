"""Loading a frozen teacher named by `teacher.checkpoint`, and recording it by reference.

Accepted: a run directory of this project (config.json + checkpoints/), or a diffusers-layout
directory (config.json with `_class_name` + safetensors), converted strictly. `teacher.params`
picks the EMA ("ema", the `eval` role when the run kept one) or the raw weights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from distill import processes as procs
import models.all  # noqa: F401  (registers every model, so any checkpoint can be rebuilt)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Teacher:
  module: Any
  params: Any                 # host (numpy) tree
  model_config: dict          # registry name + constructor kwargs + prediction
  process: Any
  prediction: str
  num_classes: int
  reference: dict             # path, step, hash, params role
  model_state: Any = None


def params_hash(params: Any) -> str:
  """sha256 over the sorted (path, dtype, shape, bytes) of a parameter tree."""
  h = hashlib.sha256()
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(flat, key=lambda kv: jax.tree_util.keystr(kv[0])):
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  return h.hexdigest()


def is_run_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
      os.path.join(path, "checkpoints"))


def load_teacher(path: str, params_role: str = "ema", process: Optional[str] = None) -> Teacher:
  """The teacher at `path`. `process` (diffusers directories only): a process spec such as
  "rectified_flow(timestep_scale=1.0)" or "vp_discrete(beta_schedule='scaled_linear')" with an
  optional `prediction=` (eps | v | x0 | flow) that replaces what the scheduler config says
  (a dense-time flow teacher whose directory carries another scheduler, or none)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config key 'teacher.checkpoint': {path!r} does not exist")
  if is_run_dir(path):
    if process:
      raise ValueError(f"--process: {path!r} is a run directory; its process is recorded")
    return _load_run_dir(path, params_role)
  cfg_file = os.path.join(_model_dir(path)[0], "config.json")
  if os.path.isfile(cfg_file):
    with open(cfg_file) as f:
      if "_class_name" in json.load(f):
        return _load_diffusers_dir(path, process)
  raise ValueError(f"config key 'teacher.checkpoint': {path!r} is neither a run directory "
                   "(config.json + checkpoints/) nor a diffusers-layout directory")


def _load_run_dir(path: str, params_role: str) -> Teacher:
  with open(os.path.join(path, "config.json")) as f:
    stored = json.load(f)
  resolved = stored["resolved"]
  net = resolved["evaluated_network"]
  wrapper = ((resolved.get("networks") or {}).get(net) or {}).get("wrapper")
  if wrapper:
    raise ValueError(f"config key 'teacher.checkpoint': {path!r}: its network {net!r} is "
                     f"trained behind the wrapper {wrapper!r}; loading a wrapped network as a "
                     "teacher is not supported yet")
  return load_run_network(path, net, params_role, stored=stored)


def _adapter_base(path: str, net: str, info: Mapping[str, Any], stored: Mapping[str, Any],
                  key: str) -> "Teacher":
  """The base network a LoRA adapter `net` of the run at `path` (its config.json: `stored`)
  was trained over, as that run read it (its frozen reference, with its teacher.runtime
  layout), checked against the recorded hash; the adapter's scale must be recorded (runs
  written before it was are refused)."""
  base_ref = (stored["resolved"].get("frozen") or {}).get(info["base"])
  if info.get("lora_scale") is None or not base_ref:
    raise ValueError(f"config key {key!r}: network {net!r} of {path!r} is a LoRA adapter over "
                     f"its {info['base']!r}, and the run does not record how to merge it (a run "
                     f"written before this version); export the merged network with `python -m "
                     f"launch.convert --workdir {path} --out DIR` and read that")
  runtime = (stored.get("teacher") or {}).get("runtime") or {}
  role = "raw" if base_ref.get("params") == "raw" else "ema"
  base = with_runtime(load_teacher(base_ref["path"], role), runtime)
  if base.reference.get("hash") != base_ref.get("hash"):
    raise ValueError(f"config key {key!r}: the base {info['base']!r} of LoRA network {net!r} "
                     f"of {path!r} is read from {base_ref['path']}, whose weights changed since "
                     f"that run (hash {str(base_ref.get('hash'))[:12]} recorded)")
  return base


def load_run_network(path: str, net: str, params_role: str = "ema",
                     key: str = "teacher.checkpoint", stored: Optional[dict] = None) -> Teacher:
  """Network `net` of the run directory `path` at its latest checkpoint: its EMA weights
  (`params_role` "ema": the `eval` role, else the first) when it has any, else its raw ones.
  `key` names the config key in errors; `stored`: the run's config.json when the caller has
  already read it."""
  from distill import checkpoint as ckpt
  from distill.engine import module_from_config, num_classes_of

  if not is_run_dir(path):
    raise FileNotFoundError(f"config key {key!r}: {path!r} is not a run directory "
                            "(config.json + checkpoints/)")
  if stored is None:
    with open(os.path.join(path, "config.json")) as f:
      stored = json.load(f)
  resolved = stored["resolved"]
  if net not in resolved["models"]:
    raise ValueError(f"config key {key!r}: the run {path!r} has no network {net!r} (it has "
                     f"{', '.join(sorted(resolved['models']))})")
  info = (resolved.get("networks") or {}).get(net) or {}
  base = _adapter_base(path, net, info, stored, key) if info.get("base") else None
  chosen = {}

  def select(structure):   # read this network's weights and model state only
    roles = (structure.get("ema") or {}).get(net) or {} if params_role == "ema" else {}
    role = chosen["role"] = "eval" if "eval" in roles else (sorted(roles)[0] if roles else None)
    return [("ema", net, role) if role else ("params", net), ("model_state", net)]

  step, tree = ckpt.restore_raw(os.path.join(path, "checkpoints"), select=select)
  state, role = tree["state"], chosen["role"]
  params = state["ema"][net][role] if role else (state.get("params") or {}).get(net)
  if params is None:
    raise ValueError(f"config key {key!r}: network {net!r} of {path!r} is not in its "
                     "checkpoint (a frozen network: load it from where that run did)")
  model_cfg = dict(resolved["models"][net])
  name = model_cfg.pop("name")
  prediction = model_cfg.pop("prediction")
  # The recorded model config also holds engine keys (attention, jvp_attention) and JSON lists:
  # build the module the way the engine does (constructor fields only, lists -> tuples).
  module = module_from_config({"name": name, **model_cfg})
  process = procs.make_process(**resolved["processes"][net])
  model_state = (state.get("model_state") or {}).get(net) or None
  params = jax.tree_util.tree_map(np.asarray, params)
  if base is not None:   # a LoRA adapter: the whole network is its base with it merged
    from models import lora  # pylint: disable=import-outside-toplevel
    params = jax.tree_util.tree_map(np.asarray, lora.lora_merge(base.params, params,
                                                                float(info["lora_scale"])))
    model_state = model_state or base.model_state
  ref = {"path": os.path.abspath(path), "step": int(step), "hash": params_hash(params),
         "params": f"ema/{role}" if role else "raw", "network": net}
  return Teacher(module=module, params=params, model_config={"name": name, "prediction": prediction,
                                                             **model_cfg},
                 process=process, prediction=prediction,
                 num_classes=num_classes_of(model_cfg), reference=ref,
                 model_state=model_state)


# Defaults by diffusers class when no scheduler config sits beside the model: (process, kind).
FAMILY_DEFAULTS = {
    "DiTTransformer2DModel": ({"name": "vp_discrete", "beta_schedule": "linear"}, "eps"),
}

# diffusers scheduler config -> our process.
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def process_from_spec(spec: str) -> tuple[dict, Optional[str]]:
  """"name(key=value, ...)" -> (process config, prediction or None); `prediction=` is taken
  out of the keys. The process is built once here, so a bad key fails with one line."""
  from distill.registry import parse_spec
  name, kwargs = parse_spec(spec, "process")
  prediction = kwargs.pop("prediction", None)
  if prediction is not None and prediction not in ("eps", "v", "x0", "flow"):
    raise ValueError(f"--process {spec!r}: prediction must be eps, v, x0 or flow, got "
                     f"{prediction!r}")
  try:
    procs.make_process(name=name, **kwargs)
  except TypeError as e:
    raise ValueError(f"--process {spec!r}: {e}") from None
  return {"name": name, **kwargs}, prediction


_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_UNSUPPORTED_SCHEDULER_OPTIONS = {"rescale_betas_zero_snr": False, "trained_betas": None,
                                  "use_flow_sigmas": False}


def process_from_scheduler(cfg: dict) -> tuple[dict, str]:
  """(process config, prediction kind) from a diffusers scheduler_config.json."""
  cls = cfg.get("_class_name", "")
  if cls == "SCMScheduler":
    # SANA-Sprint: its pipeline feeds the transformer flow inputs at dense time s in [0, 1]
    # (timestep = s, not 1000 s) and reads a flow velocity, converting TrigFlow around it.
    return {"name": "rectified_flow", "timestep_scale": 1.0}, "flow"
  if "FlowMatch" in cls:
    return {"name": "rectified_flow", "shift": float(cfg.get("shift", 1.0))}, "flow"
  schedule = cfg.get("beta_schedule", "linear")
  if schedule not in _BETA_SCHEDULES:
    raise ValueError(f"scheduler beta_schedule {schedule!r} is not supported "
                     f"(known: {', '.join(_BETA_SCHEDULES)})")
  # Scheduler options that change the noise levels the network was trained at, which the
  # vp_discrete process does not reproduce: refused rather than silently ignored.
  for key, default in _UNSUPPORTED_SCHEDULER_OPTIONS.items():
    if cfg.get(key, default) not in (default, None):
      raise ValueError(f"scheduler option {key}={cfg[key]!r} is not supported (the converted "
                       "process would train and sample at other noise levels than the network "
                       "was trained at); name the process with --process if you know it")
  prediction = cfg.get("prediction_type", "epsilon")
  if prediction not in _PREDICTION_TYPES:
    raise ValueError(f"scheduler prediction_type {prediction!r} is not supported (known: "
                     f"{', '.join(_PREDICTION_TYPES)}); a flow network's process is named with "
                     "--process \"rectified_flow(shift=...)\"")
  kind = _PREDICTION_TYPES[prediction]
  proc = {"name": "vp_discrete", "beta_schedule": schedule,
          "beta_start": float(cfg.get("beta_start", 0.0001)),
          "beta_end": float(cfg.get("beta_end", 0.02)),
          "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000))}
  return proc, kind


def _exported_subfolder(path: str) -> tuple[str, ...]:
  """The network folder an export of this project records in export.json (exports written
  before UNets went to unet/ hold theirs in model/), or none."""
  exported = os.path.join(path, "export.json")
  if not os.path.isfile(exported):
    return ()
  with open(exported) as f:
    sub = json.load(f).get("subfolder")
  return (sub,) if isinstance(sub, str) and sub else ()


def _model_dir(path: str) -> tuple[str, Optional[str]]:
  """(model directory, scheduler config path or None) for a model or pipeline directory."""
  for sub in ("transformer", "unet") + _exported_subfolder(path):
    if os.path.isfile(os.path.join(path, sub, "config.json")):
      sched = os.path.join(path, "scheduler", "scheduler_config.json")
      return os.path.join(path, sub), sched if os.path.isfile(sched) else None
  return path, None


def module_config(module) -> dict:
  """A Flax module's constructor fields as a JSON-able model config."""
  from distill.engine import module_fields
  from models.registry import MODELS
  name = next(n for n in MODELS.names() if isinstance(module, MODELS.get(n)))
  cfg = {"name": name}
  for f in module_fields(type(module)):
    v = getattr(module, f)
    if isinstance(v, type) or isinstance(v, np.dtype):
      v = np.dtype(v).name
    cfg[f] = list(v) if isinstance(v, tuple) else v
  return cfg


def _load_diffusers_dir(path: str, process: Optional[str] = None) -> Teacher:
  from distill.engine import num_classes_of
  from models import convert
  model_path, sched_path = _model_dir(path)
  with open(os.path.join(model_path, "config.json")) as f:
    class_name = json.load(f)["_class_name"]
  module, variables = convert.load_diffusers_dir(model_path)
  if hasattr(module, "encode"):
    raise ValueError(f"config key 'teacher.checkpoint': {path!r} holds {class_name}, an "
                     "autoencoder: a teacher is a denoiser (a pipeline's transformer/ or unet/)")
  params = jax.tree_util.tree_map(np.asarray, variables["params"])
  override, override_kind = process_from_spec(process) if process else (None, None)
  proc_cfg, prediction = None, None
  exported = os.path.join(path, "export.json")
  recorded = {}
  if os.path.isfile(exported):
    with open(exported) as f:
      recorded = json.load(f)
  if recorded.get("process") and recorded.get("prediction"):
    # This project's export: the network's own process, exactly (a scheduler may not say it).
    proc_cfg, prediction = dict(recorded["process"]), str(recorded["prediction"])
  elif sched_path is not None:
    with open(sched_path) as f:
      sched = json.load(f)
    try:
      proc_cfg, prediction = process_from_scheduler(sched)
    except ValueError as e:
      if override is None:   # (--process names the process: the scheduler only its kind)
        raise ValueError(f"{sched_path}: {e}") from None
      prediction = _PREDICTION_TYPES.get(sched.get("prediction_type", "epsilon"))
  elif class_name in FAMILY_DEFAULTS:
    proc_cfg, prediction = FAMILY_DEFAULTS[class_name]
  elif override is None:
    raise ValueError(f"config key 'teacher.checkpoint': {path!r} holds a {class_name} without a "
                     "scheduler/scheduler_config.json beside it: its noise process is unknown "
                     "(launch.convert --process names it)")
  proc_cfg = override or proc_cfg
  prediction = override_kind or prediction
  if prediction is None:
    raise ValueError(f"--process {process!r}: {path!r} has no scheduler config to give the "
                     "prediction kind; add prediction=eps|v|x0|flow")
  model_config = module_config(module)
  model_config["prediction"] = prediction
  in_ch = getattr(module, "in_channels", None)
  out_ch = getattr(module, "out_channels", None) or (
      2 * in_ch if getattr(module, "learn_sigma", False) else in_ch)
  if in_ch and out_ch == 2 * in_ch:  # learned variance: [prediction, variance] channels
    model_config["output_channels"] = int(in_ch)
  ref = {"path": os.path.abspath(path), "step": 0, "hash": params_hash(params), "params": "raw",
         "network": "teacher", "format": "diffusers"}
  return Teacher(module=module, params=params, model_config=model_config,
                 process=procs.make_process(**proc_cfg), prediction=prediction,
                 num_classes=num_classes_of(model_config), reference=ref)


def from_config(config, platform: Optional[str] = None) -> Optional[Teacher]:
  """The teacher a run's config names (`teacher.checkpoint`, `teacher.params`), computing as
  the config says (`run_runtime`), or None without a checkpoint. `platform`: where it will run
  (default this host's backend)."""
  t = config.teacher
  if not t.checkpoint:
    return None
  teacher = load_teacher(t.checkpoint, t.params)
  return with_runtime(teacher, run_runtime(config, teacher, platform))


def run_runtime(config, teacher: Teacher, platform: Optional[str] = None) -> dict:
  """How a loaded teacher, and every network initialised from it, computes in this run: its
  checkpoint's architecture with the config's `model.*` runtime options when the config
  describes the same model (remat, dtype, attention ...: the rest of that section describes
  the architecture for runs without weights), `teacher.runtime.*` over those. An attention
  kernel the teacher's own run recorded that cannot run on `platform` (a cuDNN-trained teacher
  distilled on a CPU or TPU) becomes XLA's, which computes the same function."""
  from distill.engine import module_fields  # pylint: disable=import-outside-toplevel
  from models import attention  # pylint: disable=import-outside-toplevel
  recorded = teacher.model_config
  fields = module_fields(type(teacher.module))
  model = config.model.to_dict() if "model" in config else {}
  runtime = {}
  if model.get("name") == recorded.get("name"):
    runtime = {k: model[k] for k in RUNTIME_FIELDS
               if k in model and k in fields and not _same_setting(model[k], recorded.get(k))}
  runtime.update(runtime_of(config))
  platform = platform or jax.default_backend()
  recorded_kernels = {k: recorded.get(k) for k in attention.KERNEL_KEYS
                      if k in fields and k not in runtime}   # the config's own: check_platform
  for key in attention.unrunnable_kernels(recorded_kernels, platform):
    log.info("the teacher's recorded %s=%r does not run on %s: using xla", key,
             recorded_kernels[key], platform)
    runtime[key] = "xla"
  return runtime


def _same_setting(a, b) -> bool:
  """Whether two runtime values are the same setting (dtype names and objects compare)."""
  if a == b:
    return True
  try:
    return jax.numpy.dtype(a) == jax.numpy.dtype(b)
  except TypeError:
    return False


def check_toy_data(teacher: Optional[Teacher], data) -> None:
  """Raises one line when a teacher trained on a 2-D toy distribution (a run of this project)
  is distilled on another toy distribution (`data`: the run's data config): the toy teacher's
  samples are its data's, so a student matching it on other data is meaningless. Other data
  (images, latents, prompts) may differ from the teacher's on purpose."""
  from distill.data import sources, toy  # pylint: disable=import-outside-toplevel
  path = (teacher.reference or {}).get("path") if teacher is not None else None
  if not path or not os.path.isfile(os.path.join(path, "config.json")):
    return
  with open(os.path.join(path, "config.json")) as f:
    trained = json.load(f).get("data") or {}
  is_toy = lambda name: name in sources.DATASETS and issubclass(sources.DATASETS.get(name),
                                                                toy.ToySource)
  if not (is_toy(trained.get("name", "")) and is_toy(data.get("name", ""))):
    return
  for key in sorted(set(trained) | set(data.keys())):
    if key in trained and key in data and trained[key] != data[key]:
      raise ValueError(f"config key 'data.{key}': {data[key]!r} here, but the teacher {path} "
                       f"was trained on data.{key}={trained[key]!r} (a toy teacher samples its "
                       f"own data's distribution; the argument of configs/toy/*.py must match)")


# Module fields that change how a network computes, not what it computes: a loaded teacher (and
# every network initialised from it) takes them from the config (`run_runtime`: `model.*` of the
# same model, then `teacher.runtime.*`; its architecture comes from the checkpoint), e.g. bf16
# matmuls, remat, the attention kernel, scanned blocks.
# `param_dtype` also casts the teacher's weights (a bf16 frozen teacher halves its memory).
RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "attention", "jvp_attention", "scan_blocks",
                  "scan_unroll")


def runtime_of(config) -> dict:
  """A run config's `teacher.runtime` options (empty when it has none)."""
  return config.teacher.runtime.to_dict() if "runtime" in config.teacher else {}


def check_runtime(model_cls, model_name: str, runtime: Mapping[str, Any]) -> None:
  """Raises one line for a `teacher.runtime` key that is not a runtime option of the model."""
  from distill.engine import module_fields
  fields = module_fields(model_cls)
  for key in runtime:
    if key not in RUNTIME_FIELDS:
      raise ValueError(f"config key 'teacher.runtime.{key}': not a runtime option (known: "
                       f"{', '.join(RUNTIME_FIELDS)}); a teacher's architecture comes from its "
                       "checkpoint")
    if key not in fields:
      raise ValueError(f"config key 'teacher.runtime.{key}': the teacher's model "
                       f"{model_name!r} has no option {key!r}")


def with_runtime(teacher: Teacher, runtime: Optional[Mapping[str, Any]]) -> Teacher:
  """`teacher` with the `teacher.runtime` overrides applied (module, weights layout / dtype and
  recorded model config); its reference (path, hash) stays the checkpoint's."""
  runtime = dict(runtime or {})
  if not runtime:
    return teacher
  module = teacher.module
  check_runtime(type(module), teacher.model_config.get("name"), runtime)
  kwargs = {k: jax.numpy.dtype(v) if k in ("dtype", "param_dtype") else v
            for k, v in runtime.items()}
  params = teacher.params
  if "scan_blocks" in runtime and bool(runtime["scan_blocks"]) != bool(module.scan_blocks):
    if not hasattr(module, "scan_layout"):
      raise ValueError("config key 'teacher.runtime.scan_blocks': the teacher's model "
                       f"{teacher.model_config.get('name')!r} has no scanned layout")
    params = jax.tree_util.tree_map(np.asarray,
                                    module.scan_layout(params, bool(runtime["scan_blocks"])))
  if "param_dtype" in runtime:
    dtype = kwargs["param_dtype"]
    params = jax.tree_util.tree_map(
        lambda a: np.asarray(a).astype(dtype) if np.issubdtype(np.asarray(a).dtype, np.floating)
        else a, params)
  model_config = {**teacher.model_config,
                  **{k: (jax.numpy.dtype(v).name if k in ("dtype", "param_dtype") else v)
                     for k, v in runtime.items()}}
  return dataclasses.replace(teacher, module=module.clone(**kwargs), params=params,
                             model_config=model_config)


def write_converted(teacher: Teacher, out: str, provenance: Optional[dict] = None,
                    files: Optional[dict] = None) -> str:
  """Caches a converted teacher as Orbax in the run-directory layout (config.json +
  checkpoints/0), so `teacher.checkpoint=out` loads it without converting again.

  `provenance` is merged into config.json's provenance (e.g. the training config and data
  hash of a shipped teacher); `files` ({name: JSON-able}) are written beside config.json (e.g.
  the teacher's eval cache). Everything is written to `out + ".partial"` and renamed when
  complete: a failed conversion never replaces an existing converted teacher (an existing
  `out` is refused).
  """
  from distill import checkpoint as ckpt
  from distill import runlog
  if os.path.exists(out):
    raise FileExistsError(f"--out: {out!r} exists; remove it first (converted teachers are "
                          "never overwritten)")
  tmp = out + ".partial"
  if os.path.exists(tmp):
    import shutil
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  proc = procs.process_config(teacher.process)
  state = {"params": {"teacher": teacher.params}, "ema": {}, "model_state": {}}
  saver = ckpt.Checkpointer(os.path.join(tmp, "checkpoints"), every_steps=0, keep=1,
                            async_save=False)
  saver.save(0, jax.tree_util.tree_map(np.asarray, state), {"step": 0, "converted": True},
             force=True)
  saver.close()
  runlog.write_json(os.path.join(tmp, "config.json"), {
      "provenance": {"converted_from": teacher.reference, "git_commit": runlog.git_commit(),
                     "packages": runlog.package_versions(), **(provenance or {})},
      "resolved": {"models": {"teacher": teacher.model_config}, "processes": {"teacher": proc},
                   "evaluated_network": "teacher", "evaluated_as": "teacher",
                   "num_classes": teacher.num_classes}})
  for name, content in (files or {}).items():
    runlog.write_json(os.path.join(tmp, name), content)
  os.replace(tmp, out)
  return out
