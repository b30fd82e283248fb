"""Orbax checkpoints of a run: async, keep-N plus stage boundaries, exact resume.

Each saved step holds two items:
  state  the TrainState pytree (sharded arrays; Orbax reshards on restore onto another mesh)
  meta   JSON: step, stage, the data position of every process, frozen-network references

Orbax writes a step into a temporary directory and renames it when complete, so a crash
mid-save never replaces the last good checkpoint. A latest checkpoint that fails to restore
(corrupted files) is skipped with a warning and the previous one is used.
"""
from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

log = logging.getLogger(__name__)


class Checkpointer:
  """A CheckpointManager over `directory` with the run's save and keep rules."""

  def __init__(self, directory: str, *, every_steps: int = 0, keep: int = 1,
               keep_steps: Sequence[int] = (), async_save: bool = True,
               read_only: bool = False):
    """`read_only`: restore only, for reading a run another process may be training (its
    in-flight save's temporary directory is left alone; nothing is created or deleted)."""
    self.directory = os.path.abspath(directory)
    self.every_steps = int(every_steps)
    self.last_restore_error = ""
    self.skipped: dict[int, str] = {}   # step -> why restore_latest passed it over
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True)
    else:
      policies = [cm.LatestN(max(1, int(keep)))]
      if keep_steps:
        policies.append(cm.CustomSteps(list(int(s) for s in keep_steps)))
      options = ocp.CheckpointManagerOptions(
          create=True,
          enable_async_checkpointing=async_save,
          preservation_policy=cm.AnyPreservationPolicy(policies),
          cleanup_tmp_directories=True,
      )
    _quiet_closed_loop_echoes()
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                         options=options)
    self._await_tmp_cleanup()

  def _await_tmp_cleanup(self) -> None:
    """Waits for Orbax's removal of a killed run's temporary directories.

    The manager starts it in a thread and only a save awaits it (`close` does not), so a
    command that stopped before its first save (a refused resume) could exit mid-cleanup and
    print a page of "cannot schedule new futures after shutdown" after its one-line error.
    """
    await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
    if await_cleanup is not None:   # absent in an Orbax without the threaded cleanup
      await_cleanup()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    _expect_failed_reads(self.directory, step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """The newest checkpoint that restores; corrupted ones are skipped with a warning (the last
    failure's first line is kept in `last_restore_error`). A step whose stored arrays do not
    have `abstract_state`'s paths and shapes (another config's run) is skipped without reading
    its data."""
    self.skipped = {}
    for step in reversed(self.all_steps()):
      misfit = layout_mismatch(self.directory, step, abstract_state)
      if misfit:
        self.last_restore_error = self.skipped[step] = f"step {step}: {misfit}"
        log.info("checkpoint at step %d in %s does not fit this config: %s", step,
                 self.directory, misfit)
        continue
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
        error = _restore_failed(step, self.directory, e)
        self.last_restore_error = self.skipped[step] = f"step {step}: {error}"
    return None

  def set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the run's checkpoints (to `../unreadable_checkpoints/`,
    kept for inspection) so that training past it saves that step anew; returns where it went.
    For the steps `restore_latest` skipped when a resume goes on from an earlier one: left in
    place, the step would block its own save (Orbax keeps an existing step) and be skipped
    again at every later resume."""
    aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
    os.makedirs(aside, exist_ok=True)
    dest, n = os.path.join(aside, str(step)), 0
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(aside, f"{step}.{n}")
    os.rename(os.path.join(self.directory, str(step)), dest)
    self.manager.reload()
    return dest

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _restore_failed(step: int, directory: str, e: Exception) -> str:
  """Logs a step that could not be restored in one line (Orbax's errors carry whole
  tensorstore specs); returns the reason."""
  error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
  log.warning("checkpoint at step %d in %s could not be restored (%s); falling back to the "
              "previous one", step, directory, error)
  return error


_QUIETED = set()


def _is_closed_loop_echo(e: Optional[BaseException]) -> bool:
  return isinstance(e, RuntimeError) and str(e) == "Event loop is closed"


def _quiet_closed_loop_echoes() -> None:
  """Drops the echoes of a failed restore's reads (its warning names the failure): Orbax's
  reads still in flight complete on its closed event loop and each reports an "Event loop is
  closed" RuntimeError (some 900 lines of tracebacks for a toy run's checkpoint), as an
  unraisable exception, through the excepthooks, or as a logged callback error depending on
  where the read finished. Installed once, when checkpoints are first opened (a damaged step's
  metadata read can echo too); every other exception and record passes."""
  if "loop" in _QUIETED:
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
  previous_thread = threading.excepthook

  def unraisable_hook(unraisable):
    if not _is_closed_loop_echo(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(kind, value, tb):
    if not _is_closed_loop_echo(value):
      previous_except(kind, value, tb)

  def thread_hook(args):
    if not _is_closed_loop_echo(args.exc_value):
      previous_thread(args)

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  threading.excepthook = thread_hook
  for name in ("asyncio", "concurrent.futures"):
    logging.getLogger(name).addFilter(
        lambda record: not (record.exc_info and _is_closed_loop_echo(record.exc_info[1])))
  _QUIETED.add("loop")


_FAILED_READ_DIRS: set[str] = set()   # step directories whose unretrieved read errors are echoes


def _expect_failed_reads(directory: str, step: int) -> None:
  """Before reading checkpoint `step`: asyncio's "Task/Future exception was never retrieved"
  record for each of its reads that fails (the same error as the restore's, once per array,
  logged when the garbage collector meets the future: before or after the restore raises) is
  dropped. Only records whose error names that step's directory; a read that succeeds leaves
  none, so registering ahead hides nothing else."""
  base = os.path.join(os.path.abspath(directory), str(step))
  _FAILED_READ_DIRS.update({base + os.sep, os.path.realpath(base) + os.sep})
  if "reads" not in _QUIETED:
    logging.getLogger("asyncio").addFilter(lambda record: not _is_failed_read_echo(record))
    _QUIETED.add("reads")


def _is_failed_read_echo(record: logging.LogRecord) -> bool:
  message = record.getMessage()
  if "exception was never retrieved" not in message:
    return False
  if record.exc_info and record.exc_info[1] is not None:
    message += str(record.exc_info[1])
  return any(d in message for d in _FAILED_READ_DIRS)


def layout_mismatch(directory: str, step: int, abstract_state: Any) -> str:
  """"" when the arrays stored at `step` have the paths and shapes of `abstract_state`, else
  the first difference in words (read from the checkpoint's metadata, no array data; dtypes
  may differ: a restore casts them). A checkpoint whose metadata cannot be read yields "" (its
  restore then decides)."""
  mngr = _read_only_manager(directory)
  _expect_failed_reads(directory, step)
  try:
    stored = _leaves(_structure(mngr.item_metadata(step)["state"]))
  except Exception:  # noqa: BLE001 - unreadable metadata: left to the restore
    return ""
  finally:
    mngr.close()
  if not stored:
    return ""
  wanted = _leaves(abstract_state)
  if not set(wanted) & set(stored):   # no path in common: a naming this check does not know
    return ""
  for path, leaf in wanted.items():
    have = stored.get(path)
    if have is None:
      return f"{path}: not in the checkpoint"
    if tuple(have.shape) != tuple(leaf.shape):
      return (f"{path}: shape {tuple(have.shape)} in the checkpoint, {tuple(leaf.shape)} in this "
              f"config")
  extra = sorted(set(stored) - set(wanted))
  if extra:
    return f"{extra[0]}: in the checkpoint, not in this config"
  return ""


def _leaves(tree: Any) -> dict[str, Any]:
  """{'a.b.0.c': leaf} of the array leaves of `tree` (attribute, key and index paths alike)."""
  def name(k):
    for attr in ("name", "key", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {".".join(name(k) for k in path): leaf for path, leaf in flat if hasattr(leaf, "shape")}


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  _quiet_closed_loop_echoes()
  return ocp.CheckpointManager(
      os.path.abspath(directory), item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings, the restore target of a live tree."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_raw(directory: str, step: Optional[int] = None, *,
                select: Optional[Callable[[dict], Sequence[tuple]]] = None) -> tuple[int, dict]:
  """Restores a run's checkpoint without a target (host arrays), e.g. to read a teacher.

  `select`, given the `state` item's structure (nested dicts whose leaves are Orbax array
  metadata: shape, dtype), returns the key paths to read, e.g. [("ema", "student", "eval")];
  only those subtrees are read (an Orbax partial restore), so taking one network out of a run's
  checkpoint does not read the optimizer state and the other networks. The newest step that
  restores is used unless `step` is given (a corrupted one is skipped with a warning).
  """
  mngr = _read_only_manager(directory)
  steps = sorted(mngr.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}")
  candidates = [step] if step is not None else list(reversed(steps))
  partial = select is not None and _HAS_PARTIAL_RESTORE
  last_error = None
  for s in candidates:
    items = {"state": ocp.args.PyTreeRestore(), "meta": ocp.args.JsonRestore()}
    _expect_failed_reads(directory, s)
    try:
      structure = _structure(mngr.item_metadata(s)["state"]) if partial else None
    except Exception as e:  # noqa: BLE001 - unreadable metadata: this step is unusable
      last_error = _restore_failed(s, directory, e)
      continue
    if partial:   # outside the try: a mistake in `select` is the caller's, not a bad step
      item = _subtrees(structure, select)
      items["state"] = ocp.args.PyTreeRestore(
          item=item, partial_restore=True, restore_args=jax.tree_util.tree_map(
              lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
      if not item:   # nothing selected is there: read the meta only
        del items["state"]
    try:
      out = mngr.restore(s, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      last_error = _restore_failed(s, directory, e)
      continue
    state = out["state"] if "state" in items else {}
    if select is not None and not partial:   # an Orbax without partial restore: read it all
      state = _subtrees(state, select)
    return s, {"state": state, "meta": dict(out["meta"])}
  raise ValueError(f"no restorable checkpoint in {directory}: {last_error}")


# Orbax's partial restore (PyTreeRestore(partial_restore=True)); older releases read everything.
_HAS_PARTIAL_RESTORE = "partial_restore" in inspect.signature(ocp.args.PyTreeRestore).parameters


def _structure(metadata) -> dict:
  """The nested dicts of a PyTree item's metadata (empty containers as {})."""
  tree = getattr(metadata, "tree", metadata)

  def plain(node):
    if isinstance(node, dict):
      return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)) and not node:
      return {}
    return node
  return plain(tree)


def _subtrees(structure: dict, select) -> dict:
  """The part of `structure` under the key paths `select(structure)` returns (paths it lacks
  are left out; the caller finds them missing in the result)."""
  out: dict = {}
  for path in select(structure):
    node = structure
    for key in path:
      node = node.get(key) if isinstance(node, dict) else None
      if node is None:
        break
    if node is None or (isinstance(node, dict) and not node):
      continue
    target = out
    for key in path[:-1]:
      target = target.setdefault(key, {})
    target[path[-1]] = node
  return out
