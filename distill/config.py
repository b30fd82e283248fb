"""Configs: the base schema, loading `configs/X.py[:arg]`, `--config.a.b=value` overrides and
validation before any work.

A config file is a Python module with `get_config(arg=None) -> ml_collections.ConfigDict`. It
starts from `base_config()` (every key the engine reads, with defaults) and sets what it needs.
The schema a run is checked against is the base plus the keys its objective, dataset and model
declare (`objective_defaults`, `data defaults`, `model defaults`), so a misspelt key anywhere
stops the run with one line naming it.
"""
from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any, Iterable

from ml_collections import ConfigDict


class ConfigError(ValueError):
  """A config problem; its message is one line naming the key."""


def base_config() -> ConfigDict:
  """Every key the engine itself reads, with its default."""
  c = ConfigDict()
  c.seed = 0

  c.objective = ConfigDict({"name": "denoise"})
  # The student's (or, for teacher training, the teacher's) architecture. `name` is a model
  # registry name; `prediction` the parameterisation its output is read in; the rest are the
  # module's constructor arguments.
  c.model = ConfigDict({"name": "mlp", "prediction": "flow", "attention": "xla",
                        "jvp_attention": "xla"})
  # The noise process of the network trained here. A distillation run takes its teacher's
  # process from the teacher's checkpoint unless the objective says otherwise.
  c.process = ConfigDict({"name": "rectified_flow"})
  # `runtime`: how the loaded teacher (and networks initialised from it) compute, e.g.
  # teacher.runtime.dtype = "bfloat16", .remat = "full", .attention = "cudnn",
  # .scan_blocks = True, .param_dtype = "bfloat16" (distill/teacher.py RUNTIME_FIELDS).
  c.teacher = ConfigDict({"checkpoint": "", "params": "ema", "runtime": ConfigDict()})
  # Networks that start from another run's weights instead of their objective's init:
  # init.<network> = a run directory of this project, whose network of the same name is loaded
  # at its latest checkpoint (its EMA weights when it has any), e.g. SiD2A's generator from a
  # trained SiD run: --config.init.student=runs/sid. A resumed run restores its own checkpoint
  # over a trained network (frozen ones are not checkpointed and keep the init run's weights),
  # but it still reads the init run when it starts, so that directory must stay readable.
  c.init = ConfigDict()
  c.data = ConfigDict({"name": "gmm"})
  # More data streams, for objectives whose phases read their own (`Phase(..., data="prompts")`;
  # the `data` section above is the stream named "train"): name -> a dataset section like
  # `data` (its `name` and that dataset's keys) plus an optional `batch_size` (default
  # train.batch_size), e.g. --config.data_streams.prompts.name=prompts
  # --config.data_streams.prompts.text_embeds=DIR. Each stream is a pure function of (seed,
  # step, process) like `data`, so resuming needs no iterator state.
  c.data_streams = ConfigDict()

  c.train = ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 256          # global
  c.train.grad_accum = 1            # micro-batches per optimizer step
  c.train.log_every = 50
  c.train.max_skipped_steps = 20    # consecutive non-finite updates before the run stops
  c.train.profile = False
  # Resuming a run with other values than it started with (a key outside what a resume may
  # change, distill/resume.py) stops the command; True goes on and records each change under
  # config.json's provenance.config_changes (step, key: [before, after]).
  c.train.allow_config_change = False

  c.optim = ConfigDict()
  c.optim.name = "adam"             # optax name: adam | adamw | sgd | lion
  c.optim.lr = 1e-3
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"     # constant | cosine | linear (decay over the stage)
  c.optim.grad_clip = 0.0           # global-norm clip; 0 = off
  c.optim.grad_clip_value = 0.0     # element-wise clip (before the norm clip); 0 = off
  c.optim.param_dtype = "float32"   # dtype trained parameters are kept in
  # Per-network overrides of any key above, e.g. optim.networks.fake_score.lr = 4e-5.
  c.optim.networks = ConfigDict()

  # EMA decays per network and role, e.g. ema.student.eval = 0.999 (roles are the objective's).
  c.ema = ConfigDict()

  c.checkpoint = ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.eval = ConfigDict()
  c.eval.every_steps = 0            # 0 = only at the end
  c.eval.num_samples = 2048
  c.eval.steps = (1, 2, 4)          # the student's step counts
  c.eval.teacher_steps = 64         # the teacher's reference step count
  c.eval.seed = 1234
  c.eval.metric = ""                # "" = the dataset's default metric
  # The student's sampler: "" = its objective's; else a solver name or spec with options,
  # e.g. "tcd(gamma=0.0)" (deterministic multistep consistency sampling).
  c.eval.sampler = ""
  # Step counts of "ideal" rows: the student's sampler with the teacher's own ODE (teacher_steps
  # steps) denoising every step, the score of an exact consistency student with that sampler
  # (n * teacher_steps network calls per sample; frozen teachers' rows are cached). () = none.
  c.eval.ideal_steps = ()
  # Write rows computed for a frozen teacher back into its row cache file
  # (<teacher>/teacher_eval.json, when it has one): for a shipped teacher such as the demo's.
  c.eval.update_teacher_cache = False
  c.eval.at_end = True
  # Sample with uniformly drawn class labels (True) or unconditionally, with the null class
  # (False: the whole distribution, which one-step samplers find hardest).
  c.eval.class_conditional = False
  # Guidance scale w of the evaluation (CFG u + w (c - u); 1 = none): the teacher's rows use CFG
  # at w (with class-conditional sampling); a student that embeds w (`guidance_embed`) gets w as
  # its input, any other student samples as it is (its guidance, if any, is distilled in).
  c.eval.guidance = 1.0
  # Several metrics in one evaluation, e.g. ("fid", "is", "pr"): the first is eval.json's
  # "metric" (and its data floor's); every row holds all their values. () = (eval.metric,).
  # Names: swd, fd, fid, sfid, is, pr, clip (distill/evaluation.py, distill/metrics/suite.py).
  c.eval.metrics = ()
  # The image metrics (fid, sfid, is, pr; distill/metrics/suite.py):
  c.eval.inception_weights = ""     # path of pytorch-fid's pt_inception-2015-12-05-6726825d.pth
  # An .npz of the reference's Inception statistics (mu, sigma, mu_s, sigma_s, features): read
  # when it exists (a file of ours must match the data, sample count, seed, weights, size and
  # decoder; a published one is used as it is), else computed from source.reference(n) and
  # written there. "" = computed once per process, not stored.
  c.eval.reference_stats = ""
  c.eval.inception_size = 299       # side images are resized to; < 299 for quick checks only
  # A diffusers AutoencoderKL directory: samples and reference of latent data sets are decoded
  # with decode_latents before the image metrics (which score 8-bit images).
  c.eval.vae = ""
  c.eval.clip = ""                  # a transformers CLIPModel directory (metric "clip")
  # A .npy of CLIP token ids (N, 77), row i the prompt of sample i (aligned with the prompt
  # embeddings the sampler uses), for metric "clip".
  c.eval.clip_tokens = ""
  c.eval.batch_size = 4096          # samples per generation chunk (global, over all devices)
  c.eval.feature_batch = 200        # images per Inception / CLIP / VAE-decoder call (global)

  c.sample = ConfigDict()
  c.sample.every_steps = 0          # 0 = only at the end
  c.sample.num = 64
  c.sample.seed = 7

  c.mesh = ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  # Logical axis -> mesh axis rules; see distill/sharding.py for the default table.
  c.sharding = ConfigDict({"rules": ""})

  c.distributed = ConfigDict({"initialize": False, "coordinator_address": "",
                              "num_processes": 0, "process_id": -1})
  c.compilation_cache = ""          # a directory for JAX's persistent compilation cache
  return c


