"""Toy 2-D sources and the data registry: determinism, process slicing, geometry, validation."""
import ml_collections
import numpy as np
import pytest

from distill.data import sources
from distill.data import toy

TOY = ("gmm", "checkerboard", "moons", "spiral")


def _src(name, seed=0, **kw):
  return sources.make_source(dict(name=name, **kw), seed)


def test_registry_and_default_configs():
  for name in TOY + ("digits",):
    assert name in sources.DATASETS
  assert sources.default_config("gmm") == {"modes": 8, "radius": 2.0, "std": 0.2,
                                           "normalize": False}
  cfg = sources.default_config("spiral")
  cfg["arms"] = 99  # a fresh copy: the registered defaults are untouched
  assert sources.default_config("spiral")["arms"] == 2
  with pytest.raises(KeyError, match="unknown dataset 'nope'"):
    sources.default_config("nope")


def test_make_source_accepts_config_dict_and_validates_keys():
  cfg = ml_collections.ConfigDict({"name": "gmm", "modes": 5, "radius": 3})
  src = sources.make_source(cfg, seed=1)
  assert isinstance(src, toy.GMM)
  assert (src.modes, src.radius, src.std, src.num_classes) == (5, 3.0, 0.2, 5)
  assert isinstance(src.radius, float)  # int accepted for a float key, coerced
  with pytest.raises(ValueError, match=r"data\.mode: unknown key"):
    _src("gmm", mode=3)
  with pytest.raises(ValueError, match=r"data\.modes: expected int"):
    _src("gmm", modes=2.5)
  with pytest.raises(ValueError, match=r"data\.normalize: expected bool"):
    _src("moons", normalize=1)
  with pytest.raises(ValueError, match=r"data\.std must be >= 0"):
    _src("gmm", std=-1.0)
  with pytest.raises(ValueError, match=r"data\.name is missing"):
    sources.make_source({"modes": 3}, 0)


@pytest.mark.parametrize("name", TOY)
def test_batch_is_pure_function_of_seed_and_step(name):
  src, again = _src(name, seed=3), _src(name, seed=3)
  b = src.batch(7, 64)
  assert b["x"].dtype == np.float32 and b["x"].shape == (64, 2)
  assert src.shape == (2,)
  np.testing.assert_array_equal(b["x"], again.batch(7, 64)["x"])
  assert not np.array_equal(b["x"], src.batch(8, 64)["x"])
  assert not np.array_equal(b["x"], _src(name, seed=4).batch(7, 64)["x"])
  if src.num_classes:
    assert b["label"].dtype == np.int32 and b["label"].shape == (64,)
    assert 0 <= b["label"].min() and b["label"].max() < src.num_classes
    np.testing.assert_array_equal(b["label"], again.batch(7, 64)["label"])
  else:
    assert "label" not in b


