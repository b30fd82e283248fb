"""The FID Inception-v3 (the TF "2015-12-05" graph of the original FID code) in Flax, NHWC.

This is the network of pytorch-fid's `fid_inception_v3()`, i.e. torchvision's Inception3 with
the FID blocks that reproduce the TensorFlow graph:

    Mixed_5b/5c/5d   InceptionA, pool branch = 3x3 avg-pool, stride 1, pad 1, and the average
                     over *valid* pixels only (count_include_pad=False, as TF's avg_pool)
    Mixed_6a         InceptionB (3x3/2 conv, double 3x3 conv, 3x3/2 max-pool)
    Mixed_6b..6e     InceptionC (factorised 1x7 / 7x1 convs), avg-pool as above
    Mixed_7a         InceptionD
    Mixed_7b         InceptionE, avg-pool as above ("E_1")
    Mixed_7c         InceptionE, pool branch = 3x3 *max*-pool, stride 1, pad 1 ("E_2"; the TF
                     graph has a max-pool here, torchvision an avg-pool)

Every conv is conv (no bias) -> BatchNorm (eps 1e-3, inference mode: the stored running mean
and variance, applied as x * s + (b - mean * s) with s = w / sqrt(var + eps)) -> ReLU.

Input: images (N, H, W, 3) in [-1, 1] (the project's convention; pytorch-fid maps [0, 1] to
[-1, 1] the same way). With `resize=True` (the default) they are resized to 299x299 with
`resize_bilinear`, which is exactly torch's `F.interpolate(mode="bilinear",
align_corners=False)` without antialiasing, as pytorch-fid does (an explicit interpolation
matrix per axis). `resize=False` feeds the images as they are; the architecture accepts any
side >= 75 (used by the tests to keep them small).

Outputs of `__call__` (a dict; XLA drops what the caller does not use):

    "pool"     (N, 2048)  the global average pool of Mixed_7c ("pool_3"): the FID features
    "spatial"  (N, S*S*7) the first 7 channels of `mixed_6/conv` (the ReLU output of
               Mixed_6d.branch1x1; 17x17 at 299x299) flattened in (h, w, c) order: the sFID
               features of the ADM evaluation suite (2023-d)
    "logits"   (N, 1008)  pool @ fc.weight.T. The classic Inception Score code (improved-GAN,
               ADM's evaluator) multiplies pool_3 by the weight of `softmax/logits/MatMul`
               without the bias, so the bias is left out unless `logits_bias=True`.

Weights: `load(path)` converts the state dict of pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth` (keys `Conv2d_1a_3x3.conv.weight`,
`Mixed_5b.branch1x1.bn.running_mean`, ..., `fc.weight`, `fc.bias`) strictly: one ValueError
lists every missing, unexpected or mis-shaped key and names the file. `num_batches_tracked`
buffers are ignored (they do not affect inference). No network access: the caller gives the
path (a .pth, or the same keys as .safetensors/.npz; see `distill.metrics.weights`).
"""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill.metrics import weights as weights_lib

SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
MIN_SIZE = 75

IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


# ----------------------------------------------------------------------------------------------
# Resizing exactly like torch's F.interpolate(bilinear, align_corners=False, antialias=False).