# ----------------------------------------------------------------------------- loading


def load_config_file(spec: str) -> ConfigDict:
  """Loads `path/to/file.py[:arg]` and calls its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--config: file {path!r} does not exist")
  if not path.endswith(".py"):
    raise ConfigError(f"--config: {path} is not a config file (configs/X.py[:arg]; a run's "
                      "config.json is read by launch.sample / evaluate / convert --workdir)")
  mod_name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec_obj = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(spec_obj)
  spec_obj.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"--config: {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except TypeError:
    config = module.get_config()
  if not isinstance(config, ConfigDict):
    raise ConfigError(f"--config: {path}'s get_config returned a {type(config).__name__}, "
                      "expected an ml_collections.ConfigDict (start from "
                      "distill.config.base_config())")
  return config


def _parse_value(text: str, like: Any, key: str) -> Any:
  """Parses `text` into the type of the current value `like`."""
  if isinstance(like, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r}: expected a bool, got {text!r}")
  if isinstance(like, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: expected an int, got {text!r}") from None
  if isinstance(like, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f"config key {key!r}: expected a float, got {text!r}") from None
  if isinstance(like, str):
    return text
  if isinstance(like, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(p for p in text.split(",") if p)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(like)(value)
  if like is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  raise ConfigError(f"config key {key!r}: cannot override a value of type {type(like).__name__}")


def apply_overrides(config: ConfigDict, overrides: Iterable[str],
                    schema: ConfigDict | None = None) -> ConfigDict:
  """Applies `a.b=value` overrides; unknown keys and unparsable values raise ConfigError.

  A key the config file left out is accepted when `schema` declares it (the objective's,
  dataset's or model's own keys), parsed to the schema default's type.
  """
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"override {item!r}: expected --config.key=value")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts[:-1]):
      if isinstance(node, ConfigDict) and part not in node and _is_open(parts[:i]):
        node[part] = ConfigDict()   # a per-name entry (ema.<net>, optim.networks.<net>)
      if not isinstance(node, ConfigDict) or part not in node:
        raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r}")
      node = node[part]
    leaf = parts[-1]
    if not isinstance(node, ConfigDict):
      raise ConfigError(f"unknown config key {key!r}")
    if leaf not in node:
      # Sub-dicts that hold open-ended per-name entries (optim.networks, ema) accept new keys.
      if _is_open(parts[:-1]):
        node[leaf] = _parse_value(text, None, key)
        continue
      declared = _lookup(schema, parts) if schema is not None else _MISSING
      if declared is _MISSING:
        raise ConfigError(f"unknown config key {key!r}")
      node[leaf] = _parse_value(text, declared, key)
      continue
    with node.ignore_type():
      node[leaf] = _parse_value(text, node[leaf], key)
  return config


_MISSING = object()


def _lookup(schema: ConfigDict, parts: list[str]) -> Any:
  node = schema
  for p in parts:
    if not isinstance(node, ConfigDict) or p not in node:
      return _MISSING
    node = node[p]
  return node


def split_overrides(overrides: Iterable[str]) -> tuple[list[str], list[str]]:
  """(component-name overrides like `data.name=...`, the rest): names decide the schema."""
  names, rest = [], []
  for item in overrides:
    key = item.partition("=")[0]
    (names if key.count(".") == 1 and key.endswith(".name") else rest).append(item)
  return names, rest


_OPEN_DICTS = (("ema",), ("optim", "networks"), ("teacher", "runtime"), ("init",),
               ("data_streams",))


def _is_open(prefix: list[str]) -> bool:
  return any(tuple(prefix[:len(o)]) == o for o in _OPEN_DICTS)


# ----------------------------------------------------------------------------- validation


def _check_against(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> None:
  for key, value in config.items():
    path = f"{prefix}{key}"
    if _is_open(path.split(".")[:len(path.split("."))]):
      continue
    if key not in schema:
      raise ConfigError(f"unknown config key {path!r}")
    expected = schema[key]
    if isinstance(expected, ConfigDict):
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"config key {path!r}: expected a section, got {type(value).__name__}")
      _check_against(value, expected, path + ".")
      continue
    _check_type(path, value, expected)


def _check_type(path: str, value: Any, expected: Any) -> None:
  if expected is None or value is None:
    return
  if isinstance(expected, bool):
    ok = isinstance(value, bool)
  elif isinstance(expected, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(expected, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(expected, (tuple, list)):
    ok = isinstance(value, (tuple, list))
  else:
    ok = isinstance(value, type(expected))
  if not ok:
    raise ConfigError(f"config key {path!r}: expected {type(expected).__name__}, "
                      f"got {type(value).__name__} ({value!r})")


def validate_keys(config: ConfigDict, schema: ConfigDict) -> None:
  """Raises ConfigError naming the first key of `config` that `schema` lacks or mistypes."""
  _check_against(config, schema)


def merge_defaults(schema: ConfigDict, section: str, defaults: dict) -> None:
  """Adds a component's declared keys (objective, data, model) to the schema section."""
  node = schema[section]
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    for k, v in defaults.items():
      if k not in node:
        node[k] = v


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def to_dict(config: ConfigDict) -> dict:
  return config.to_dict()


def from_dict(d: dict) -> ConfigDict:
  """A saved (config.json) config on top of today's base schema: keys added since the run was
  written take their defaults, so older run directories stay readable."""
  config = base_config()
  _merge(config, d)
  return config


def _merge(node: ConfigDict, d: dict) -> None:
  for k, v in d.items():
    if isinstance(v, dict) and k in node and isinstance(node[k], ConfigDict):
      _merge(node[k], v)
    else:
      with node.ignore_type():
        node[k] = ConfigDict(v) if isinstance(v, dict) else (tuple(v) if isinstance(v, list)
                                                              else v)
