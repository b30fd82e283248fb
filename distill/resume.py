"""Whether a train command may resume the run already in its `--workdir`.

Running the same command again resumes (DESIGN.md). A *different* command pointed at a directory
that holds a run would restore that run's weights and rewrite its config.json, so the record
would claim one config for weights trained with another (a toy teacher trained with
`model.time_scale=1` resumed at its last step with 0.001 looks finished and is silently wrong
for every run that later distils from it). A resume may change how and where the run goes on:
its length, logging, checkpointing, evaluation, devices and kernels (`RESUME_MAY_CHANGE`), and
where its data lives (`RESUME_MAY_MOVE`, recorded in config.json) as long as the data's content
hash is the one the run started with. Any other difference, data whose content changed, or a
frozen teacher whose weights changed since the run started (or that it gained or lost), stops
the command with one line before anything is written, unless `train.allow_config_change` says
to go on; config.json then records each change (`provenance.config_changes`).
"""
from __future__ import annotations

import fnmatch
import json
import os
from typing import Any, Iterable, Mapping, Optional

from distill import runlog

# Config keys (exact, or a prefix ending in ".") that a resumed run may change.
RESUME_MAY_CHANGE = (
    "train.steps", "train.allow_config_change", "train.log_every", "train.profile",
    "train.max_skipped_steps", "train.grad_accum", "checkpoint.", "eval.", "sample.",
    "compilation_cache", "distributed.", "mesh.", "sharding.", "model.attention",
    "model.jvp_attention", "model.remat", "model.scan_unroll", "teacher.runtime.",
    # A moved teacher is the same teacher when its weights hash the same (checked separately).
    "teacher.checkpoint",
)
# Keys a resumed run may change that say where its inputs live: a dataset staged to another path
# is the same data. The change is recorded (`provenance.config_changes`), not refused.
RESUME_MAY_MOVE = ("data.path", "data.text_embeds", "data_streams.*.path",
                   "data_streams.*.text_embeds")
_NOT_CONFIG = ("provenance", "resolved")


def flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of a nested mapping."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _may_change(key: str, allowed: Iterable[str]) -> bool:
  """`key` is one of `allowed`: exact names, prefixes ending in ".", `*` patterns."""
  return any(key == a or (a.endswith(".") and key.startswith(a))
             or ("*" in a and fnmatch.fnmatchcase(key, a)) for a in allowed)


def changed_keys(stored: Mapping[str, Any], config: Mapping[str, Any],
                 defaults: Mapping[str, Any] = (), allowed: Iterable[str] = RESUME_MAY_CHANGE
                 ) -> list[tuple[str, Any, Any]]:
  """(key, stored value, new value) for every key whose value differs, outside `allowed`.

  A key only one side holds stands for its default there (`defaults`: the config schema, i.e.
  the base config and the chosen objective's, dataset's, model's and process's declared values):
  a run trained without `model.time_scale` used the model's default, and a network's optimizer
  key `optim.networks.<net>.<k>` defaults to `optim.<k>` of the same side. A key the schema
  declares without a default (None) is left out; one it does not know at all (an `init.<net>`,
  an `ema.<net>` role) is a change when one side lacks it.
  """
  old = flat({k: v for k, v in stored.items() if k not in _NOT_CONFIG})
  new = flat(_json(dict(config)))
  schema = flat(_json(dict(defaults)))
  missing = object()

  def value(side: dict, k: str):
    if k in side:
      return side[k]
    parts = k.split(".")
    if k.startswith("optim.networks.") and len(parts) == 4:
      return side.get(f"optim.{parts[3]}", schema.get(f"optim.{parts[3]}", missing))
    return schema.get(k, missing)

  out = []
  for k in sorted(old.keys() | new.keys()):
    if _may_change(k, allowed):
      continue
    if (k not in old or k not in new) and k in schema and schema[k] is None:
      continue
    a, b = value(old, k), value(new, k)
    if a != b:
      out.append((k, None if a is missing else a, None if b is missing else b))
  return out


def _json(tree: Any) -> Any:
  """`tree` as config.json holds it (tuples as lists, numpy scalars as numbers)."""
  return json.loads(json.dumps(runlog.jsonable(tree)))


def changed_frozen(stored: Mapping[str, Any], frozen_refs: Mapping[str, Mapping[str, Any]]
                   ) -> list[tuple[str, Any, Any]]:
  """(network, stored hash, new hash) for each frozen network whose weights changed, or that one
  side has and the other lacks (a teacher added to or dropped from a run; hash None)."""
  resolved = stored.get("resolved") or {}
  if "frozen" not in resolved:
    return []
  old = resolved["frozen"] or {}
  out = []
  for n in sorted(set(old) | set(frozen_refs)):
    a = (old.get(n) or {}).get("hash")
    b = (frozen_refs.get(n) or {}).get("hash")
    if a != b:
      out.append((n, a, b))
  return out