@functools.lru_cache(maxsize=64)
def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix of 1-D linear interpolation with half-pixel centres.

  Output pixel i samples the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped below at 0;
  with i0 = floor(src), l = src - i0 it takes (1 - l) x[i0] + l x[min(i0 + 1, n_in - 1)]
  (torch's `area_pixel_compute_source_index` and upsample_bilinear2d; no antialiasing, also
  when shrinking).
  """
  # torch computes the source index in float32 for float images, as one fused multiply-add
  # (exact product, one rounding): emulated by the float64 product of float32 numbers.
  f32 = np.float32
  scale = np.float64(f32(n_in) / f32(n_out))
  src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  lam = (src - i0.astype(f32)).astype(f32)
  i1 = np.minimum(i0 + 1, n_in - 1)
  m = np.zeros((n_out, n_in), f32)
  rows = np.arange(n_out)
  np.add.at(m, (rows, i0), f32(1) - lam)
  np.add.at(m, (rows, i1), lam)
  return m


def resize_bilinear(x: jax.Array, size: IntPair, precision: Any = "highest") -> jax.Array:
  """Images (N, H, W, C) -> (N, h, w, C), bilinear as torch (see `linear_resize_matrix`)."""
  h, w = _pair(size)
  if x.shape[1:3] == (h, w):
    return x
  mh = jnp.asarray(linear_resize_matrix(x.shape[1], h))
  mw = jnp.asarray(linear_resize_matrix(x.shape[2], w))
  x = jnp.einsum("oh,nhwc->nowc", mh, x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", mw, x, precision=precision)


# ----------------------------------------------------------------------------------------------
# Layers.

class BatchNormInference(nn.Module):
  """BatchNorm with stored statistics: x * s + (bias - running_mean * s),
  s = weight / sqrt(running_var + eps). Parameter names are torch's."""
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    weight = self.param("weight", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean = self.param("running_mean", nn.initializers.zeros, (c,))
    var = self.param("running_var", nn.initializers.ones, (c,))
    s = weight * jax.lax.rsqrt(var + self.eps)
    return x * s + (bias - mean * s)


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (eps 1e-3, inference) -> ReLU; torch padding semantics."""
  features: int
  kernel: IntPair
  stride: IntPair = 1
  padding: IntPair = 0
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), _pair(self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    return nn.relu(BatchNormInference(name="bn")(x))


def _max_pool(x, stride: int, padding: int = 0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


def _avg_pool_valid(x):
  """3x3 average, stride 1, pad 1, over valid pixels only (TF's avg_pool)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class _Block(nn.Module):
  precision: Any = "highest"

  def conv(self, name, features, kernel, stride=1, padding=0):
    return BasicConv2d(features, kernel, stride, padding, self.precision, name=name)


class InceptionA(_Block):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | valid avg-pool-1x1."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64, 1)(x)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(self.conv("branch5x5_1", 48, 1)(x))
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_valid(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (grid reduction): 3x3/2 | 1x1-3x3-3x3/2 | 3x3/2 max-pool."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x)
    d = self.conv("branch3x3dbl_1", 64, 1)(x)
    d = self.conv("branch3x3dbl_2", 96, 3, padding=1)(d)
    d = self.conv("branch3x3dbl_3", 96, 3, stride=2)(d)
    return jnp.concatenate([b3, d, _max_pool(x, 2)], axis=-1)


class InceptionC(_Block):
  """Mixed_6b..6e: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | valid avg-pool-1x1.
  Returns (output, branch1x1 output) — the latter of Mixed_6d is TF's `mixed_6/conv`."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x)
    b7 = self.conv("branch7x7_1", c7, 1)(x)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
    d = self.conv("branch7x7dbl_1", c7, 1)(x)
    d = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(d)
    d = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(d)
    d = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(d)
    d = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(d)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_valid(x))
    return jnp.concatenate([b1, b7, d, bp], axis=-1), b1


class InceptionD(_Block):
  """Mixed_7a (grid reduction): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | 3x3/2 max-pool."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(self.conv("branch3x3_1", 192, 1)(x))
    b7 = self.conv("branch7x7x3_1", 192, 1)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(_Block):
  """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1, where the pool is the
  valid 3x3 average ("avg", FIDInceptionE_1) or a 3x3 max, stride 1, pad 1 ("max", E_2)."""
  pool: str = "avg"

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320, 1)(x)
    b3 = self.conv("branch3x3_1", 384, 1)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], -1)
    d = self.conv("branch3x3dbl_1", 448, 1)(x)
    d = self.conv("branch3x3dbl_2", 384, 3, padding=1)(d)
    d = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(d),
                         self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(d)], -1)
    if self.pool == "avg":
      p = _avg_pool_valid(x)
    elif self.pool == "max":
      p = _max_pool(x, 1, padding=1)
    else:
      raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
    bp = self.conv("branch_pool", 192, 1)(p)
    return jnp.concatenate([b1, b3, d, bp], axis=-1)


