"""The objective API: an objective is data (networks, phases, EMA roles, stages); its losses are
pure functions. The engine (distill/engine.py) does everything else.

    @register_objective("denoise", defaults={"weighting": "none", "ema_decay": 0.999, ...})
    def denoise(cfg: ml_collections.ConfigDict) -> Objective:   # cfg: the `objective` section
      return Objective(
          networks=(Network("model", init="random"),),
          phases=(Phase("denoise", loss=functools.partial(loss, ...), trains=("model",)),),
          ema={"model": {"eval": float(cfg.ema_decay)}})   # {network: {role: decay}}

A phase loss is

    loss(trainable, ctx, batch, rng, t) -> (loss, metrics)            # or
    loss(trainable, ctx, batch, rng, t) -> (loss, metrics, updates)   # mutable collections

with `trainable` the params of the networks the phase trains, `ctx` every other network
(frozen teachers, EMA roles, networks trained by other phases at their current values), the
apply functions and the process, `rng` = fold_in(fold_in(seed, step), phase_index) and `t` the
Time of this call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Union

import jax
import numpy as np
from flax import struct

from distill.registry import Registry

Params = Any


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A LoRA adapter over the kernels whose '/'-joined path matches `pattern`."""
  pattern: str
  rank: int = 16
  alpha: Optional[float] = None

  def __post_init__(self):
    """Checked where an objective builds it (the objective's lora_* keys, in one line)."""
    import re  # pylint: disable=import-outside-toplevel
    if int(self.rank) < 1:
      raise ValueError(f"LoRA adapter: rank must be >= 1, got {self.rank} (objective.*lora_rank)")
    if self.alpha is not None and not float(self.alpha) > 0:
      raise ValueError(f"LoRA adapter: alpha must be > 0 (or unset: alpha = rank), got "
                       f"{self.alpha} (objective.*lora_alpha)")
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise ValueError(f"LoRA adapter: pattern {self.pattern!r} is not a regular expression "
                       f"({e}) (objective.*lora_pattern)") from None


@dataclasses.dataclass(frozen=True)
class Network:
  """One network of an objective.

  init: "random" (fresh init of `model` or the config's model), "teacher" (a copy of the
    teacher's weights), "checkpoint" (the config's teacher checkpoint: this *is* the teacher),
    or the name of another network to copy at start.
  model: the model registry name; None = the config's `model` (students), or the teacher's own
    architecture for networks initialised from the teacher.
  trainable: a regex over parameter paths of what a phase may update; None = frozen.
  base: the name of a frozen network whose weights this one shares (with `adapter`, the
    network's own params are only the adapter's).
  wrapper: a registered wrapper applied to the network's output (e.g. "flow_to_trigflow").
  backbone: for heads: the network whose features they read.
  kwargs: constructor overrides for `model`.
  reparameterize: with init "teacher": take the teacher's weights but the config's noise process
    and prediction kind (fine-tune a VP eps teacher into a dense-time flow model, as SANA-Sprint
    and configs/imagenet/dit_xl2.py:teacher do); False = the teacher's own.
  """
  name: str
  init: str = "random"
  model: Optional[str] = None
  trainable: Optional[str] = ".*"
  base: Optional[str] = None
  adapter: Optional[LoRA] = None
  wrapper: Optional[str] = None
  backbone: Optional[str] = None
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  reparameterize: bool = False

  @property
  def frozen(self) -> bool:
    return self.trainable is None


@dataclasses.dataclass(frozen=True)
class Phase:
  """One update of some networks. Runs when start <= step < stop and (step - offset) % every == 0."""
  name: str
  loss: Callable
  trains: tuple[str, ...]
  every: int = 1
  offset: int = 0
  start: int = 0
  stop: Optional[int] = None
  # The data stream(s) it reads (`data_streams.<name>` of the config; "train" is `data`). One
  # name: the loss's batch is that stream's. A tuple (first, *more): the first stream's batch
  # with each further stream's batch under its own name, e.g. data=("train", "real") gives
  # batch["x"], batch["text_embeds"], ... of "train" and batch["real"] = {"x": ..., ...}.
  data: Union[str, tuple[str, ...]] = "train"

  @property
  def streams(self) -> tuple[str, ...]:
    """The names of the data streams it reads, its batch's own first."""
    return (self.data,) if isinstance(self.data, str) else tuple(self.data)

  def active(self, step: int) -> bool:
    if step < self.start or (self.stop is not None and step >= self.stop):
      return False
    return (step - self.offset) % self.every == 0

  def count_before(self, step: int) -> int:
    """How many times this phase ran at steps < `step` (its phase_step at `step`)."""
    lo = self.start
    hi = step if self.stop is None else min(step, self.stop)
    if hi <= lo:
      return 0
    # Steps s in [lo, hi) with s = offset (mod every).
    first = lo + ((self.offset - lo) % self.every)
    return 0 if first >= hi else (hi - 1 - first) // self.every + 1