@pytest.mark.parametrize("name", TOY)
def test_process_slices_concatenate_to_global_batch(name):
  src = _src(name, seed=11)
  full = src.batch(5, 48)
  for count in (2, 3, 4):
    parts = [src.batch(5, 48, process_index=p, process_count=count) for p in range(count)]
    for key in full:
      assert all(len(p[key]) == 48 // count for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
  with pytest.raises(ValueError, match="not divisible"):
    src.batch(5, 48, process_index=0, process_count=5)
  with pytest.raises(ValueError, match="bad process"):
    src.batch(5, 48, process_index=2, process_count=2)


@pytest.mark.parametrize("name", TOY)
def test_reference_is_seeded_prefix_stable_and_unit_scale(name):
  src = _src(name, seed=0)
  ref = src.reference(9000, seed=5)  # spans 3 chunks of sources.REFERENCE_CHUNK
  assert isinstance(ref, np.ndarray) and ref.dtype == np.float32 and ref.shape == (9000, 2)
  np.testing.assert_array_equal(ref[:100], src.reference(100, seed=5))
  np.testing.assert_array_equal(ref[:5000], src.reference(5000, seed=5))
  np.testing.assert_array_equal(ref, _src(name, seed=9).reference(9000, seed=5))
  assert not np.array_equal(ref[:100], src.reference(100, seed=6))
  assert not np.array_equal(ref[:100], src.batch(0, 100)["x"])  # a separate random stream
  assert np.all(np.abs(ref) < 3.6)
  assert np.all((0.4 < ref.std(axis=0)) & (ref.std(axis=0) < 2.0))


def test_gmm_modes_match_config():
  src = _src("gmm", seed=2, modes=5, radius=3.0, std=0.15)
  b = src.batch(0, 20_000)
  x, label = b["x"].astype(np.float64), b["label"]
  angles = 2 * np.pi * np.arange(5) / 5
  centers = 3.0 * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  np.testing.assert_allclose(src.centers(), centers, atol=1e-12)
  counts = np.bincount(label, minlength=5)
  assert np.all(np.abs(counts - 4000) < 5 * np.sqrt(4000 * 0.8))  # 5-sigma multinomial bound
  for k in range(5):
    pts = x[label == k]
    se = 0.15 / np.sqrt(len(pts))
    np.testing.assert_allclose(pts.mean(axis=0), centers[k], atol=5 * se)
    np.testing.assert_allclose(pts.std(axis=0), 0.15, rtol=0.06)  # ~5 sigma of the std estimate
  nearest = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(nearest, label)  # modes 23 std apart: no ambiguity


def test_gmm_normalize_gives_zero_mean_unit_rms():
  src = _src("gmm", modes=3, radius=2.0, std=0.2, normalize=True)
  x = src.reference(20_000, seed=0).astype(np.float64)
  np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=0.04)
  np.testing.assert_allclose(x.std(), 1.0, atol=0.02)
  label = src.batch(0, 5000)
  centers = src.centers()
  d = ((label["x"][:, None, :] - centers[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argmin(d, axis=1), label["label"])


def test_checkerboard_only_black_cells_and_all_of_them():
  src = _src("checkerboard", cells=4, half_width=2.0)
  x = src.batch(0, 16_000)["x"].astype(np.float64)
  assert np.all(np.abs(x) <= 2.0)
  col, row = np.floor((x + 2.0) / 1.0).astype(int).T
  assert np.all((col + row) % 2 == 0)
  counts = np.bincount(col * 4 + row, minlength=16)[((np.arange(16) // 4 + np.arange(16)) % 2) == 0]
  assert len(counts) == 8 and np.all(np.abs(counts - 2000) < 5 * np.sqrt(2000))


def test_moons_points_lie_on_their_half_circles():
  b = _src("moons", noise=0.0).batch(0, 2000)
  p = b["x"].astype(np.float64) / 2.0 + np.array([0.5, 0.25])  # back to sklearn coordinates
  upper, lower = b["label"] == 0, b["label"] == 1
  assert 800 < upper.sum() < 1200
  np.testing.assert_allclose(np.linalg.norm(p[upper], axis=1), 1.0, atol=1e-6)
  assert np.all(p[upper, 1] >= -1e-6)
  np.testing.assert_allclose(np.linalg.norm(p[lower] - np.array([1.0, 0.5]), axis=1), 1.0,
                             atol=1e-6)
  assert np.all(p[lower, 1] <= 0.5 + 1e-6)


def test_spiral_points_lie_on_their_arms():
  src = _src("spiral", arms=3, turns=1.0, radius=3.0, noise=0.0)
  b = src.batch(0, 3000)
  x, arm = b["x"].astype(np.float64), b["label"]
  assert src.num_classes == 3 and set(np.unique(arm)) == {0, 1, 2}
  r = np.linalg.norm(x, axis=1)
  keep = r > 0.05  # the angle is ill-defined at the centre
  expected = 2 * np.pi * (r / 3.0 + arm / 3.0)
  delta = np.angle(np.exp(1j * (np.arctan2(x[:, 1], x[:, 0]) - expected)))
  assert np.max(np.abs(delta[keep])) < 1e-4
  assert r.max() <= 3.0 + 1e-5