class Logits(nn.Module):
  """pool @ kernel (+ bias when `use_bias`); the parameters are torch's fc.weight.T / fc.bias."""
  num_classes: int = NUM_CLASSES
  use_bias: bool = False
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    y = jnp.dot(x, kernel, precision=self.precision)
    return y + bias if self.use_bias else y


class FIDInceptionV3(nn.Module):
  """`{"pool", "spatial", "logits"}` of images (N, H, W, 3) in [-1, 1] (module docstring)."""
  resize: bool = True
  logits_bias: bool = False
  num_classes: int = NUM_CLASSES
  precision: Any = "highest"

  @nn.compact
  def __call__(self, images) -> dict[str, jax.Array]:
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"Inception takes (N, H, W, 3) images in [-1, 1], got shape {x.shape}")
    if self.resize:
      x = resize_bilinear(x, SIZE, self.precision)
    elif min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"Inception needs images of at least {MIN_SIZE}x{MIN_SIZE} without "
                       f"resizing, got {x.shape[1:3]}")
    p = self.precision
    conv = functools.partial(BasicConv2d, precision=p)
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool(x, 2)
    x = InceptionA(p, pool_features=32, name="Mixed_5b")(x)
    x = InceptionA(p, pool_features=64, name="Mixed_5c")(x)
    x = InceptionA(p, pool_features=64, name="Mixed_5d")(x)
    x = InceptionB(p, name="Mixed_6a")(x)
    x, _ = InceptionC(p, channels_7x7=128, name="Mixed_6b")(x)
    x, _ = InceptionC(p, channels_7x7=160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(p, channels_7x7=160, name="Mixed_6d")(x)
    x, _ = InceptionC(p, channels_7x7=192, name="Mixed_6e")(x)
    x = InceptionD(p, name="Mixed_7a")(x)
    x = InceptionE(p, pool="avg", name="Mixed_7b")(x)
    x = InceptionE(p, pool="max", name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    logits = Logits(self.num_classes, self.logits_bias, p, name="fc")(pool)
    return {"pool": pool, "spatial": spatial, "logits": logits}


# ----------------------------------------------------------------------------------------------
# Weights.

def param_shapes(module: Optional[FIDInceptionV3] = None) -> dict[tuple, tuple]:
  """{param path: shape} of the network (an abstract init; nothing is computed). The shapes
  depend only on the class count, so they are traced once per count (a few seconds)."""
  num_classes = NUM_CLASSES if module is None else module.num_classes
  return dict(_param_shapes(num_classes))


@functools.lru_cache(maxsize=4)
def _param_shapes(num_classes: int) -> dict[tuple, tuple]:
  module = FIDInceptionV3(resize=False, num_classes=num_classes)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32))
  return weights_lib.shapes_of(abstract["params"])


def _ignored(key: str) -> bool:
  return key.endswith(".num_batches_tracked")


def params_from_state_dict(state_dict, what: str = "FID Inception state dict") -> dict:
  """pytorch-fid's FID Inception state dict -> `{"params": ...}` (float32 numpy), strictly."""
  shapes = param_shapes(FIDInceptionV3(resize=False, num_classes=_num_classes(state_dict)))
  return {"params": weights_lib.params_from_state_dict(state_dict, shapes, what=what,
                                                       ignore=_ignored)}


def _num_classes(state_dict) -> int:
  """fc rows of the file (1008 in the FID weights); NUM_CLASSES when absent (reported later)."""
  w = state_dict.get("fc.weight")
  return int(w.shape[0]) if w is not None and len(w.shape) == 2 else NUM_CLASSES


def load(path: str, *, resize: bool = True, logits_bias: bool = False,
         precision: Any = "highest") -> tuple[FIDInceptionV3, dict]:
  """`(module, variables)` from a weights file the user gives (no download, strict)."""
  state_dict = weights_lib.load_state_dict(path)
  variables = params_from_state_dict(state_dict, what=f"{path} (FID Inception weights)")
  module = FIDInceptionV3(resize=resize, logits_bias=logits_bias,
                          num_classes=_num_classes(state_dict), precision=precision)
  return module, variables
