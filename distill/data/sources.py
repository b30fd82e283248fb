"""Data sources by name: the `DATASETS` registry, config validation and `make_source`.

A *source* turns `(seed, step, process_index)` into a batch with no iterator state, so a run
resumes exactly from its step number alone (docs/conventions.md, "Data"):

    src = make_source(config.data, seed)
    src.batch(step, global_batch, process_index=0, process_count=1)  # {"x": f32, "label": i32}
    src.reference(n, seed)                                           # real samples, np.ndarray
    src.shape, src.num_classes                                       # per-example shape, 0 = none

Determinism contract. The global batch of step `step` is drawn with
`numpy.random.Generator(PCG64(SeedSequence(seed, spawn_key=(0, step))))`; process `p` of `P`
receives rows `[p * B / P, (p + 1) * B / P)` of that same global batch, so concatenating the
slices of all processes in order reproduces the single-process batch bit for bit. `reference`
uses the separate streams `spawn_key=(1, chunk)` of its own seed, so real samples for metrics
never alias a training batch's random stream, and `reference(m, s)` is a prefix of
`reference(n, s)` for `m <= n`.

Each dataset is a `Source` subclass registered with `register_dataset(name)`; its `DEFAULTS`
class attribute lists every key the dataset accepts with its default value. `make_source`
rejects unknown keys and wrong types with one line naming the key, before any work.
"""
from __future__ import annotations

import re
from typing import Any, ClassVar, Mapping, Optional

import numpy as np

from distill.registry import Registry

DATASETS: Registry = Registry("dataset")

# Random-stream tags mixed into the SeedSequence spawn key (see the module docstring).
_BATCH_STREAM = 0
_REFERENCE_STREAM = 1
REFERENCE_CHUNK = 4096


def _seed_int(seed: int) -> int:
  """Maps any Python int (also negative) onto the non-negative range SeedSequence accepts."""
  return int(seed) & 0xFFFF_FFFF_FFFF_FFFF


def batch_rng(seed: int, step: int) -> np.random.Generator:
  """The generator of the global batch at `step` (shared by all processes)."""
  if step < 0:
    raise ValueError(f"step must be >= 0, got {step}")
  ss = np.random.SeedSequence(_seed_int(seed), spawn_key=(_BATCH_STREAM, int(step)))
  return np.random.Generator(np.random.PCG64(ss))


