"""FID / sFID / IS / precision-recall known answers, the sharded feature extractor, reference
statistics files, and the evaluation entry point end to end (torch-free).

Known answers: FID of a set against itself is 0; FID between two feature sets whitened to an
exact sample mean / covariance equals the closed form |dm|^2 + sum (sqrt(a) - sqrt(b))^2 of
diagonal Gaussians; FID from the extractor's float64 moments equals scipy's float64 Frechet
formula written out here (rtol 1e-8: both float64, only summation order differs); precision and
recall are 1 for identical sets, 0 for far-apart sets and equal a numpy brute-force k-NN count;
IS is 1 for uniform predictions and C for confident predictions spread evenly over C classes.
The multi-device test runs in a subprocess with 8 fake CPU devices (XLA_FLAGS is read when JAX
starts) and compares against 1 device to 1e-6 relative (same float32 math, different batch
placement).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from distill.metrics import extract, fid, frechet, inception
from distill.metrics import weights as weights_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scipy_fd(a, b):
  """The textbook float64 FD of two feature sets: np.cov + scipy.linalg.sqrtm."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  m1, m2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  return float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def _whitened(n, d, seed):
  """n samples whose sample mean is exactly 0 and unbiased sample covariance exactly I."""
  z = np.random.default_rng(seed).standard_normal((n, d))
  z -= z.mean(0)
  w, v = np.linalg.eigh(np.cov(z, rowvar=False))
  return z @ v @ np.diag(w ** -0.5) @ v.T


def test_fid_known_answers():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
  assert fid.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
  # Exact diagonal Gaussians: closed form.
  m1, m2 = rng.standard_normal(8), rng.standard_normal(8)
  v1, v2 = rng.uniform(0.2, 3.0, 8), rng.uniform(0.2, 3.0, 8)
  x = m1 + _whitened(3000, 8, 1) * np.sqrt(v1)
  y = m2 + _whitened(3000, 8, 2) * np.sqrt(v2)
  closed = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(fid.fid_from_features(x, y), closed, rtol=1e-9)
  # Through the extractor's float64 moments (several padded batches) vs scipy's formula.
  b = rng.standard_normal((300, 16)) * 2 + 0.5
  ex = extract.FeatureExtractor(lambda p, f: {"f": f * p}, jnp.float32(1.0), batch_size=64)
  fa, fb = (ex.run(np.asarray(s, np.float32), moments=("f",)) for s in (a, b))
  got = frechet.frechet_distance(*fa.stats("f"), *fb.stats("f"))
  want = _scipy_fd(a.astype(np.float32), b.astype(np.float32))
  np.testing.assert_allclose(got, want, rtol=1e-8)


def test_moments_match_numpy_and_merge():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal((500, 6)) * [1, 2, 3, 4, 5, 6] + 1000.0).astype(np.float32)
  m = extract.Moments()
  for i in range(0, 500, 70):
    m.update(x[i:i + 70])
  mu, sigma = frechet.stats(x)
  np.testing.assert_allclose(m.stats()[0], mu, rtol=1e-12)
  np.testing.assert_allclose(m.stats()[1], sigma, rtol=1e-9, atol=1e-9)
  merged = extract.Moments().update(x[:123]).merge(extract.Moments().update(x[123:] - 7.0 + 7.0))
  np.testing.assert_allclose(merged.stats()[1], sigma, rtol=1e-9, atol=1e-9)
  assert merged.n == 500


def _brute_pr(real, fake, k):
  def radii(s):
    d = np.sum((s[:, None] - s[None]) ** 2, -1)
    return np.sort(d, axis=1)[:, k]

  def cov(q, s, r):
    return (np.sum((q[:, None] - s[None]) ** 2, -1) <= r[None]).any(1).mean()
  return cov(fake, real, radii(real)), cov(real, fake, radii(fake))


def test_precision_recall():
  rng = np.random.default_rng(0)
  real = rng.standard_normal((120, 10)).astype(np.float32)
  assert fid.precision_recall(real, real, k=3, block=32) == (1.0, 1.0)
  assert fid.precision_recall(real, real + 100.0, k=3, block=32) == (0.0, 0.0)
  fake = (rng.standard_normal((90, 10)) * 1.3 + 0.4).astype(np.float32)
  got = fid.precision_recall(real, fake, k=3, block=32)
  want = _brute_pr(real.astype(np.float64), fake.astype(np.float64), 3)
  np.testing.assert_allclose(got, want, atol=1e-12)
  assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0


