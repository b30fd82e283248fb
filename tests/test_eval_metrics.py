"""The image metrics (FID, IS, precision/recall) through the evaluation path of a run.

The run directory is made by `launch.train` from the shipped digits teacher
(configs/demo/scm.py, the student initialised from the teacher) with `train.steps=0`: a real
run directory (config.json, checkpoint) of a network that draws digits, with no train-step
compile (seconds instead of half a minute). The FID Inception has random weights in pytorch-fid's
key layout (tests/test_fid.py) and sees the 8x8 digits resized to 75x75 (the smallest input the
architecture takes, `eval.inception_size=75`), so the numbers are not meaningful, only their
plumbing is tested: every row holds every score, the reference statistics file is written once
and reused (and a file of other data stops the evaluation with one line), the teacher rows are
cached, 8 devices give the numbers of 1 device, and latents are decoded by `eval.vae` before
scoring. With 16 samples against 2048-d features the FID goes through the features
(`frechet.frechet_distance_features`), checked here against the sqrtm formula.

Tolerances. 1 vs 8 devices: 1e-5 relative on FID / IS (same float32 math; per-device batch
sizes change XLA's summation order, ~1e-7 per op, through 48 Inception layers and a Frechet
distance of nearly equal terms); precision / recall are counts over 16 samples and must match.
Decoded vs direct images: exact (the same uint8 images go through the same network).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from distill import evaluation, trainer
from distill.metrics import fid, frechet, suite
from launch import evaluate, train
from tests.test_fid import _random_inception_file
from tests.test_train_e2e import ROOT, env

N = 16  # samples per row: IS needs >= 10 (one per split), P/R > k = 3


def eval_args(workdir, weights, stats, *extra):
  return ["--workdir", str(workdir), "--num", str(N), "--config.eval.steps=(1,)",
          "--config.eval.teacher_steps=2", f"--config.eval.inception_weights={weights}",
          "--config.eval.inception_size=75", f"--config.eval.feature_batch={N}",
          f"--config.eval.reference_stats={stats}", *extra]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  return _random_inception_file(str(tmp_path_factory.mktemp("inception") / "inception.npz"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  w = tmp_path_factory.mktemp("runs") / "scm"
  os.environ["DISTILL_NO_PROGRESS"] = "1"
  assert train.main(["--config", os.path.join(ROOT, "configs", "demo", "scm.py"),
                     "--workdir", str(w), "--config.train.steps=0",
                     "--config.train.batch_size=8", "--config.checkpoint.async_save=false",
                     "--config.eval.at_end=false", "--config.sample.num=0",
                     "--config.eval.ideal_steps=()"]) == 0  # the rows of teacher and student
  return w


_SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8
    from distill import evaluation
    from launch import evaluate
    placed = []
    real = evaluation._place
    def spy(x, mesh, rows):
      out = real(x, mesh, rows)
      placed.append(len({s.device for s in out.addressable_shards}))
      return out
    evaluation._place = spy
    assert evaluate.main(sys.argv[1:]) == 0
    assert placed and set(placed) == {8}, placed
    print("OK")
""")


@pytest.fixture(scope="module")
def eight_devices(run_dir, weights, tmp_path_factory):
  """The same evaluation on 8 fake CPU devices (XLA_FLAGS is read when JAX starts: a
  subprocess), on a copy of the run directory. Started before the 1-device evaluation so the
  two overlap (both are mostly single-threaded tracing and compiling); `wait()` -> (returncode,
  output, run directory)."""
  root = tmp_path_factory.mktemp("eight")
  w8 = root / "run8"
  shutil.copytree(run_dir, w8)
  args = eval_args(w8, weights, str(root / "ref8.npz"), "--metrics", "fid,is,pr")
  log = open(root / "log.txt", "w+")
  proc = subprocess.Popen([sys.executable, "-c", _SHARDED, *args], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT, text=True,
                          env={**env(devices=8), "PYTHONPATH": ROOT})

  def wait():
    rc = proc.wait(timeout=300)
    log.seek(0)
    return rc, log.read(), w8
  yield wait
  if proc.poll() is None:
    proc.kill()
  log.close()


