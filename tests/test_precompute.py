"""launch.precompute and the `latents` source: precomputed latents equal direct encoding, shards
resume, process shards are disjoint, captions bring their text embeddings.

Run on CPU with a small random diffusers AutoencoderKL saved in diffusers layout (the path
`--vae` takes in production). Tolerance of "equal to direct encoding": 1e-6 relative; the same
jitted encoder math runs on the same inputs, only batch composition differs.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("grain")
pytest.importorskip("array_record")

from distill.data import image_inputs, records  # noqa: E402
from distill.data.sources import make_source  # noqa: E402
from launch import precompute  # noqa: E402
from models import convert  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vae"))
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, sample_size=SIZE)
  vae.save_pretrained(path, safe_serialization=True)
  return path


def _write_images(root: str, layout: dict[str, int], seed: int = 0) -> list[str]:
  from PIL import Image
  rng = np.random.default_rng(seed)
  paths = []
  for sub, count in layout.items():
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i in range(count):
      h, w = rng.integers(SIZE, 2 * SIZE + 8, size=2)
      p = os.path.join(root, sub, f"img{i:02d}.png")
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
      paths.append(p)
  return paths


def _direct(vae_dir: str, images: np.ndarray):
  """(mean, std) in the denoiser's scaled units, computed directly with our VAE."""
  module, variables = convert.load_diffusers_dir(vae_dir)
  mean, logvar = module.apply(variables, jnp.asarray(images, jnp.float32) / 127.5 - 1.0,
                              method="encode")
  shift, scale = module.apply(variables, method="_latent_stats")
  return np.asarray((mean - shift) * scale), np.asarray(jnp.exp(0.5 * logvar) * scale)


def _precompute(*args) -> None:
  assert precompute.main(list(args)) == 0


