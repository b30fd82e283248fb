"""The bundled digits source: layout, resampling, labels, determinism, provenance hash."""
import hashlib

import numpy as np
import pytest
from sklearn.datasets import load_digits

from distill.data import digits
from distill.data import sources


@pytest.fixture(scope="module")
def src():
  return sources.make_source({"name": "digits"}, seed=0)


@pytest.fixture(scope="module")
def raw():
  d = load_digits()
  return d.images / 8.0 - 1.0, d.target


def _bilinear_matrix(out: int, inp: int) -> np.ndarray:
  """Half-pixel-centred linear interpolation, clamped at the border, written out by hand."""
  m = np.zeros((out, inp))
  for o in range(out):
    p = min(max((o + 0.5) * inp / out - 0.5, 0.0), inp - 1.0)
    i = int(np.floor(p))
    m[o, i] += 1.0 - (p - i)
    if p > i:
      m[o, i + 1] += p - i
  return m


def test_layout_range_and_labels(src, raw):
  assert src.shape == (16, 16, 1) and src.num_classes == 10 and len(src) == 1797
  assert src.images.dtype == np.float32 and src.labels.dtype == np.int32
  assert src.images.min() == -1.0 and src.images.max() == 1.0
  np.testing.assert_array_equal(src.labels, raw[1])
  np.testing.assert_array_equal(np.bincount(src.labels), np.bincount(raw[1]))
  assert sources.default_config("digits") == {"size": 16, "method": "linear"}


def test_bilinear_upsampling_matches_explicit_formula(src, raw):
  u = _bilinear_matrix(16, 8)
  expected = np.einsum("oi,nij,pj->nop", u, raw[0], u)
  np.testing.assert_allclose(src.images[..., 0], expected, atol=1e-6)


def test_nearest_and_native_sizes(raw):
  near = sources.make_source({"name": "digits", "method": "nearest"}, 0)
  np.testing.assert_allclose(near.images[:, ::2, ::2, 0], raw[0], atol=1e-7)
  np.testing.assert_allclose(near.images[:, 1::2, 1::2, 0], raw[0], atol=1e-7)
  native = sources.make_source({"name": "digits", "size": 8}, 0)
  assert native.shape == (8, 8, 1)
  np.testing.assert_allclose(native.images[..., 0], raw[0], atol=1e-7)
  with pytest.raises(ValueError, match="data.method"):
    sources.make_source({"name": "digits", "method": "cubic"}, 0)


def test_batch_deterministic_with_replacement_and_real_rows(src):
  b = src.batch(3, 4096)
  assert b["x"].shape == (4096, 16, 16, 1) and b["x"].dtype == np.float32
  assert b["label"].shape == (4096,) and b["label"].dtype == np.int32
  again = sources.make_source({"name": "digits"}, seed=0).batch(3, 4096)
  np.testing.assert_array_equal(b["x"], again["x"])
  assert not np.array_equal(b["x"][:64], src.batch(4, 64)["x"])
  other_seed = sources.make_source({"name": "digits"}, 1)
  assert not np.array_equal(b["x"][:64], other_seed.batch(3, 64)["x"])
  flat = src.images.reshape(len(src), -1)
  lookup = {row.tobytes(): i for i, row in enumerate(flat)}
  index = np.array([lookup[row.tobytes()] for row in b["x"].reshape(4096, -1)])
  np.testing.assert_array_equal(src.labels[index], b["label"])  # each row is a real, labelled image
  assert len(np.unique(index)) < 4096  # drawn with replacement


def test_process_slices_concatenate_to_global_batch(src):
  full = src.batch(9, 120)
  for count in (2, 4, 8):
    parts = [src.batch(9, 120, process_index=p, process_count=count) for p in range(count)]
    for key in ("x", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


def test_reference_without_replacement_then_balanced(src):
  idx = src.reference_index(1797, seed=2)
  np.testing.assert_array_equal(np.sort(idx), np.arange(1797))
  np.testing.assert_array_equal(src.reference(1797, seed=2), src.images[idx])
  big = src.reference_index(2 * 1797 + 5, seed=2)
  np.testing.assert_array_equal(big[:1797], idx)
  counts = np.bincount(big, minlength=1797)
  assert set(np.unique(counts)) <= {2, 3} and counts.sum() == 2 * 1797 + 5
  assert not np.array_equal(src.reference(50, seed=2), src.reference(50, seed=3))
  assert src.reference(0, seed=0).shape == (0, 16, 16, 1)


def test_content_hash(src):
  h = src.content_hash()
  expected = hashlib.sha256(src.images.tobytes() + src.labels.tobytes()).hexdigest()
  assert h == expected and len(h) == 64
  assert sources.make_source({"name": "digits"}, seed=5).content_hash() == h
  assert sources.make_source({"name": "digits", "size": 8}, 0).content_hash() != h
  assert digits.load(16)[0] is src.images  # loaded once, cached, read-only
  with pytest.raises(ValueError):
    src.images[0, 0, 0, 0] = 0.0


def test_floor_reference_is_disjoint_from_reference(src, caplog):
  """The fd data floor compares two real halves with no image in common (while 2n <= 1797);
  beyond, a warning line says the floor is optimistic."""
  n = 898
  ref = src.reference_index(n, seed=3)
  other = src.reference_index(2 * n, seed=3)[n:]
  assert not set(ref.tolist()) & set(other.tolist())
  np.testing.assert_array_equal(src.floor_reference(n, 3), src.images[other])
  np.testing.assert_array_equal(src.reference(n, 3), src.images[ref])
  assert "optimistic" not in caplog.text
  # Beyond half the set no disjoint half exists: an independent second permutation instead.
  big = src.floor_reference(1000, 3)
  assert big.shape == (1000, 16, 16, 1)
  assert not np.array_equal(big, src.reference(1000, 3))
  assert "floor of 1000 samples" in caplog.text and "optimistic" in caplog.text