@pytest.fixture(scope="module")
def one_device(run_dir, weights, eight_devices, tmp_path_factory):
  """launch.evaluate --metrics fid,is,pr on 1 device: (report, statistics file)."""
  stats = str(tmp_path_factory.mktemp("stats") / "ref.npz")
  suite._REFERENCES.clear()
  suite._FLOORS.clear()
  assert evaluate.main(eval_args(run_dir, weights, stats, "--metrics", "fid,is,pr")) == 0
  with open(run_dir / "eval.json") as f:
    return json.load(f), stats


SCORES = ("fid", "is", "is_std", "pr", "precision", "recall")


def test_evaluate_writes_every_score_in_every_row(one_device):
  report, stats = one_device
  assert report["metric"] == "fid" and report["teacher_reference_steps"] == 2
  assert set(report["results"]) == {"teacher_steps_1", "teacher_steps_2", "student_steps_1"}
  for name, row in report["results"].items():
    assert set(SCORES) <= set(row), name
    assert all(np.isfinite(row[k]) for k in SCORES), row
    assert row["num_samples"] == N and row["fid"] > 0 and row["is"] >= 1.0
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1
  assert report["data_floor"] > 0
  # The teacher's two rows are different samples (the network draws, not only noise).
  r = report["results"]
  assert r["teacher_steps_1"]["fid"] != r["teacher_steps_2"]["fid"]
  saved = fid.load_stats(stats)
  assert saved["features"].shape == (N, 2048) and saved["meta"]["num_samples"] == N
  assert saved["meta"]["size"] == 75


def test_reference_stats_reused_and_teacher_rows_cached(one_device, run_dir, weights,
                                                        monkeypatch):
  """A second evaluation reads the statistics file (no reference features computed, file
  untouched), gives the same numbers, and a shared teacher cache skips the teacher's sampling;
  a statistics file of other data stops with one line."""
  report, stats = one_device
  mtime = os.stat(stats).st_mtime_ns
  suite._REFERENCES.clear()  # forget the in-process copy: only the file can supply it
  suite._FLOORS.clear()
  computed = []
  real = fid.InceptionMetrics.reference
  monkeypatch.setattr(fid.InceptionMetrics, "reference",
                      lambda self, *a, **k: computed.append(1) or real(self, *a, **k))
  sampled = []
  real_generate = evaluation.generate
  monkeypatch.setattr(evaluation, "generate",
                      lambda ctx, net, *a, **k: sampled.append(net) or real_generate(ctx, net, *a,
                                                                                     **k))
  args = eval_args(run_dir, weights, stats, "--metrics", "fid,is,pr")
  engine, state, frozen, step = trainer.open_run(str(run_dir), _overrides(args))
  cache: dict = {}
  again = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert computed == [] and os.stat(stats).st_mtime_ns == mtime
  for name, row in report["results"].items():
    for k in SCORES:
      np.testing.assert_allclose(again["results"][name][k], row[k], rtol=1e-9, err_msg=k)
  assert again["data_floor"] == pytest.approx(report["data_floor"], rel=1e-9)
  assert sampled.count("teacher") == 2 and len(cache) == 2
  assert all('"metric": "fid,is,pr"' in k and "metric_setup" in k for k in cache)
  sampled.clear()
  third = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert "teacher" not in sampled and third["results"]["teacher_steps_2"] == \
      again["results"]["teacher_steps_2"]

  # Other data (another reference seed) against the same file: one line, file kept.
  setup = evaluation.MetricSetup.from_config(engine.config.eval, ("fid", "is", "pr"))
  setup.bind(data_hash=engine.source.content_hash(), num_samples=N, seed=7)
  with pytest.raises(suite.MetricError) as e:
    setup.reference_statistics(None)
  msg = str(e.value)
  assert len(msg.splitlines()) == 1 and msg.startswith("eval.reference_stats: ")
  assert "delete it" in msg and "seed: 1234 vs 7" in msg and os.stat(stats).st_mtime_ns == mtime


def _overrides(args):
  return [a[len("--config."):] for a in args if a.startswith("--config.")] + [
      f"eval.num_samples={N}", "eval.metrics=('fid', 'is', 'pr')"]