def test_precomputed_latents_equal_direct_encoding_and_resume(vae_dir, tmp_path):
  from PIL import Image
  paths = _write_images(str(tmp_path / "imgs"), {"cat": 4, "dog": 6})
  out = str(tmp_path / "latents")
  common = ["--input", f"folder:{tmp_path / 'imgs'}", "--vae", vae_dir, "--out", out,
            "--size", str(SIZE), "--flip", "--shard_size", "4", "--batch", "3"]
  _precompute(*common)
  meta = records.read_meta(out)
  assert meta["count"] == 10 and meta["num_classes"] == 2 and len(meta["shards"]) == 3
  assert meta["shape"] == [SIZE // 2, SIZE // 2, 4] and meta["flip"]

  reader = records.RecordReader(out)
  recs = reader.read(range(10))
  crops = np.stack([image_inputs.center_crop(Image.open(p), SIZE) for p in paths])
  mean, std = _direct(vae_dir, crops)
  mean_f, std_f = _direct(vae_dir, crops[:, :, ::-1])
  got = lambda k: np.stack([r[k] for r in recs])  # noqa: E731
  np.testing.assert_allclose(got("mean"), mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got("std"), std, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got("mean_flip"), mean_f, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got("std_flip"), std_f, rtol=1e-6, atol=1e-6)
  assert [r["label"] for r in recs] == [0] * 4 + [1] * 6
  assert [r["index"] for r in recs] == list(range(10))

  # A killed run: the last shard and meta.json missing. Rerunning writes only what is missing.
  shard_files = [os.path.join(out, s) for s in meta["shards"]]
  before = [open(f, "rb").read() for f in shard_files]
  mtimes = [os.stat(f).st_mtime_ns for f in shard_files[:2]]
  os.remove(shard_files[2])
  os.remove(os.path.join(out, records.META))
  with pytest.raises(ValueError, match="meta.json"):
    make_source({"name": "latents", "path": out}, 0)
  _precompute(*common)
  assert [os.stat(f).st_mtime_ns for f in shard_files[:2]] == mtimes
  assert [open(f, "rb").read() for f in shard_files] == before


@pytest.fixture(scope="module")
def latents_dir(vae_dir, tmp_path_factory):
  root = tmp_path_factory.mktemp("lat")
  _write_images(str(root / "imgs"), {"a": 7, "b": 6, "c": 5}, seed=1)
  out = str(root / "latents")
  _precompute("--input", f"folder:{root / 'imgs'}", "--vae", vae_dir, "--out", out,
              "--size", str(SIZE), "--flip", "--shard_size", "5", "--batch", "4")
  return out


def test_process_shards_are_disjoint_and_reassemble_the_global_batch(latents_dir):
  src = make_source({"name": "latents", "path": latents_dir}, seed=3)
  n = len(src)
  for step in range(3):
    full = src.batch(step, 6)
    parts = [src.batch(step, 6, p, 3) for p in range(3)]
    for k in full:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), full[k])
  # One epoch (3 steps of 6 = 18 = n records) reads every record exactly once, and the rows a
  # process reads differ from the other processes' (disjoint shards of the same step).
  idx = [src_idx for s in range(3) for src_idx in
         __import__("distill.data.latents", fromlist=["x"]).stream_indices(3, n, 6 * s, 6 * s + 6)]
  assert sorted(idx) == list(range(n))
  assert src.batch(0, 6)["x"].shape == (6, SIZE // 2, SIZE // 2, 4)
  assert src.num_classes == 3
  # Fresh posterior draws: step 3 (epoch 2) reads the same records as... a different noise.
  a, b = src.batch(0, 6), make_source({"name": "latents", "path": latents_dir}, seed=3).batch(0, 6)
  np.testing.assert_array_equal(a["x"], b["x"])   # a pure function of (seed, step)
  assert not np.allclose(src.batch(1, 6)["x"], a["x"])


def test_captions_bring_their_text_embeddings(vae_dir, tmp_path):
  paths = _write_images(str(tmp_path / "imgs"), {"all": 5}, seed=2)
  with open(tmp_path / "captions.jsonl", "w") as f:
    for i, p in enumerate(paths):
      f.write(json.dumps({"image": os.path.relpath(p, tmp_path), "caption_id": (3 * i) % 7})
              + "\n")
  emb_dir = tmp_path / "emb"
  emb_dir.mkdir()
  embeds = np.random.default_rng(0).standard_normal((7, 4, 6)).astype(np.float16)
  mask = (np.arange(4)[None] < np.array([2, 3, 4, 1, 2, 3, 4])[:, None]).astype(np.int8)
  np.save(emb_dir / "embeds.npy", embeds)
  np.save(emb_dir / "mask.npy", mask)
  out = str(tmp_path / "latents")
  _precompute("--input", f"jsonl:{tmp_path / 'captions.jsonl'}", "--vae", vae_dir, "--out", out,
              "--size", str(SIZE), "--kind", "sample", "--shard_size", "8")
  with pytest.raises(ValueError, match="data.text_embeds"):
    make_source({"name": "latents", "path": out}, 0)
  src = make_source({"name": "latents", "path": out, "text_embeds": str(emb_dir)}, 0)
  batch = src.batch(0, 5)
  ids = records.RecordReader(out).read(range(5))
  order = __import__("distill.data.latents", fromlist=["x"]).stream_indices(0, 5, 0, 5)
  want = np.array([ids[i]["caption_id"] for i in order])
  np.testing.assert_array_equal(batch["text_embeds"], embeds[want].astype(np.float32))
  np.testing.assert_array_equal(batch["text_mask"], mask[want])
  # kind "sample": the stored draw is used as is (no per-step noise)
  np.testing.assert_array_equal(batch["x"], np.stack([ids[i]["sample"] for i in order]))


def test_tfds_input_reads_a_prepared_dataset_without_tensorflow(vae_dir, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  out = str(tmp_path / "latents")
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    _precompute("--input", "tfds:mnist:train", "--vae", vae_dir, "--out", out,
                "--size", str(SIZE), "--batch", "4")
    src = tfds.data_source("mnist", split="train")
    labels = [int(src[i]["label"]) for i in range(6)]
  meta = records.read_meta(out)
  assert meta["count"] == 6 and meta["num_classes"] == 10
  assert [r["label"] for r in records.RecordReader(out).read(range(6))] == labels


def test_bad_inputs_are_one_line_errors(vae_dir, tmp_path, capsys):
  (tmp_path / "c.jsonl").write_text('{"image": "x.png"}\n')
  assert precompute.main(["--input", f"jsonl:{tmp_path / 'c.jsonl'}", "--vae", vae_dir,
                          "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "line 1" in err[0] and "caption_id" in err[0], err
  assert precompute.main(["--input", "nope", "--vae", vae_dir, "--out", str(tmp_path)]) == 2
  assert "kind:argument" in capsys.readouterr().err
  jax.clear_caches()