def test_inception_score_known_answers():
  assert fid.inception_score(np.zeros((100, 7))) == pytest.approx((1.0, 0.0), abs=1e-12)
  c = 8
  logits = 50.0 * np.eye(c)[np.arange(160) % c]  # each split holds every class equally often
  mean, std = fid.inception_score(logits, splits=10)
  assert mean == pytest.approx(c, rel=1e-9) and std == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match="split"):
    fid.inception_score(np.zeros((5, 3)))


def test_stats_file_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  stats = {"mu": rng.standard_normal(5), "sigma": np.eye(5), "mu_s": np.zeros(3),
           "sigma_s": 2 * np.eye(3), "features": rng.standard_normal((4, 5))}
  path = str(tmp_path / "ref.npz")
  fid.save_stats(path, stats, meta={"data": "x", "n": 4})
  back = fid.load_stats(path)
  assert back["meta"] == {"data": "x", "n": 4}
  for k, v in stats.items():
    np.testing.assert_allclose(back[k], v, rtol=1e-6 if k == "features" else 0)
  assert back["mu"].dtype == np.float64 and back["features"].dtype == np.float32
  # pytorch-fid (mu / sigma only) and ADM reference batches (with images arr_0) load directly.
  np.savez(tmp_path / "pfid.npz", mu=np.ones(5), sigma=np.eye(5))
  np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.ones(5),
           sigma=np.eye(5), mu_s=np.ones(3), sigma_s=np.eye(3))
  assert sorted(fid.load_stats(str(tmp_path / "pfid.npz"))) == ["mu", "sigma"]
  assert sorted(fid.load_stats(str(tmp_path / "adm.npz"))) == ["mu", "mu_s", "sigma", "sigma_s"]
  np.savez(tmp_path / "bad.npz", a=np.ones(2))
  with pytest.raises(ValueError, match="bad.npz"):
    fid.load_stats(str(tmp_path / "bad.npz"))


def _random_inception_file(path: str) -> str:
  """Random FID-Inception weights in the pytorch-fid key layout, as .npz (no torch needed)."""
  rng = np.random.default_rng(0)
  sd = {}
  for p, shape in inception.param_shapes().items():
    key, leaf = weights_lib.key_of(p), p[-1]
    if leaf == "kernel" and len(shape) == 4:  # flax (kh, kw, I, O) -> torch (O, I, kh, kw)
      fan_in = shape[0] * shape[1] * shape[2]
      a = rng.standard_normal((shape[3], shape[2], shape[0], shape[1])) * (2 / fan_in) ** 0.5
    elif leaf == "kernel":
      a = rng.standard_normal(shape[::-1]) * shape[0] ** -0.5
    elif leaf in ("weight", "running_var"):
      a = rng.uniform(0.5, 1.5, shape)
    else:
      a = 0.1 * rng.standard_normal(shape)
    sd[key] = a.astype(np.float32)
  np.savez(path, **sd)
  return path


def test_evaluation_entry_point(tmp_path, monkeypatch):
  """The plumbing of `inception_scores` on 75x75 images (resize off) with random weights.

  A Frechet distance on 2048-d statistics of 24 samples is a 2048x2048 sqrtm of a singular
  product (tens of seconds, and ill-posed), so the distance is recorded by a stub here; the
  formula itself is tested above and in tests/test_frechet.py."""
  calls = []

  def fake_fd(mu1, s1, mu2, s2):
    calls.append((mu1, s1, mu2, s2))
    return float(np.sum((np.asarray(mu1) - mu2) ** 2) + np.abs(np.asarray(s1) - s2).sum())

  monkeypatch.setattr(fid.frechet, "frechet_distance", fake_fd)
  weights = _random_inception_file(str(tmp_path / "inception.npz"))
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (24, 75, 75, 3)).astype(np.float32)
  fake = np.clip(real[::-1] * 0.5 + 0.3 * rng.standard_normal(real.shape), -1, 1)
  cache = str(tmp_path / "ref_stats.npz")
  kw = dict(weights=weights, cache=cache, resize=False, batch_size=16)
  out = fid.inception_scores(fake.astype(np.float32), real, **kw)
  assert set(out) == {"fid", "sfid", "inception_score", "inception_score_std", "precision",
                      "recall", "num_samples"}
  assert out["fid"] > 0 and out["sfid"] > 0 and out["num_samples"] == 24
  assert 1.0 <= out["inception_score"] <= 1008
  stats = fid.load_stats(cache)
  assert stats["mu"].shape == (2048,) and stats["sigma_s"].shape == (63, 63)
  assert stats["features"].shape == (24, 2048) and stats["meta"]["num_samples"] == 24
  (mu, sigma, mu_r, sigma_r), (mu_s, sigma_s, _, _) = calls
  np.testing.assert_allclose(mu_r, stats["mu"]) and np.testing.assert_allclose(sigma_r,
                                                                                stats["sigma"])
  assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and sigma_s.shape == (63, 63)
  # The reference against itself: identical statistics, precision = recall = 1.
  same = fid.inception_scores(real, real, **kw)
  assert same["fid"] < 1e-6 * np.abs(stats["sigma"]).sum() and same["sfid"] < 1e-4
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  # A cached file computed for other data is never reused silently.
  m = fid._metrics(weights, 16, (("resize", False),))
  with pytest.raises(ValueError, match="delete the file"):
    m.reference(real[:12], cache=cache, meta={"reference_sha1": "other", "num_samples": 12})