def test_config_errors_are_one_line(run_dir, weights, capsys, tmp_path):
  """Exit 2 and one line, before any sampling."""
  for extra, want in ((["--metrics", "fid,nope"], "unknown metric 'nope'"),
                      (["--metrics", "is", "--num", "5"], "eval.num_samples")):
    capsys.readouterr()
    args = eval_args(run_dir, weights, str(tmp_path / "s.npz"))
    assert evaluate.main(args + extra) == 2, extra
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and want in err, err
  # A training run that will evaluate checks the metric files before any work.
  capsys.readouterr()
  assert train.main(["--config", os.path.join(ROOT, "configs", "demo", "scm.py"), "--workdir",
                     str(tmp_path / "never"), "--config.eval.metrics=fid,is"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "needs eval.inception_weights" in err, err
  assert not (tmp_path / "never").exists()
  with pytest.raises(suite.MetricError, match="needs eval.inception_weights"):
    suite.MetricSetup(metrics=("pr",)).check((8, 8, 3), N)
  with pytest.raises(suite.MetricError, match="set eval.vae"):
    suite.MetricSetup(metrics=("fid",), inception_weights=weights).check((4, 4, 4), N)
  with pytest.raises(suite.MetricError, match="eval.clip_tokens"):
    suite.MetricSetup(metrics=("clip",), clip=str(tmp_path)).check((8, 8, 3), N)


def test_few_sample_frechet_equals_sqrtm_formula():
  rng = np.random.default_rng(0)
  for n1, n2, d in ((12, 9, 40), (30, 30, 8), (5, 40, 64)):
    a = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d))
    b = rng.standard_normal((n2, d)) * 1.5 + 0.3
    want = frechet.frechet_distance(*frechet.stats(a), *frechet.stats(b))
    np.testing.assert_allclose(frechet.frechet_distance_features(a, b), want, rtol=1e-6)
  assert frechet.prefer_features(16, 16, 2048) and not frechet.prefer_features(3000, 3000, 2048)


def test_sharded_evaluation_equals_one_device(one_device, eight_devices):
  """Every noise chunk was placed over the 8 devices, and the report equals 1 device's."""
  report, _ = one_device
  rc, output, w8 = eight_devices()
  assert rc == 0 and "OK" in output, output[-3000:]
  with open(w8 / "eval.json") as f:
    sharded = json.load(f)
  assert sharded["data_floor"] == pytest.approx(report["data_floor"], rel=1e-5)
  for name, row in report["results"].items():
    got = sharded["results"][name]
    for k in ("fid", "is", "is_std"):
      np.testing.assert_allclose(got[k], row[k], rtol=1e-5, atol=1e-9, err_msg=f"{name} {k}")
    assert (got["precision"], got["recall"]) == (row["precision"], row["recall"]), name


def _vae_dir(path: str) -> str:
  """A tiny random AutoencoderKL in diffusers layout (config.json + safetensors), written
  through our converter's diffusers key table: `load_diffusers_dir` reads it as it reads
  `save_pretrained` output (tests/test_precompute.py and test_export.py load real
  save_pretrained directories; importing diffusers here would cost ~10 s of the budget)."""
  import jax
  from safetensors.numpy import save_file
  from models.convert import vae as vae_convert
  from models.vae import AutoencoderKL
  module = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                         latent_channels=4, sample_size=8)
  variables = jax.jit(module.init)(jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
  state = vae_convert.CONVERTER.state_dict_from_params(module, variables)
  os.makedirs(path)
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
            os.path.join(path, "diffusion_pytorch_model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderKL", **vae_convert.diffusers_config(module)}, f)
  return path


def test_latents_are_decoded_by_eval_vae(weights, tmp_path):
  """Latent samples scored with eval.vae equal the decoded images scored directly."""
  pytest.importorskip("torch")  # models.convert reads safetensors through torch
  import jax
  from models import convert
  vae_dir = _vae_dir(str(tmp_path / "vae"))
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((N, 4, 4, 4)).astype(np.float32)
  ref = rng.standard_normal((N, 4, 4, 4)).astype(np.float32) * 0.5
  common = dict(metrics=("fid", "is"), inception_weights=weights, inception_size=75,
                batch_size=N)
  with_vae = suite.MetricSetup(vae=vae_dir, **common)
  with_vae.check((4, 4, 4), N)
  got = {**evaluation.scores("fid", latents, ref, with_vae),
         **evaluation.scores("is", latents, ref, with_vae)}
  module, variables = convert.load_diffusers_dir(vae_dir)
  decode = jax.jit(lambda z: module.apply(variables, z, method="decode_latents"))
  images, ref_images = np.asarray(decode(latents)), np.asarray(decode(ref))
  assert images.shape == (N, 8, 8, 3)
  direct = suite.MetricSetup(**common)
  want = {**evaluation.scores("fid", images, ref_images, direct),
          **evaluation.scores("is", images, ref_images, direct)}
  assert set(got) == {"fid", "is", "is_std"}
  for k in got:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)


