"""Data-parallel feature extraction for evaluation, with float64 moments accumulated on the host.

    ex = FeatureExtractor(fn, params, batch_size=256)    # fn(params, batch) -> {name: (B, ...)}
    feats = ex.run(batches, moments=("pool", "spatial"), keep=("pool", "logits"))
    mu, sigma = feats.stats("pool"); pool = feats.arrays["pool"]

Sharding: one 1-D mesh `("data",)` over the local devices (`jax.local_devices()`, or the
`devices` given). `fn` is jitted with the parameters replicated and the batch (and every output)
split along its leading axis: `in_shardings=(P(), P("data"))`, `out_shardings=P("data")`. Each
batch is padded to the one compiled size (`batch_size`, rounded up to a multiple of the device
count) so nothing recompiles, and the padding rows are dropped from the outputs. A batch is an
array or a pytree of arrays with a common leading axis (e.g. `(images, token_ids)`); `run` takes
one array, tuple or dict of arrays (cut into batches) or any other iterable of batches (a list
or a generator). The next batch is dispatched before
the previous one's outputs are pulled to the host, so host accumulation overlaps device work.
In a multi-process run every process extracts the features of its own images; `Moments.merge`
combines the sums afterwards.

Accumulation, chosen per output name:
  * `moments`: mean and covariance from float64 running sums, never holding the features: with a
    fixed shift c (the first batch's mean), n, s1 = sum (x - c) and S2 = sum (x - c)(x - c)^T;
    mu = c + s1 / n and sigma = (S2 - s1 s1^T / n) / (n - 1) (unbiased, as `frechet.stats`).
    The shift keeps the cancellation in S2 - s1 s1^T / n small when features have a large mean.
    Cost per batch: one float64 (B, D)^T (B, D) product on the host (D = 2048: 2 GFLOP per 256).
  * `keep`: the features themselves, concatenated on the host in float32 (precision/recall and
    the Inception Score need them; 50k x 2048 float32 is 400 MB, which is fine).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np


class Moments:
  """Running float64 sums for the mean and (unbiased) covariance of (n, D) features."""

  def __init__(self):
    self.n = 0
    self.shift: Optional[np.ndarray] = None
    self.s1: Optional[np.ndarray] = None
    self.s2: Optional[np.ndarray] = None

  def update(self, x) -> "Moments":
    x = np.asarray(x, np.float64)
    x = x.reshape(len(x), -1)
    if not len(x):
      return self
    if self.shift is None:
      self.shift = x.mean(axis=0)
      self.s1 = np.zeros_like(self.shift)
      self.s2 = np.zeros((len(self.shift),) * 2)
    if x.shape[1] != len(self.shift):
      raise ValueError(f"feature dimension changed: {x.shape[1]} vs {len(self.shift)}")
    y = x - self.shift
    self.n += len(y)
    self.s1 += y.sum(axis=0)
    self.s2 += y.T @ y
    return self

  def merge(self, other: "Moments") -> "Moments":
    """Adds `other`'s samples (re-centred on this shift: y' = y + (c_o - c))."""
    if other.n == 0:
      return self
    if self.shift is None:
      self.n, self.shift, self.s1, self.s2 = other.n, other.shift.copy(), other.s1.copy(), \
          other.s2.copy()
      return self
    d = other.shift - self.shift
    self.s2 += (other.s2 + np.outer(d, other.s1) + np.outer(other.s1, d)
                + other.n * np.outer(d, d))
    self.s1 += other.s1 + other.n * d
    self.n += other.n
    return self

  def stats(self) -> tuple[np.ndarray, np.ndarray]:
    """`(mu (D,), sigma (D, D))`, float64, sigma unbiased (divides by n - 1)."""
    if self.n < 2:
      raise ValueError(f"moments need at least 2 samples, got {self.n}")
    m = self.s1 / self.n
    sigma = (self.s2 - self.n * np.outer(m, m)) / (self.n - 1)
    return self.shift + m, (sigma + sigma.T) / 2


@dataclasses.dataclass
class Features:
  """What `FeatureExtractor.run` returns: the sample count, moments and kept arrays by name."""
  num_samples: int
  moments: dict[str, Moments]
  arrays: dict[str, np.ndarray]

  def stats(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`(mu, sigma)` of output `name`, from its moments (or from its kept array)."""
    if name in self.moments:
      return self.moments[name].stats()
    if name in self.arrays:
      return Moments().update(self.arrays[name]).stats()
    raise KeyError(f"no statistics for {name!r}; accumulated: {sorted(self.moments)}, kept: "
                   f"{sorted(self.arrays)}")


