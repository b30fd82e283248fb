"""The `fd` metric of the bundled digits: the classifier's recipe and shipped weights, the
Frechet distance in its features, class coverage, and the retrain fallback."""
import numpy as np
import pytest

from distill import evaluation
from distill import teacher as teacher_lib
from distill.data import digits
from distill.metrics import digits_classifier as dc
from distill.metrics import frechet


@pytest.fixture(scope="module")
def src():
  return digits.Digits(0, size=16, method="linear")


def test_shipped_weights_match_the_bundled_digits(src):
  """The asset holds the current data hash and recipe, so every machine uses the same net."""
  _, data_hash, recipe = dc.load(dc.ASSET)
  assert data_hash == src.content_hash() and recipe == dc.RECIPE
  _, logits = dc.features(src.images)
  assert np.mean(np.argmax(logits, -1) == src.labels) > 0.99


@pytest.mark.slow
def test_recipe_generalises_to_held_out_digits(src):
  """The recipe trained on 80% of the digits classifies the other 20% (the features mean
  something beyond memorised images)."""
  perm = np.random.default_rng(0).permutation(len(src.images))
  train, test = perm[:1437], perm[1437:]
  params = dc.train(src.images[train], src.labels[train])
  _, logits = dc.DigitNet().apply({"params": params}, dc.to_input(src.images[test]))
  assert np.mean(np.argmax(np.asarray(logits), -1) == src.labels[test]) > 0.97


def test_fd_against_itself_is_zero_and_real_halves_sit_far_below_noise(src):
  ref = src.reference(898, 1234)
  assert dc.fd_and_coverage(ref, ref)["fd"] == pytest.approx(0.0, abs=1e-6)
  floor = dc.fd_and_coverage(src.floor_reference(898, 1234), ref)
  noise = np.random.default_rng(0).uniform(-1, 1, ref.shape).astype(np.float32)
  assert floor["coverage"] == 1.0
  assert 0.0 < floor["fd"] < 0.05 * dc.fd_and_coverage(noise, ref)["fd"]


def test_fd_is_frechet_of_the_features(src):
  a, b = src.reference(300, 1), src.reference(300, 2)
  fa, _ = dc.features(a)
  fb, _ = dc.features(b)
  want = frechet.frechet_distance(*frechet.stats(fa), *frechet.stats(fb))
  assert dc.fd_and_coverage(a, b)["fd"] == pytest.approx(want, rel=1e-12)


def test_coverage_counts_classes_with_half_their_share(src):
  only = src.images[np.isin(src.labels, [3, 7])]
  got = dc.fd_and_coverage(only, src.reference(400, 0))
  assert got["coverage"] == pytest.approx(0.2)
  assert got["class_entropy"] == pytest.approx(np.log(2), abs=0.05)
  assert dc.coverage(np.array([10] * 9 + [4])) == pytest.approx(0.9)   # 4 < 0.5 * 94 / 10
  assert dc.coverage(np.array([10] * 9 + [5])) == pytest.approx(1.0)   # 5 >= 0.5 * 95 / 10
  assert dc.class_entropy(np.full(10, 7)) == pytest.approx(np.log(10))


def test_other_resolutions_are_resized(src):
  small = digits.load(8, "linear")[0][:64]
  f8, _ = dc.features(small)
  f16, _ = dc.features(np.asarray(dc.to_input(small)))
  np.testing.assert_allclose(f8, f16, rtol=1e-6)
  with pytest.raises(ValueError, match="N, H, W, 1"):
    dc.features(np.zeros((4, 16, 16, 3), np.float32))


def test_the_fd_metric_reports_coverage_beside_fd(src):
  ref = src.reference(200, 0)
  out = evaluation.scores("fd", src.floor_reference(200, 0), ref)
  assert set(out) == {"fd", "coverage", "class_entropy"}
  assert evaluation.default_metric(src) == "fd"


def test_missing_or_stale_weights_are_retrained_into_the_cache(src, tmp_path, monkeypatch):
  """No shipped file (or one for other data) -> retrain once, cache, never touch the asset."""
  calls = []
  real_train = dc.train

  def short_train(images, labels):
    calls.append(len(images))
    return real_train(images, labels, steps=5)

  monkeypatch.setattr(dc, "train", short_train)
  monkeypatch.setattr(dc, "ASSET", str(tmp_path / "missing.npz"))
  monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
  dc.params.cache_clear()
  try:
    first = dc.params()
    assert calls == [len(src.images)]
    assert (tmp_path / "cache" / "digits_classifier.npz").exists()
    dc.params.cache_clear()
    second = dc.params()                       # from the cache: no second training
    assert calls == [len(src.images)]
    assert teacher_lib.params_hash(first) == teacher_lib.params_hash(second)
    stale = tmp_path / "stale.npz"
    dc.save(str(stale), first, "0" * 64)       # weights of other data are not used
    monkeypatch.setattr(dc, "ASSET", str(stale))
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache2"))
    dc.params.cache_clear()
    dc.params()
    assert len(calls) == 2
  finally:
    dc.params.cache_clear()