def test_clip_score_rows_equal_scoring_the_samples_directly(run_dir, tmp_path, monkeypatch):
  """`--metrics clip`: every row's CLIP score is the score of that row's samples (captured on
  their way to the scorer) against the prompts of eval.clip_tokens, computed directly with
  the library (distill.metrics.clip, itself checked against transformers in test_clip.py)."""
  transformers = pytest.importorskip("transformers")
  import torch
  from distill.metrics import clip as clip_lib
  from tests.test_clip import _config, _ids
  torch.manual_seed(0)
  model = transformers.CLIPModel(_config(2, "quick_gelu")).eval()
  clip_dir = tmp_path / "clip"
  model.save_pretrained(clip_dir)
  tokens = tmp_path / "tokens.npy"
  np.save(tokens, _ids(N))
  seen = []
  real = clip_lib.CLIPScorer.pair_scores

  def spy(self, images, token_ids, *a, **k):
    out = real(self, images, token_ids, *a, **k)
    seen.append((np.asarray(images), np.asarray(token_ids), np.asarray(out)))
    return out
  monkeypatch.setattr(clip_lib.CLIPScorer, "pair_scores", spy)
  w = tmp_path / "run"
  shutil.copytree(run_dir, w)
  assert evaluate.main(["--workdir", str(w), "--num", str(N), "--config.eval.steps=(1,)",
                        "--config.eval.teacher_steps=2", "--metrics", "clip",
                        f"--config.eval.clip={clip_dir}", f"--config.eval.clip_tokens={tokens}",
                        f"--config.eval.feature_batch={N}"]) == 0
  with open(w / "eval.json") as f:
    report = json.load(f)
  assert report["metric"] == "clip"
  scores = [row["clip"] for row in report["results"].values()]
  assert len(seen) >= len(scores) and all(0.0 <= v <= 100.0 for v in scores), scores
  scorer = clip_lib.load_scorer(str(clip_dir))
  for images, ids, pairs in seen:   # the samples' pair scores, recomputed directly
    assert len(images) == N and not np.allclose(pairs, pairs[0])
    np.testing.assert_allclose(real(scorer, images, ids), pairs, rtol=1e-5, atol=1e-5)
  rows = {round(float(clip_lib.score_from_pairs(p)), 5) for _, _, p in seen}
  assert {round(v, 5) for v in scores} <= rows
  np.testing.assert_array_equal(seen[0][1], _ids(N))   # sample i with prompt row i


def test_nfe_counts_both_passes_of_a_guided_step():
  """eval.json's `nfe` counts network evaluations as the literature does: a teacher row sampled
  class-conditionally with CFG (w = 2) costs two per step (conditional + null pass, one call on
  a doubled batch), its ideal rows two per teacher ODE step, an unguided student one; without
  labels to drop (unconditional sampling) CFG is one pass. Rows from a teacher cache written
  before this count are corrected."""
  from distill import trainer
  from tests import _matching_utils as mu
  engine, state, frozen = mu.make_engine("dmd2", mu.make_teacher(num_classes=4))
  with engine.config.unlocked():
    engine.config.eval.update({"guidance": 2.0, "class_conditional": True, "num_samples": 32,
                               "teacher_steps": 4, "steps": (1, 2), "ideal_steps": (1,)})
  cache = {}
  res = trainer.run_evaluation(engine, state, frozen, 0, teacher_cache=cache)["results"]
  assert {k: r["nfe"] for k, r in res.items()} == {
      "teacher_steps_1": 2, "teacher_steps_4": 8, "student_steps_1": 1, "student_steps_2": 2,
      "ideal_steps_1": 8}
  for row in cache.values():   # a cache of the old count (one per call)
    row["nfe"] = 1
  again = trainer.run_evaluation(engine, state, frozen, 0, teacher_cache=cache)["results"]
  assert again["teacher_steps_4"]["nfe"] == 8 and again["ideal_steps_1"]["nfe"] == 8
  assert again["teacher_steps_4"]["swd"] == res["teacher_steps_4"]["swd"]   # from the cache
  with engine.config.unlocked():
    engine.config.eval.class_conditional = False
  res = trainer.run_evaluation(engine, state, frozen, 0, teacher_cache={})["results"]
  assert res["teacher_steps_4"]["nfe"] == 4 and res["ideal_steps_1"]["nfe"] == 4