def reference_rng(seed: int, chunk: int = 0) -> np.random.Generator:
  """The generator of chunk `chunk` of the reference samples for `seed`."""
  ss = np.random.SeedSequence(_seed_int(seed), spawn_key=(_REFERENCE_STREAM, int(chunk)))
  return np.random.Generator(np.random.PCG64(ss))


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """The rows of the global batch that belong to one process."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process {process_index} of {process_count}")
  if global_batch % process_count:
    raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


class Source:
  """Base class of a stateless, seeded data source.

  Subclasses set `shape` and `num_classes` in `__init__` and implement `draw(rng, n)`, which
  returns `n` i.i.d. examples as a dict (`x` float32 and, when `num_classes > 0`, `label` int32).
  Sources that can gather a subset of rows cheaply may override `global_rows` instead.
  """

  DEFAULTS: ClassVar[dict[str, Any]] = {}
  shape: tuple[int, ...] = ()
  num_classes: int = 0
  # False: the batches' `x` carries only a shape (a prompts-only source); objectives that read
  # real data (`Objective.real_data`) and evaluations against it are refused.
  real_data: ClassVar[bool] = True

  def __init__(self, seed: int):
    self.seed = int(seed)

  def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def global_rows(self, rng: np.random.Generator, global_batch: int,
                  rows: slice) -> dict[str, np.ndarray]:
    """The `rows` slice of a global batch drawn from `rng` (default: draw all, then slice)."""
    full = self.draw(rng, global_batch)
    return {k: v[rows] for k, v in full.items()}

  def batch(self, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict[str, np.ndarray]:
    """This process's slice of the global batch of `step`: a pure function of its arguments."""
    rows = process_rows(global_batch, process_index, process_count)
    return self.global_rows(batch_rng(self.seed, step), global_batch, rows)

  def reference(self, n: int, seed: int) -> np.ndarray:
    """`n` real examples (`x` only) for metrics, independent of the training stream.

    Drawn in chunks of `REFERENCE_CHUNK` rows, chunk `i` from `reference_rng(seed, i)`, so a
    smaller reference is a prefix of a larger one with the same seed.
    """
    chunks, left, i = [], n, 0
    while left > 0:
      take = min(left, REFERENCE_CHUNK)
      chunks.append(self.draw(reference_rng(seed, i), REFERENCE_CHUNK)["x"][:take])
      left, i = left - take, i + 1
    if not chunks:
      return np.zeros((0,) + tuple(self.shape), np.float32)
    return np.concatenate(chunks)

  # -- text conditioning (text-to-image sources override both) ------------------------------
  # Batch keys that condition a network (not `x`, not `label`): the prompt of text-to-image
  # data. `context.cond_from_batch` maps them to the models' keywords.
  TEXT_KEYS: ClassVar[tuple[str, ...]] = ("text_embeds", "text_mask", "pooled_text_embeds",
                                          "time_ids")

  def null_inputs(self) -> dict[str, np.ndarray]:
    """The null condition of this data's prompts, as batch keys without the batch axis: the
    encoded empty prompt (SD1.5/SD2/SANA: `text_embeds` (L, D), maybe `text_mask` (L,) and
    `pooled_text_embeds` (Dp,)). Empty: the all-zero null prompt (DMD2-SDXL's convention) or
    no prompt at all. Classifier-free guidance and condition dropout use it."""
    return {}

  def conditions(self, n: int, seed: int) -> dict[str, np.ndarray]:
    """The conditioning of `n` evaluation / sample-grid samples, batch keys with n rows (the
    `TEXT_KEYS` the data has; `clip_tokens` (n, 77) CLIP token ids of the same prompts when
    known, for the CLIP score). Empty for data without prompts (class labels are drawn by the
    evaluation). Deterministic in `seed`, independent of the training stream."""
    del n, seed
    return {}

  def content_hash(self) -> str:
    """sha256 (hex) identifying the data: by default of the source's type and the bytes of a
    fixed reference sample (finite data sets hash all their examples instead)."""
    import hashlib  # pylint: disable=import-outside-toplevel
    h = hashlib.sha256(type(self).__name__.encode())
    h.update(np.ascontiguousarray(self.reference(256, 0), np.float32).tobytes())
    return h.hexdigest()

  def floor_reference(self, n: int, seed: int) -> np.ndarray:
    """`n` real examples independent of `reference(n, seed)`, for the data floor.

    By default the reference of a second seed derived from `seed`
    (`distill.metrics.swd.floor_seeds`); finite data sets return a disjoint set instead.
    """
    from distill.metrics.swd import floor_seeds  # pylint: disable=import-outside-toplevel
    return self.reference(n, floor_seeds(seed)[1])

  def __repr__(self) -> str:
    return f"{type(self).__name__}(shape={self.shape}, num_classes={self.num_classes})"


def register_dataset(name: str):
  """Class decorator: registers a `Source` subclass (with a `DEFAULTS` dict) under `name`."""
  def deco(cls):
    if not (isinstance(cls, type) and issubclass(cls, Source)):
      raise TypeError(f"dataset {name!r} must be a Source subclass")
    if not isinstance(cls.__dict__.get("DEFAULTS"), dict):
      raise TypeError(f"dataset {name!r} must define its own DEFAULTS dict")
    return DATASETS.register(name)(cls)
  return deco


def default_config(name: str) -> dict[str, Any]:
  """Every key dataset `name` accepts, with its default value (a fresh dict, `name` excluded)."""
  return dict(DATASETS.get(name).DEFAULTS)


def _as_dict(data_config: Any) -> dict[str, Any]:
  if hasattr(data_config, "to_dict"):  # ml_collections (Frozen)ConfigDict
    return dict(data_config.to_dict())
  if isinstance(data_config, Mapping):
    return dict(data_config)
  raise TypeError(f"data config must be a mapping, got {type(data_config).__name__}")