@dataclasses.dataclass(frozen=True)
class Stage:
  """A training stage: `steps` long; `overrides` of objective keys; at its start the engine
  copies networks as `promote` says ({"teacher": "student"}: the student becomes the teacher;
  {"teacher": "student@eval"}: the student's EMA of role "eval" does, where that average is
  what the method evaluates) and resets optimizer / EMA state when asked."""
  steps: int
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  promote: Mapping[str, str] = dataclasses.field(default_factory=dict)
  reset_opt: bool = False
  reset_ema: bool = False


def promotion_source(source: str) -> tuple[str, Optional[str]]:
  """(network, EMA role or None) of a Stage.promote source: "student" is the network's own
  weights, "student@eval" its EMA of role "eval"."""
  network, _, role = source.partition("@")
  return network, (role or None)


@dataclasses.dataclass(frozen=True)
class Objective:
  networks: tuple[Network, ...]
  phases: tuple[Phase, ...]
  # {network: {role: decay}}: a decay (float) or a schedule (callable(Time) -> decay); the
  # config's `ema.<network>.<role>` overrides it. ctx.ema[network][role] holds the average.
  ema: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  stages: tuple[Stage, ...] = ()
  # The network evaluated and sampled as "student" and its sampler ("euler", "consistency",
  # "trigflow", ...). A teacher-training objective names its network here with role "teacher".
  student: str = "student"
  sampler: str = "euler"
  evaluates_as: str = "student"
  # The step count its student is trained to be sampled with, where the method fixes one
  # (progressive's N, segmented_cm's segments; per stage, so a run stopped mid-way is sampled
  # as its current stage's student): launch.sample's default --steps. None: eval.steps[0].
  student_steps: Optional[int] = None
  # Its losses sample the teacher with classifier-free guidance (guided, agd; lcm, segmented_cm,
  # progressive with a guidance scale): the teacher must take a condition CFG can drop.
  distils_guidance: bool = False
  # Whether its losses read batch["x"] as real data. False: data-free (VSD, SiD and DMD2
  # without their GAN terms read only the batch's shape and conditioning), so a prompts-only
  # source (`prompts`) can feed it. A stream name: only that stream's images are read as real
  # data (DMD2's GAN on `data_streams.real` while the train stream serves prompts alone).
  real_data: Union[bool, str] = True

  def network(self, name: str) -> Network:
    for n in self.networks:
      if n.name == name:
        return n
    raise KeyError(f"objective has no network {name!r}")

  @property
  def trained(self) -> tuple[str, ...]:
    names = []
    for p in self.phases:
      for n in p.trains:
        if n not in names:
          names.append(n)
    return tuple(names)


@struct.dataclass
class Time:
  """Counters of one phase call (traced scalars: no recompiles as they change)."""
  step: jax.Array
  phase_step: jax.Array
  stage: jax.Array
  stage_step: jax.Array


def make_time(step: int, phase_step: int, stage: int, stage_step: int) -> Time:
  # Host scalars: jit transfers them with its arguments (no eager dispatch per counter).
  i = np.int32
  return Time(i(step), i(phase_step), i(stage), i(stage_step))


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ObjectiveEntry:
  build: Callable[..., Objective]
  defaults: Mapping[str, Any]


OBJECTIVES: Registry = Registry("objective")


def register_objective(name: str, defaults: Optional[Mapping[str, Any]] = None):
  """Registers `build(cfg) -> Objective` with the objective's own config keys and defaults."""
  def deco(fn):
    OBJECTIVES.add(name, ObjectiveEntry(fn, dict(defaults or {})))
    return fn
  return deco
