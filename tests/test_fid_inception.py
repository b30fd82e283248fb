"""FID Inception-v3: parity with a PyTorch reference of pytorch-fid's FID Inception, strict
weight conversion, and the bilinear resize against torch's F.interpolate.

torchvision is not installed, so the reference network is written below (BasicConv2d and the
Inception A-E blocks with the FID changes: valid-pixel average pools in A/C/E_1, a max-pool in
E_2), with the module and parameter names of torchvision / pytorch-fid, so its state dict has
the layout of `pt_inception-2015-12-05-6726825d.pth`. Every parameter and BatchNorm statistic
is random (conv weights He-scaled, BN weight 1 + N(0, 0.1^2), bias / mean N(0, 0.1^2), var
U(0.5, 1.5)), so a mis-mapped tensor cannot hide.

Runs on CPU in float32 with jax_default_matmul_precision="highest" (tests/conftest.py), on
75x75 inputs (the smallest the architecture accepts) with the resize disabled; the resize is
tested alone. Tolerances (relative to the reference's largest magnitude):
  * pool features, spatial features, logits: 1e-5. Both sides compute in float32 but sum the
    convolutions in different orders (oneDNN vs XLA); ~1e-7 per op grows through 48 conv/BN
    layers. Measured max: 9.5e-7 (spatial), 9.4e-7 (pool), 8.7e-7 (logits).
  * bilinear resize: 1e-6 absolute on values in [-1, 1]. The interpolation matrices equal
    torch's weights bit for bit (float32 fused multiply-add source index); only the order of
    the two float32 weighted sums differs.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from distill.metrics import inception  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5


# --------------------------------------------------------------------------------------------
# The PyTorch reference (pytorch-fid's FID Inception, written out).

class BasicConv2d(nn.Module):
  def __init__(self, cin, cout, **kw):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):
  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(pool)], 1)


class InceptionB(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)
    self.last_branch1x1 = None

  def forward(self, x):
    b1 = self.branch1x1(x)
    self.last_branch1x1 = b1
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = x
    for i in range(1, 6):
      d = getattr(self, f"branch7x7dbl_{i}")(d)
    pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.cat([b1, b7, d, self.branch_pool(pool)], 1)


class InceptionD(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b7 = x
    for i in range(1, 5):
      b7 = getattr(self, f"branch7x7x3_{i}")(b7)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)],
                     1)


class InceptionE(nn.Module):
  def __init__(self, cin, pool):
    super().__init__()
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
    if self.pool == "avg":  # FIDInceptionE_1
      p = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    else:  # FIDInceptionE_2
      p = F.max_pool2d(x, 3, stride=1, padding=1)
    return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(p)], 1)


class FIDInception(nn.Module):
  """pytorch-fid's fid_inception_v3(): returns (pool, logits without bias, mixed_6/conv)."""

  def __init__(self, num_classes=1008):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, "avg")
    self.Mixed_7c = InceptionE(2048, "max")
    self.fc = nn.Linear(2048, num_classes)

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return pool, F.linear(pool, self.fc.weight), self.Mixed_6d.last_branch1x1


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
  gen = torch.Generator().manual_seed(seed)

  def normal(shape, std):
    return std * torch.randn(shape, generator=gen)

  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(normal(m.weight.shape, (2.0 / fan_in) ** 0.5))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(1.0 + normal(m.weight.shape, 0.1))
        m.bias.copy_(normal(m.bias.shape, 0.1))
        m.running_mean.copy_(normal(m.running_mean.shape, 0.1))
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(normal(m.weight.shape, 2048 ** -0.5))
        m.bias.copy_(normal(m.bias.shape, 0.1))
  return model.eval()


@functools.lru_cache(maxsize=None)
def _setup():
  torch.set_num_threads(2)
  model = _randomise(FIDInception())
  return model, inception.params_from_state_dict(model.state_dict())


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


# --------------------------------------------------------------------------------------------
# Tests.

def test_features_match_torch_reference():
  model, variables = _setup()
  x = np.random.default_rng(0).uniform(-1, 1, (2, 75, 75, 3)).astype(np.float32)
  with torch.no_grad():
    pool, logits, b1 = model(_nchw(x))
  spatial = b1[:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy()
  module = inception.FIDInceptionV3(resize=False)
  out = jax.jit(module.apply)(variables, x)
  assert out["pool"].shape == (2, 2048) and out["logits"].shape == (2, 1008)
  assert out["spatial"].shape == (2, 3 * 3 * 7)  # 17 * 17 * 7 = 2023 at 299x299
  for name, ref in (("pool", pool.numpy()), ("logits", logits.numpy()), ("spatial", spatial)):
    assert np.std(ref) > 1e-3 * np.max(np.abs(ref)), f"{name}: degenerate reference"
    err = _rel_err(out[name], ref)
    assert err < TOL, f"{name}: relative error {err:.2e}"
  # The biased logits (torch's fc) on request (the head alone: no second network compile).
  head = inception.Logits(use_bias=True)
  biased = head.apply({"params": variables["params"]["fc"]}, out["pool"])
  with torch.no_grad():
    ref = model.fc(pool).numpy()
  assert _rel_err(biased, ref) < TOL


@pytest.mark.parametrize("src,dst", [((7, 5), (299, 299)), ((40, 33), (13, 29))])
def test_resize_matches_torch_interpolate(src, dst):
  x = np.random.default_rng(1).uniform(-1, 1, (2, *src, 3)).astype(np.float32)
  ref = F.interpolate(_nchw(x), size=dst, mode="bilinear", align_corners=False)
  ours = jax.jit(lambda a: inception.resize_bilinear(a, dst))(x)
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_load_from_file_and_strict_errors(tmp_path):
  model, variables = _setup()
  sd = model.state_dict()
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch.save(sd, path)
  module, loaded = inception.load(str(path))
  assert module.resize and module.num_classes == 1008
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
  # Missing, unexpected and mis-shaped keys are all reported at once, naming the file.
  bad = dict(sd)
  del bad["Mixed_6d.branch1x1.conv.weight"]
  bad["AuxLogits.fc.weight"] = torch.zeros(3)
  bad["Mixed_7c.branch_pool.bn.running_var"] = torch.ones(7)
  path = tmp_path / "bad.pth"
  torch.save(bad, path)
  with pytest.raises(ValueError) as e:
    inception.load(str(path))
  msg = str(e.value)
  assert str(path) in msg and "Mixed_6d.branch1x1.conv.weight" in msg
  assert "AuxLogits.fc.weight" in msg and "Mixed_7c.branch_pool.bn.running_var" in msg
  with pytest.raises(FileNotFoundError, match="never"):
    inception.load(str(tmp_path / "absent.pth"))
