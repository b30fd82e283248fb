"""The run directory: config.json, metrics.jsonl, TensorBoard scalars, the progress bar.

config.json holds the resolved config plus `provenance` (git commit, package versions) and
`resolved` (each network's model config and process, frozen-network references). metrics.jsonl
holds one JSON object per logged step; on resume, lines past the restored step are dropped.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

import numpy as np

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "chex",
            "numpy", "torch", "diffusers")


def git_commit() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                         timeout=5)
    commit = out.stdout.strip() if out.returncode == 0 else ""
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return commit + ("+dirty" if commit and dirty else "") if commit else "unknown"
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def package_versions() -> dict[str, str]:
  out = {"python": sys.version.split()[0]}
  for p in PACKAGES:
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def jsonable(v: Any) -> Any:
  if isinstance(v, dict):
    return {str(k): jsonable(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [jsonable(x) for x in v]
  if isinstance(v, (np.floating, np.integer)):
    return v.item()
  if isinstance(v, np.ndarray):
    return v.tolist()
  if hasattr(v, "item") and getattr(v, "shape", None) == ():
    return v.item()
  return v


def first_line(text: str, limit: int) -> str:
  """The first non-blank line of a (possibly multi-line) message, stripped, at most `limit`
  characters: what one-line reports keep of a library's long error."""
  return next((ln.strip() for ln in text.splitlines() if ln.strip()), text.strip())[:limit]


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def progress_bar(total: int, desc: str, initial: int = 0):
  """A tqdm bar on stderr (off with DISTILL_NO_PROGRESS=1 and on processes other than 0)."""
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  off = os.environ.get("DISTILL_NO_PROGRESS") == "1" or jax.process_index() != 0
  return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=off,
              file=sys.stderr)


class RunLog:
  """Writes metrics to metrics.jsonl and TensorBoard; owns the progress bar."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, is_main: bool = True):
    self.workdir = workdir
    self.is_main = is_main
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if tensorboard and is_main:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # pragma: no cover - tensorboardX is a core dependency
        self._tb = None
    self._bar = None

  def truncate_after(self, step: int) -> None:
    """Drops metrics lines with step > `step` (a resumed run re-logs them)."""
    if not (self.is_main and os.path.exists(self.metrics_path)):
      return
    with open(self.metrics_path) as f:
      lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    tmp = self.metrics_path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, self.metrics_path)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.is_main:
      return
    row = {"step": int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), step)
      self._tb.flush()

  # -- progress ------------------------------------------------------------------------
  def start_progress(self, start: int, total: int, desc: str = "train") -> None:
    if not self.is_main:
      return
    self._bar = progress_bar(total, desc, initial=start)

  def progress(self, n: int, postfix: Optional[dict] = None) -> None:
    if self._bar is None:
      return
    self._bar.update(n)
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def message(self, text: str) -> None:
    if not self.is_main:
      return
    if self._bar is not None:
      self._bar.write(text)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Throughput:
  """img/s over the last interval (wall clock between logged steps)."""

  def __init__(self):
    self.t0 = time.perf_counter()
    self.n = 0

  def add(self, examples: int) -> None:
    self.n += examples

  def rate(self) -> float:
    t = time.perf_counter()
    dt = max(t - self.t0, 1e-9)
    r = self.n / dt
    self.t0, self.n = t, 0
    return r