Batch = Any  # an array or a pytree of arrays with a common leading axis


def _leading(batch: Batch) -> int:
  sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(batch)}
  if len(sizes) != 1:
    raise ValueError(f"a batch's arrays need one common leading size, got {sorted(sizes)}")
  return sizes.pop()


def batches_of(data: Batch, batch_size: int) -> Iterable[Batch]:
  """Cuts an array (or pytree of arrays) into consecutive batches of `batch_size` rows."""
  n = _leading(data)
  for i in range(0, n, batch_size):
    yield jax.tree_util.tree_map(lambda a, i=i: a[i:i + batch_size], data)


class FeatureExtractor:
  """`fn(params, batch) -> {name: (B, ...)}` run data-parallel over a 1-D device mesh."""

  def __init__(self, fn: Callable[[Any, Batch], dict], params: Any, *, batch_size: int = 256,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices) if devices is not None else jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("data",))
    self.num_devices = len(devices)
    self.batch_size = int(math.ceil(max(1, batch_size) / self.num_devices) * self.num_devices)
    replicated = NamedSharding(self.mesh, P())
    self.data_sharding = NamedSharding(self.mesh, P("data"))
    self.params = jax.device_put(params, replicated)
    self._fn = jax.jit(fn, in_shardings=(replicated, self.data_sharding),
                       out_shardings=self.data_sharding)

  def _pad(self, batch: Batch) -> Batch:
    def pad(a):
      a = np.asarray(a)
      extra = self.batch_size - a.shape[0]
      return a if extra == 0 else np.concatenate([a, np.zeros((extra,) + a.shape[1:], a.dtype)])
    return jax.tree_util.tree_map(pad, batch)

  def _chunks(self, batches: Union[Batch, Iterable[Batch]]) -> Iterable[Batch]:
    if isinstance(batches, (np.ndarray, jax.Array, tuple, dict)):  # one array / pytree
      batches = [batches]
    for batch in batches:
      yield from batches_of(batch, self.batch_size)

  def dispatch(self, batch: Batch) -> tuple[dict, int]:
    """Starts `fn` on one batch of at most `batch_size` rows: `(device outputs, rows)`."""
    n = _leading(batch)
    if n > self.batch_size:
      raise ValueError(f"batch of {n} rows is larger than batch_size {self.batch_size}")
    return self._fn(self.params, self._pad(batch)), n

  def __call__(self, data: Batch) -> dict[str, np.ndarray]:
    """All outputs of `fn` for `data` (any number of rows), as host numpy arrays."""
    parts: dict[str, list] = {}
    for out in self._outputs(self._chunks(data)):
      for k, v in out.items():
        parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}

  def _outputs(self, chunks: Iterable[Batch]) -> Iterable[dict[str, np.ndarray]]:
    """Host outputs batch by batch, the next batch dispatched before the previous is fetched."""
    pending = None
    for chunk in chunks:
      nxt = self.dispatch(chunk)
      if pending is not None:
        yield self._fetch(*pending)
      pending = nxt
    if pending is not None:
      yield self._fetch(*pending)

  @staticmethod
  def _fetch(out: dict, n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in jax.device_get(out).items()}

  def run(self, batches: Union[Batch, Iterable[Batch]], *, moments: Sequence[str] = (),
          keep: Sequence[str] = ()) -> Features:
    """Feeds every batch through `fn`; accumulates `moments` and keeps `keep` (module doc)."""
    acc = {name: Moments() for name in moments}
    kept: dict[str, list] = {name: [] for name in keep}
    n = 0
    for out in self._outputs(self._chunks(batches)):
      missing = sorted((set(acc) | set(kept)) - set(out))
      if missing:
        raise KeyError(f"feature function has no outputs {missing}; it returns {sorted(out)}")
      for name, m in acc.items():
        m.update(out[name])
      for name, parts in kept.items():
        parts.append(out[name].reshape(len(out[name]), -1).astype(np.float32))
      n += len(next(iter(out.values())))
    arrays = {k: (np.concatenate(v) if v else np.zeros((0, 0), np.float32))
              for k, v in kept.items()}
    return Features(n, acc, arrays)
