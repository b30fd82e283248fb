"""2-D toy distributions for measurable distillation: gmm, checkerboard, moons, spiral.

All sampling is pure numpy (float64, cast to float32 at the end). Every dataset is scaled so
that its samples lie roughly within [-3, 3] with per-coordinate std of order one:

| name         | keys (defaults)                                           | label / classes |
|--------------|-----------------------------------------------------------|-----------------|
| gmm          | modes=8, radius=2.0, std=0.2, normalize=False             | mode / `modes`  |
| checkerboard | cells=4, half_width=2.0, normalize=False                  | none / 0        |
| moons        | noise=0.1, normalize=False                                | moon / 2        |
| spiral       | arms=2, turns=1.5, radius=3.0, noise=0.1, normalize=False | arm / `arms`    |

- gmm: `modes` equally weighted isotropic Gaussians of std `std`, centred at angle
  `2 pi k / modes` on a circle of radius `radius` (mode 0 on the +x axis).
- checkerboard: uniform on the "black" squares (`(i + j)` even, `i` the column and `j` the row
  counted from the lower left) of a `cells x cells` board covering `[-half_width, half_width]^2`.
- moons: scikit-learn's two interleaving half circles (angle uniform in [0, pi]) centred on the
  origin and scaled by 2, so x spans [-3, 3] and y spans [-1.5, 1.5], plus N(0, noise^2) noise.
- spiral: `arms` interleaved Archimedean arms of `turns` turns reaching `radius`; the position
  along an arm is `sqrt(U)`, which makes points roughly uniform in arc length; N(0, noise^2).

`normalize=True` subtracts the mean and divides by the scalar std (over both coordinates) of
65,536 samples drawn once from a fixed internal seed, giving zero mean and unit rms coordinates;
batches and reference samples are transformed identically.
"""
from __future__ import annotations

import numpy as np

from distill.data.sources import Source, register_dataset

_NORMALIZE_SAMPLES = 1 << 16
_NORMALIZE_SEED = 20240917


class ToySource(Source):
  """A 2-D source: subclasses implement `sample(rng, n) -> (points (n, 2) f64, labels or None)`."""

  def __init__(self, seed: int, normalize: bool):
    super().__init__(seed)
    self.shape = (2,)
    self.normalize = normalize
    self.offset = np.zeros(2)
    self.scale = 1.0
    if normalize:
      points, _ = self.sample(np.random.default_rng(_NORMALIZE_SEED), _NORMALIZE_SAMPLES)
      self.offset = points.mean(axis=0)
      self.scale = float((points - self.offset).std())

  def sample(self, rng: np.random.Generator, n: int):
    raise NotImplementedError

  def draw(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    points, labels = self.sample(rng, n)
    out = {"x": ((points - self.offset) / self.scale).astype(np.float32)}
    if self.num_classes:
      out["label"] = labels.astype(np.int32)
    return out


def _require(ok: bool, key: str, value, what: str):
  """Raises one line naming `data.<key>` unless `ok`."""
  if not ok:
    raise ValueError(f"data.{key} must be {what}, got {value!r}")


@register_dataset("gmm")
class GMM(ToySource):
  """Equal-weight Gaussian modes on a circle; the mode index is the class label."""

  DEFAULTS = {"modes": 8, "radius": 2.0, "std": 0.2, "normalize": False}

  def __init__(self, seed: int, modes: int, radius: float, std: float, normalize: bool):
    _require(modes >= 1, "modes", modes, ">= 1")
    _require(std >= 0, "std", std, ">= 0")
    self.modes, self.radius, self.std = modes, radius, std
    self.num_classes = modes
    super().__init__(seed, normalize)

  def centers(self) -> np.ndarray:
    """The mode centres, (modes, 2), in the source's output coordinates."""
    return (mode_centers(self.modes, self.radius) - self.offset) / self.scale

  def sample(self, rng, n):
    labels = rng.integers(0, self.modes, size=n)
    noise = rng.standard_normal((n, 2))
    return mode_centers(self.modes, self.radius)[labels] + self.std * noise, labels


def mode_centers(modes: int, radius: float) -> np.ndarray:
  """Centres of `modes` points evenly on a circle of `radius`, the first on the +x axis."""
  angle = 2.0 * np.pi * np.arange(modes) / modes
  return radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1)


@register_dataset("checkerboard")
class Checkerboard(ToySource):
  """Uniform on the black squares of a checkerboard; unlabelled."""

  DEFAULTS = {"cells": 4, "half_width": 2.0, "normalize": False}

  def __init__(self, seed: int, cells: int, half_width: float, normalize: bool):
    _require(cells >= 2, "cells", cells, ">= 2")
    _require(half_width > 0, "half_width", half_width, "> 0")
    self.cells, self.half_width = cells, half_width
    i, j = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
    black = (i + j) % 2 == 0
    self.black_cells = np.stack([i[black], j[black]], axis=-1)  # (num_black, 2): (col, row)
    self.num_classes = 0
    super().__init__(seed, normalize)

  def sample(self, rng, n):
    cell = self.black_cells[rng.integers(0, len(self.black_cells), size=n)]
    width = 2.0 * self.half_width / self.cells
    return (cell + rng.random((n, 2))) * width - self.half_width, None


@register_dataset("moons")
class Moons(ToySource):
  """Two interleaving half circles; the moon (0 = upper, 1 = lower) is the class label."""

  DEFAULTS = {"noise": 0.1, "normalize": False}

  def __init__(self, seed: int, noise: float, normalize: bool):
    _require(noise >= 0, "noise", noise, ">= 0")
    self.noise = noise
    self.num_classes = 2
    super().__init__(seed, normalize)

  def sample(self, rng, n):
    labels = rng.integers(0, 2, size=n)
    theta = np.pi * rng.random(n)
    upper = np.stack([np.cos(theta), np.sin(theta)], axis=-1)
    lower = np.stack([1.0 - np.cos(theta), 0.5 - np.sin(theta)], axis=-1)
    points = np.where(labels[:, None] == 0, upper, lower)
    points = 2.0 * (points - np.array([0.5, 0.25]))
    return points + self.noise * rng.standard_normal((n, 2)), labels


@register_dataset("spiral")
class Spiral(ToySource):
  """Interleaved Archimedean spiral arms; the arm index is the class label."""

  DEFAULTS = {"arms": 2, "turns": 1.5, "radius": 3.0, "noise": 0.1, "normalize": False}

  def __init__(self, seed: int, arms: int, turns: float, radius: float, noise: float,
               normalize: bool):
    _require(arms >= 1, "arms", arms, ">= 1")
    _require(turns > 0, "turns", turns, "> 0")
    _require(radius > 0, "radius", radius, "> 0")
    _require(noise >= 0, "noise", noise, ">= 0")
    self.arms, self.turns, self.radius, self.noise = arms, turns, radius, noise
    self.num_classes = arms
    super().__init__(seed, normalize)

  def sample(self, rng, n):
    labels = rng.integers(0, self.arms, size=n)
    s = np.sqrt(rng.random(n))  # position along the arm, ~uniform in arc length
    angle = 2.0 * np.pi * (self.turns * s + labels / self.arms)
    points = (self.radius * s)[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=-1)
    return points + self.noise * rng.standard_normal((n, 2)), labels