def changed_data(stored: Mapping[str, Any], data_hash: Optional[str]
                 ) -> Optional[tuple[Any, Any]]:
  """(stored hash, new hash) when the data's content hash differs from the one the run started
  with (`resolved.data_hash`; runs that predate it are not compared), else None."""
  old = (stored.get("resolved") or {}).get("data_hash")
  if old is None or data_hash is None or old == data_hash:
    return None
  return old, data_hash


def check(workdir: str, config: Mapping[str, Any], defaults: Mapping[str, Any],
          frozen_refs: Mapping[str, Mapping[str, Any]], allow: bool = False,
          data_hash: Optional[str] = None) -> dict[str, list[Any]]:
  """The changes resuming the run in `workdir` (it has a checkpoint) with `config` would make:
  {key: [there, here]}, a frozen network's weights as `frozen.<network>.hash`, the data's
  content as `data.hash`. Raises ValueError (one line) when there are any and not `allow`
  (a moved dataset, `RESUME_MAY_MOVE`, is allowed when its content hash is unchanged).
  `defaults`: see `changed_keys`; `frozen_refs`: {network: reference with its weights' hash}
  of the networks loaded from the teacher checkpoint now; `data_hash`: the data source's
  `content_hash()` now."""
  stored = _stored(workdir)
  if stored is None:
    return {}
  every = changed_keys(stored, config, defaults)
  diffs = [d for d in every if not _moved(d)]
  moved = changed_frozen(stored, frozen_refs)
  data = changed_data(stored, data_hash)
  if not allow and diffs:
    shown = "; ".join(f"{k} is {old!r} there, {new!r} here" for k, old, new in diffs[:3])
    more = f" (and {len(diffs) - 3} more keys)" if len(diffs) > 3 else ""
    raise ValueError(
        f"--workdir {workdir} holds a run with another config: {shown}{more}. Resuming may "
        f"change only how a run goes on (train.steps, logging, checkpoint.*, eval.*, mesh.*, "
        f"attention kernels): use a new --workdir (--config.init.<network>={workdir} starts "
        f"one from its weights), or --config.train.allow_config_change=true to go on with "
        f"these values (config.json records the change)")
  if not allow and moved:
    n, old, new = moved[0]
    recorded = ((stored.get("resolved") or {}).get("frozen") or {}).get(n)
    key = (frozen_refs.get(n) or recorded or {}).get("key", "teacher.checkpoint")
    what = (f"the run has no frozen {n} now" if new is None else
            f"the run started without a frozen {n}" if old is None else
            f"the frozen {n}'s weights changed since the run started (hash {str(old)[:12]} "
            f"there, {str(new)[:12]} now)")
    raise ValueError(f"--workdir {workdir}: {what} (config key {key}): resume with the weights "
                     f"it started from, {_OR_GO_ON}")
  if not allow and data:
    paths = [f"{k} {old!r} there, {new!r} here" for k, old, new in every
             if _may_change(k, RESUME_MAY_MOVE)]
    where = f" ({'; '.join(paths)})" if paths else ""
    raise ValueError(
        f"--workdir {workdir}: the data differs from the data the run started with{where}: "
        f"content hash {data[0][:12]} there, {data[1][:12]} now: resume with the data it "
        f"started from, {_OR_GO_ON}")
  changes = {k: [old, new] for k, old, new in every}
  changes.update({f"frozen.{n}.hash": [old, new] for n, old, new in moved})
  if data:
    changes["data.hash"] = list(data)
  return changes


# How each refusal for changed inputs ends.
_OR_GO_ON = ("use a new --workdir, or --config.train.allow_config_change=true to go on "
             "(config.json records the change)")


def _moved(diff: tuple[str, Any, Any]) -> bool:
  """A difference that only says where an input lives now: the data (`RESUME_MAY_MOVE`; its
  content hash is compared) or the run an `init.<network>` is read from (given on both sides: a
  trained network's weights come from the checkpoint, a frozen one's hash is compared)."""
  key, old, new = diff
  return _may_change(key, RESUME_MAY_MOVE) or (key.startswith("init.") and bool(old)
                                               and bool(new))


def recorded_changes(workdir: str) -> list[dict[str, Any]]:
  """The config changes earlier resumes of the run in `workdir` made (`provenance.
  config_changes` of its config.json: [{"step": K, "changes": {key: [before, after]}}])."""
  stored = _stored(workdir) or {}
  return list((stored.get("provenance") or {}).get("config_changes") or [])


def recorded_init_runs(workdir: str) -> dict[str, Any]:
  """Where the trained networks of the run in `workdir` started (`resolved.init_runs` of its
  config.json: {network: the init.<net> run's reference}); a resume does not read those runs."""
  stored = _stored(workdir) or {}
  return dict((stored.get("resolved") or {}).get("init_runs") or {})


def _stored(workdir: str) -> Optional[dict[str, Any]]:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot be read to resume the run there ({e})") from None