def _check_type(name: str, key: str, value: Any, default: Any) -> Any:
  """Returns `value` coerced to the default's type, or raises one line naming `data.<key>`."""
  bad = ValueError(f"data.{key}: expected {type(default).__name__} for dataset {name!r}, "
                   f"got {value!r} ({type(value).__name__})")
  if default is None:
    return value
  if isinstance(default, bool):
    if not isinstance(value, (bool, np.bool_)):
      raise bad
    return bool(value)
  if isinstance(default, int):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise bad
    return int(value)
  if isinstance(default, float):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
      raise bad
    return float(value)
  if not isinstance(value, type(default)):
    raise bad
  return value


def resolve_config(data_config: Any) -> tuple[str, dict[str, Any]]:
  """Validates a data config: returns `(name, kwargs)` with every default filled in."""
  cfg = _as_dict(data_config)
  if "name" not in cfg:
    raise ValueError("data.name is missing")
  name = cfg.pop("name")
  defaults = default_config(name)
  for key in cfg:
    if key not in defaults:
      known = ", ".join(sorted(defaults)) or "none"
      raise ValueError(f"data.{key}: unknown key for dataset {name!r} (known: {known})")
  kwargs = dict(defaults)
  for key, value in cfg.items():
    kwargs[key] = _check_type(name, key, value, defaults[key])
  return name, kwargs


TRAIN_STREAM = "train"   # the stream the config's `data` section describes


class DataReadError(RuntimeError):
  """A batch a source could not read while training (a record the setup checks could not see,
  e.g. a corrupt shard): the trainer stops on it in one line."""


def stream_settings(config: Any) -> dict[str, tuple[dict[str, Any], int]]:
  """{stream: (its data config, its global batch size)} of a run config: `data` as "train" and
  each `data_streams.<name>` (a dataset section plus an optional `batch_size`)."""
  bs = int(config.train.batch_size)
  out = {TRAIN_STREAM: (_as_dict(config.data), bs)}
  for name, entry in _as_dict(config.get("data_streams") or {}).items():
    if name == TRAIN_STREAM:
      raise ValueError(f"config key 'data_streams.{name}': {name!r} is the `data` section's "
                       "stream; give another name")
    if not isinstance(entry, Mapping):
      raise ValueError(f"config key 'data_streams.{name}': expected a dataset section (name "
                       f"and its keys), got {entry!r}")
    entry = dict(entry)
    out[name] = (entry, int(entry.pop("batch_size", bs)))
  return out


def stream_seed(seed: int, stream: str) -> int:
  """The seed of a data stream: the run's for "train", a fixed mix of it and the name else."""
  if stream == TRAIN_STREAM:
    return int(seed)
  import zlib  # pylint: disable=import-outside-toplevel
  return (int(seed) * 1_000_003 + zlib.crc32(stream.encode())) % (2 ** 31)


def for_stream(message: str, stream: str) -> str:
  """A data error's message with `data.<key>` named as the stream's `data_streams.<s>.<key>`."""
  if stream == TRAIN_STREAM:
    return message
  return re.sub(r"(?<![\w/.])data\.", f"data_streams.{stream}.", message)


def make_stream_sources(settings: Mapping[str, tuple[dict[str, Any], int]], seed: int,
                        train: Optional["Source"] = None) -> dict[str, "Source"]:
  """{stream: Source} of every stream of `settings` (`stream_settings`; errors name the
  stream's keys); `train`: the train stream's source when it is already built."""
  out = {}
  for name, (data_cfg, _) in settings.items():
    if name == TRAIN_STREAM and train is not None:
      out[name] = train
      continue
    try:
      out[name] = make_source(data_cfg, stream_seed(seed, name))
    except ValueError as e:
      raise ValueError(for_stream(str(e.args[0] if e.args else e), name)) from None
  return out


def make_source(data_config: Any, seed: int) -> Source:
  """Builds the source named by `data_config.name` with the dataset's own keys from the config."""
  name, kwargs = resolve_config(data_config)
  return DATASETS.get(name)(seed=seed, **kwargs)


# The built-in datasets register themselves on import. Imported last: they import this module.
from distill.data import digits as _digits  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from distill.data import latents as _latents  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from distill.data import prompts as _prompts  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from distill.data import synthetic as _synthetic  # noqa: E402,F401  pylint: disable=g-import-not-at-top
from distill.data import toy as _toy  # noqa: E402,F401  pylint: disable=g-import-not-at-top
