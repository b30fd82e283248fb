"""PNG output: image grids for image data, scatter panels for 2-D toy data (no matplotlib)."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image, ImageDraw


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, cols: int = 0, pad: int = 1, upscale: int = 1) -> Image.Image:
  """(N, H, W, C) in [-1, 1] -> one grid image."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, im in enumerate(images):
    r, q = divmod(i, cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = im
  img = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if upscale > 1:
    img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
  return img


def scatter(points: np.ndarray, size: int = 256, lim: float = 0.0) -> Image.Image:
  """2-D points -> a white square with dark dots (axes fixed by `lim` or the data)."""
  pts = np.asarray(points, np.float64)[:, :2]
  lim = lim or float(np.percentile(np.abs(pts), 99.5)) * 1.1 or 1.0
  img = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(img)
  uv = (pts / lim * 0.5 + 0.5) * (size - 1)
  for u, v in uv:
    if 0 <= u < size and 0 <= v < size:
      draw.point((float(u), float(size - 1 - v)), fill=(20, 40, 160))
  return img


def save_panels(path: str, panels: list[tuple[str, np.ndarray]], size: int = 320) -> None:
  """Side-by-side titled panels (scatter plots for 2-D data, grids for images)."""
  tiles = []
  lim = 0.0
  if panels and np.asarray(panels[0][1]).ndim == 2:
    lim = float(np.percentile(np.abs(np.asarray(panels[0][1])), 99.5)) * 1.2
  for title, x in panels:
    x = np.asarray(x)
    tile = scatter(x, size, lim) if x.ndim == 2 else image_grid(x, upscale=max(1, size // (
        int(math.ceil(math.sqrt(len(x)))) * (x.shape[1] + 1))))
    canvas = Image.new("RGB", (tile.width, tile.height + 16), "white")
    canvas.paste(tile.convert("RGB"), (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), title, fill=(0, 0, 0))
    tiles.append(canvas)
  width = sum(t.width for t in tiles) + 4 * (len(tiles) - 1)
  height = max(t.height for t in tiles)
  out = Image.new("RGB", (width, height), "white")
  x = 0
  for t in tiles:
    out.paste(t, (x, 0))
    x += t.width + 4
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  out.save(path)