def test_uint8_images_map_to_unit_range():
  u8 = np.array([0, 51, 255], np.uint8)
  np.testing.assert_allclose(fid._to_input(jnp.asarray(u8)), [-1.0, 51 / 127.5 - 1, 1.0],
                             rtol=1e-6)
  assert fid._to_input(jnp.zeros(2, jnp.bfloat16)).dtype == jnp.float32


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from distill.metrics import extract
    assert len(jax.devices()) == 8
    w = jax.random.normal(jax.random.key(0), (48, 20))

    def fn(p, batch):
      x, ids = batch
      h = jnp.tanh(x.reshape(x.shape[0], -1) @ p)
      return {"pool": h, "logits": h[:, :5] + ids[:, None].astype(jnp.float32)}

    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 4, 4, 3)).astype(np.float32)
    ids = rng.integers(0, 9, 203).astype(np.int32)
    many = extract.FeatureExtractor(fn, w, batch_size=60)
    one = extract.FeatureExtractor(fn, w, batch_size=60, devices=jax.devices()[:1])
    assert many.batch_size == 64 and one.batch_size == 60
    out, n = many.dispatch((x[:64], ids[:64]))
    assert out["pool"].addressable_shards[0].data.shape == (8, 20), out["pool"].sharding
    assert len({s.device for s in out["pool"].addressable_shards}) == 8
    batches = [(x[i:i + 50], ids[i:i + 50]) for i in range(0, 203, 50)]  # 4 x 50 + 3
    a = many.run(batches, moments=("pool",), keep=("pool", "logits"))
    b = one.run((x, ids), moments=("pool",), keep=("pool", "logits"))
    assert a.num_samples == b.num_samples == 203
    ref = np.tanh(x.reshape(203, -1) @ np.asarray(w))
    np.testing.assert_allclose(a.arrays["pool"], ref, rtol=1e-5, atol=1e-5)
    # 8-row shards and 60-row batches run differently tiled float32 matmuls: equal to float32
    # rounding (measured up to 1e-7 absolute on Intel hosts, 1e-6 on AMD EPYC ones).
    np.testing.assert_allclose(a.arrays["pool"], b.arrays["pool"], rtol=1e-5, atol=3e-6)
    np.testing.assert_allclose(a.arrays["logits"], b.arrays["logits"], rtol=1e-5, atol=3e-6)
    for s, t in zip(a.stats("pool"), b.stats("pool")):
      np.testing.assert_allclose(s, t, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a.stats("pool")[1], np.cov(a.arrays["pool"].astype(np.float64),
                                                          rowvar=False), rtol=1e-9, atol=1e-12)
    print("OK")
""")


def test_sharded_extraction_equals_one_device():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=env)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_few_samples_against_published_statistics(tmp_path):
  """A published statistics file (mu / sigma only, no features) with fewer samples than the
  2048 pool dimensions: the FID goes through the samples' features and the published moments
  (exact) and equals the FID against our own file of the same reference (which keeps the
  features), where the 2048 x 2048 root of the singular product raised FloatingPointError.
  75 x 75 images, random weights, as test_evaluation_entry_point; tolerance 1e-6 relative
  (float32 features, float64 sums; the two forms differ only in summation order)."""
  weights = _random_inception_file(str(tmp_path / "inception.npz"))
  rng = np.random.default_rng(0)
  real = rng.uniform(-1, 1, (16, 75, 75, 3)).astype(np.float32)
  fake = np.clip(real[::-1] * 0.5 + 0.3 * rng.standard_normal(real.shape), -1, 1)
  m = fid.InceptionMetrics(weights, resize=False, batch_size=16, gram=True)
  ours = m.reference(real)
  published = {"mu": ours["mu"], "sigma": ours["sigma"]}
  feats = m.features(fake.astype(np.float32))
  want = m.scores(feats, ours, which=("fid",))["fid"]
  got = m.scores(feats, published, which=("fid",))["fid"]
  assert want > 0 and got == pytest.approx(want, rel=1e-6)