def test_step_counts_beyond_a_discrete_grid_and_unsamplable_networks_are_one_line():
  """A 1000-timestep VP network sampled with more than 1000 steps would repeat, then skip past,
  its timesteps (NaN samples at 2000): refused naming the key or flag; continuous processes
  take any count. launch.sample's --network takes only denoisers (not a GAN head)."""
  from distill import evaluation, processes, trainer
  from tests import _matching_utils as mu
  vp = processes.make_process("vp_discrete")
  assert len(vp.timesteps(1000)) == 1001
  with pytest.raises(ValueError, match="2000 sampling steps: a discrete process of 1000"):
    vp.timesteps(2000)
  evaluation.check_steps(vp, (1, 1000), "--steps")
  with pytest.raises(ValueError, match=r"^--steps: 1001 steps, but the network's process has "
                                       r"1000 timesteps \(at most 1000 steps\)$"):
    evaluation.check_steps(vp, (4, 1001), "--steps")
  evaluation.check_steps(processes.make_process("rectified_flow"), (5000,), "--steps")
  engine, _, _ = mu.make_engine("dmd2", mu.make_teacher(num_classes=4), gan_weight=0.1,
                                gan_feature_dim=16, gan_hidden=8)
  assert trainer.network_for_role(engine, "fake_score") == "fake_score"
  with pytest.raises(ValueError, match=r"--network: this run has no samplable 'gan_head' "
                                       r"network \(denoisers: teacher, student, fake_score;"):
    trainer.network_for_role(engine, "gan_head")


def test_image_data_without_a_metric_of_its_own_defaults_to_fid():
  """Latents and images default to FID (what `launch.evaluate --workdir W` scores on an ImageNet
  run); the digits keep their classifier's fd, toy points swd."""
  from distill import evaluation
  from distill.data import sources
  latents_like = sources.make_source({"name": "synthetic", "height": 8, "width": 8,
                                      "channels": 4}, 0)
  points = sources.make_source({"name": "gmm"}, 0)
  digits = sources.make_source({"name": "digits"}, 0)
  assert [evaluation.default_metric(s) for s in (latents_like, points, digits)] == [
      "fid", "swd", "fd"]


def test_published_statistics_of_another_input_size_or_features_are_one_line(tmp_path):
  """A statistics file without our meta record (pytorch-fid's mu / sigma, an ADM reference
  batch) was measured on 299 x 299 inputs: with another eval.inception_size its FID would be
  silently meaningless (sFID crashed on the 63- vs 2023-d spatial moments), and a file of other
  features (not 2048-d) crashed on the shapes; both stop with one line naming the key. At 299
  the file is used as it is."""
  weights = tmp_path / "w.pth"
  weights.write_bytes(b"only its digest is read here")
  rng = np.random.default_rng(0)
  pub = tmp_path / "pub.npz"
  np.savez(pub, mu=rng.standard_normal(2048), sigma=np.eye(2048),
           mu_s=np.zeros(2023), sigma_s=np.eye(2023))
  other = tmp_path / "other.npz"
  np.savez(other, mu=np.zeros(512), sigma=np.eye(512))

  def setup(path, size):
    s = suite.MetricSetup(metrics=("fid", "sfid"), inception_weights=str(weights),
                          reference_stats=str(path), inception_size=size)
    return s.bind(data_hash="d", num_samples=N, seed=0)
  for path, size, want in ((pub, 75, "eval.inception_size=75 is not comparable"),
                           (other, 299, "mu (512,) (expected (2048,))")):
    suite._REFERENCES.clear()
    with pytest.raises(suite.MetricError) as e:
      setup(path, size).reference_statistics(None)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("eval.reference_stats: ") and \
        want in msg, msg
  suite._REFERENCES.clear()
  stats = setup(pub, 299).reference_statistics(None)
  np.testing.assert_array_equal(stats["mu"], np.load(pub)["mu"])
  suite._REFERENCES.clear()
