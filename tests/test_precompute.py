"""launch.precompute and the `latents` source: precomputed latents equal direct encoding, shards
resume, process shards are disjoint, captions bring their text conditioning (prompt, mask and
pooled embeddings, SDXL's size/crop `time_ids` from the stored crop of each record, the null
prompt of null.npy or "zeros"), `conditions(n, seed)` gives the prompts of `reference(n, seed)`'s
images, and records written before the crop fields existed still load.

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
from tests._tool_utils import one_error_line, save_tiny_vae  # noqa: E402
from models import convert  # noqa: E402

SIZE = 16


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("vae"))
  return save_tiny_vae(path, SIZE)


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
  # Resuming with another setting would mix two kinds of records: one line, nothing written.
  listing = sorted(os.listdir(out))
  with pytest.raises(ValueError, match=r"other settings \(size 16 there, 8 here\)"):
    other = list(common)
    other[other.index("--size") + 1] = "8"
    precompute.run(precompute.parse(other))
  assert sorted(os.listdir(out)) == listing
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


# Images of different sizes (none needs box-halving: every short side < 2 * SIZE), so each
# record has its own original size and crop corner; caption i is (3 i) mod 7 of 7 captions.
CAPTION_SIZES = [(16, 16), (20, 31), (29, 17), (18, 24), (24, 18), (31, 22)]
CAPTIONS, TOKENS, WIDTH, POOLED = 7, 4, 6, 5


def _expected_time_ids(h: int, w: int) -> list[int]:
  """SDXL's (orig_h, orig_w, crop_top, crop_left, size, size) of an h x w image, computed here
  independently: resize the short side to SIZE (PIL rounds each side), centre crop."""
  scale = SIZE / min(h, w)
  rh, rw = round(h * scale), round(w * scale)
  return [h, w, (rh - SIZE) // 2, (rw - SIZE) // 2, SIZE, SIZE]


def _save(path, **arrays) -> str:
  os.makedirs(path, exist_ok=True)
  for name, arr in arrays.items():
    np.save(os.path.join(path, name + ".npy"), arr)
  return str(path)


def _text_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "embeds": rng.standard_normal((CAPTIONS, TOKENS, WIDTH)).astype(np.float16),
      "mask": (np.arange(TOKENS)[None] < np.array([2, 3, 4, 1, 2, 3, 4])[:, None]).astype(np.int8),
      "pooled": rng.standard_normal((CAPTIONS, POOLED)).astype(np.float32),
      "null": rng.standard_normal((TOKENS, WIDTH)).astype(np.float32),
      "null_mask": np.array([1, 0, 0, 0], np.int8),
      "null_pooled": rng.standard_normal(POOLED).astype(np.float32),
      "clip_tokens": rng.integers(0, 49408, (CAPTIONS, 77)).astype(np.int64)}


@pytest.fixture(scope="module")
def caption_latents(vae_dir, tmp_path_factory):
  """(latent dir, text-embedding dir, its arrays, caption id of each record)."""
  from PIL import Image
  root = tmp_path_factory.mktemp("cap")
  rng = np.random.default_rng(2)
  os.makedirs(root / "imgs")
  ids = [(3 * i) % CAPTIONS for i in range(len(CAPTION_SIZES))]
  with open(root / "captions.jsonl", "w") as f:
    for i, (h, w) in enumerate(CAPTION_SIZES):
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
          root / "imgs" / f"{i}.png")
      f.write(json.dumps({"image": f"imgs/{i}.png", "caption_id": ids[i]}) + "\n")
  out = str(root / "latents")
  _precompute("--input", f"jsonl:{root / 'captions.jsonl'}", "--vae", vae_dir, "--out", out,
              "--size", str(SIZE), "--kind", "sample", "--flip", "--shard_size", "4")
  arrays = _text_arrays()
  return out, _save(root / "emb", **arrays), arrays, np.array(ids)


def _stream(n: int, start: int, stop: int, seed: int = 0) -> np.ndarray:
  return __import__("distill.data.latents", fromlist=["x"]).stream_indices(seed, n, start, stop)


def test_captions_bring_text_embeds_pooled_and_time_ids(caption_latents):
  out, emb, arr, ids = caption_latents
  n = len(CAPTION_SIZES)
  with pytest.raises(ValueError, match="data.text_embeds"):
    make_source({"name": "latents", "path": out}, 0)
  recs = records.RecordReader(out).read(range(n))
  assert [list(r["orig_size"]) + list(r["crop_top_left"]) for r in recs] == \
      [_expected_time_ids(h, w)[:4] for h, w in CAPTION_SIZES]
  assert len({tuple(r["crop_top_left"]) for r in recs}) > 2   # the crops differ per record
  assert records.read_meta(out)["size"] == SIZE
  src = make_source({"name": "latents", "path": out, "text_embeds": emb, "time_ids": True}, 0)
  want_time = np.array([_expected_time_ids(h, w) for h, w in CAPTION_SIZES], np.float32)
  flipped = 0
  for step in range(2):
    batch = src.batch(step, n)
    order = _stream(n, step * n, (step + 1) * n)
    want = ids[order]
    np.testing.assert_array_equal(batch["text_embeds"], arr["embeds"][want].astype(np.float32))
    np.testing.assert_array_equal(batch["text_mask"], arr["mask"][want])
    np.testing.assert_array_equal(batch["pooled_text_embeds"], arr["pooled"][want])
    # a flipped twin keeps its image's crop coordinates (diffusers' SDXL training does too)
    np.testing.assert_array_equal(batch["time_ids"], want_time[order])
    assert batch["time_ids"].dtype == np.float32 and batch["text_embeds"].dtype == np.float32
    # kind "sample": the stored draw (or its flipped twin's) is used as is (no per-step noise)
    for x, i in zip(batch["x"], order):
      same = [np.array_equal(x, recs[i][k]) for k in ("sample", "sample_flip")]
      assert any(same)
      flipped += same[1]
  assert 0 < flipped < 2 * n
  plain = make_source({"name": "latents", "path": out, "text_embeds": emb}, 0).batch(0, n)
  assert "time_ids" not in plain and set(plain) == {"x", "text_embeds", "text_mask",
                                                    "pooled_text_embeds"}


def test_content_hash_covers_the_prompts(caption_latents, tmp_path):
  """The hash a resume compares (and the teacher-row cache keys on): the same records and
  embeddings elsewhere hash the same; other embeddings for the same records do not."""
  out, emb, arr, _ = caption_latents
  hash_of = lambda text: make_source({"name": "latents", "path": out, "text_embeds": text},
                                     0).content_hash()
  moved = _save(tmp_path / "moved", **arr)
  other = _save(tmp_path / "other", **{**arr, "embeds": arr["embeds"][::-1].copy()})
  assert hash_of(emb) == hash_of(moved) != hash_of(other)


def _error_line(data: dict) -> str:
  with pytest.raises(ValueError) as e:
    make_source({"name": "latents", **data}, 0)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_null_prompt_file_zeros_and_shape_errors(caption_latents, latents_dir, tmp_path):
  out, emb, arr, _ = caption_latents
  src = make_source({"name": "latents", "path": out, "text_embeds": emb}, 0)
  null = src.null_inputs()
  assert set(null) == {"text_embeds", "text_mask", "pooled_text_embeds"}
  np.testing.assert_array_equal(null["text_embeds"], arr["null"])
  np.testing.assert_array_equal(null["text_mask"], arr["null_mask"])
  np.testing.assert_array_equal(null["pooled_text_embeds"], arr["null_pooled"])
  assert all(v.dtype == np.float32 for v in null.values())
  # without a null mask / pooled embedding: only the prompt embedding
  minimal = _save(tmp_path / "minimal", embeds=arr["embeds"], null=arr["null"])
  only = make_source({"name": "latents", "path": out, "text_embeds": minimal}, 0)
  assert set(only.null_inputs()) == {"text_embeds"}
  # no null.npy: one line naming the file and the "zeros" alternative, which then works
  no_null = _save(tmp_path / "no_null", embeds=arr["embeds"], mask=arr["mask"],
                  pooled=arr["pooled"])
  msg = _error_line({"path": out, "text_embeds": no_null})
  assert "null.npy" in msg and 'data.null_prompt = "zeros"' in msg, msg
  zeros = make_source({"name": "latents", "path": out, "text_embeds": no_null,
                       "null_prompt": "zeros"}, 0)
  assert zeros.null_inputs() == {}
  assert make_source({"name": "latents", "path": out, "text_embeds": emb,
                      "null_prompt": "zeros"}, 0).null_inputs() == {}   # null files ignored
  assert "pooled_text_embeds" in zeros.batch(0, 2)
  assert "data.null_prompt" in _error_line({"path": out, "text_embeds": emb,
                                            "null_prompt": "empty"})
  # pooled.npy without null_pooled.npy, and every shape checked against embeds.npy
  no_pooled_null = _save(tmp_path / "npn", embeds=arr["embeds"], pooled=arr["pooled"],
                         null=arr["null"])
  assert "null_pooled.npy" in _error_line({"path": out, "text_embeds": no_pooled_null})
  bad = {"mask": arr["mask"][:, :3], "pooled": arr["pooled"][:6], "null": arr["null"][:3],
         "null_mask": arr["null_mask"][:2], "null_pooled": arr["null_pooled"][:4],
         "clip_tokens": arr["clip_tokens"][:, :76]}
  for name, value in bad.items():
    d = _save(tmp_path / f"bad_{name}", **{**arr, name: value})
    msg = _error_line({"path": out, "text_embeds": d})
    assert msg.startswith(f"data.text_embeds: {name}.npy has shape {value.shape}"), msg
  # class-labelled latents: no prompt, so no null prompt and no SDXL ids
  assert make_source({"name": "latents", "path": latents_dir}, 0).null_inputs() == {}
  assert "data.time_ids" in _error_line({"path": latents_dir, "time_ids": True})


def test_conditions_are_deterministic_and_paired_with_reference(caption_latents, latents_dir):
  out, emb, arr, ids = caption_latents
  src = make_source({"name": "latents", "path": out, "text_embeds": emb, "time_ids": True}, 0)
  cond = src.conditions(10, seed=7)
  assert set(cond) == {"text_embeds", "text_mask", "pooled_text_embeds", "time_ids",
                       "clip_tokens"}
  assert all(len(v) == 10 for v in cond.values())
  again = make_source({"name": "latents", "path": out, "text_embeds": emb, "time_ids": True},
                      seed=3).conditions(10, seed=7)   # the training seed plays no part
  for k in cond:
    np.testing.assert_array_equal(again[k], cond[k])
  prefix = src.conditions(4, seed=7)
  for k in cond:
    np.testing.assert_array_equal(prefix[k], cond[k][:4])
  assert not np.array_equal(src.conditions(10, seed=8)["text_embeds"], cond["text_embeds"])
  # row i is the prompt of the record whose image is row i of reference(10, 7)
  rows = src.reference_indices(10, 7)
  recs = records.RecordReader(out).read(rows)
  ref = src.reference(10, 7)
  for x, rec in zip(ref, recs):
    assert any(np.array_equal(x, rec[k]) for k in ("sample", "sample_flip"))
  want = ids[rows]
  np.testing.assert_array_equal(cond["text_embeds"], arr["embeds"][want].astype(np.float32))
  np.testing.assert_array_equal(cond["text_mask"], arr["mask"][want])
  np.testing.assert_array_equal(cond["pooled_text_embeds"], arr["pooled"][want])
  np.testing.assert_array_equal(cond["clip_tokens"], arr["clip_tokens"][want])
  assert cond["clip_tokens"].dtype == np.int32
  want_time = [_expected_time_ids(*CAPTION_SIZES[i]) for i in rows]
  np.testing.assert_array_equal(cond["time_ids"], np.array(want_time, np.float32))
  assert src.conditions(0, seed=7)["text_embeds"].shape == (0, TOKENS, WIDTH)
  # without clip_tokens.npy: no clip_tokens; class-labelled latents: no prompts at all
  lean = _save(os.path.join(os.path.dirname(emb), "lean"), embeds=arr["embeds"], null=arr["null"])
  assert set(make_source({"name": "latents", "path": out, "text_embeds": lean}, 0)
             .conditions(3, 7)) == {"text_embeds"}
  assert make_source({"name": "latents", "path": latents_dir}, 0).conditions(3, 7) == {}


def test_old_precompute_records_without_crop_fields_load_with_resolution_time_ids(
    caption_latents, tmp_path):
  out, emb, arr, ids = caption_latents
  meta = records.read_meta(out)
  old = str(tmp_path / "old")
  os.makedirs(old)
  reader = records.RecordReader(out)
  n = len(reader)
  for name, start in zip(meta["shards"], range(0, n, 4)):
    recs = reader.read(range(start, min(n, start + 4)))
    records.write_shard(os.path.join(old, name),
                        [{k: v for k, v in r.items() if k not in records.CROP_FIELDS}
                         for r in recs])
  fields = [f for f in meta["fields"] if f not in records.CROP_FIELDS]
  records.write_meta(old, {**meta, "fields": fields})
  src = make_source({"name": "latents", "path": old, "text_embeds": emb, "time_ids": True}, 0)
  batch = src.batch(0, n)
  np.testing.assert_array_equal(batch["time_ids"],
                                np.tile(np.float32([SIZE, SIZE, 0, 0, SIZE, SIZE]), (n, 1)))
  np.testing.assert_array_equal(batch["text_embeds"],
                                arr["embeds"][ids[_stream(n, 0, n)]].astype(np.float32))
  np.testing.assert_array_equal(src.conditions(5, 1)["time_ids"], batch["time_ids"][:5])
  # a meta.json without the precompute size cannot give time_ids: one line
  records.write_meta(old, {k: v for k, v in meta.items() if k != "size"})
  msg = _error_line({"path": old, "text_embeds": emb, "time_ids": True})
  assert "size" in msg and "meta.json" in msg
  assert "time_ids" not in make_source({"name": "latents", "path": old, "text_embeds": emb},
                                       0).batch(0, 2)


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
  # An image the jsonl names that is missing, or a file that is no image: named in one line.
  (tmp_path / "m.jsonl").write_text('{"image": "missing.png", "caption_id": 0}\n')
  assert precompute.main(["--input", f"jsonl:{tmp_path / 'm.jsonl'}", "--vae", vae_dir,
                          "--out", str(tmp_path / "m")]) == 2
  err = capsys.readouterr().err.strip().splitlines()  # found before the first batch
  assert len(err) == 1 and "line 1: image " in err[0] and "missing.png: no such file" in err[0]
  assert not os.path.exists(tmp_path / "m")
  os.makedirs(tmp_path / "bad" / "a")
  (tmp_path / "bad" / "a" / "x.png").write_bytes(b"not an image")
  assert precompute.main(["--input", f"folder:{tmp_path / 'bad'}", "--vae", vae_dir,
                          "--out", str(tmp_path / "b")]) == 2
  err = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
  assert len(err) == 1 and "x.png: cannot be read (UnidentifiedImageError" in err[0], err
  jax.clear_caches()


def _fails(capsys, *args) -> str:
  """The one stderr line of a precompute that exits 2."""
  return one_error_line(capsys, precompute.main, *args)


def test_folder_input_skips_hidden_entries_and_refuses_top_level_images(vae_dir, tmp_path,
                                                                       capsys):
  root = tmp_path / "mixed"
  _write_images(str(root), {"cat": 2, "dog": 1, ".ipynb_checkpoints": 1})
  (root / "cat" / "._img00.png").write_bytes(b"macOS resource fork")
  src = image_inputs.open_input(f"folder:{root}", SIZE)
  assert src.classes == ["cat", "dog"] and len(src) == 3
  assert [label for _, label in src.items] == [0, 0, 1]
  _write_images(str(tmp_path / "top"), {"": 4})
  for i in range(4):
    os.replace(tmp_path / "top" / f"img{i:02d}.png", root / f"top{i}.png")
  out = tmp_path / "out"
  err = _fails(capsys, "--input", f"folder:{root}", "--vae", vae_dir, "--out", out)
  assert (f"--input folder:{root}: 4 images at the top level beside class folders "
          "(top0.png, top1.png, top2.png, ...)") in err, err
  assert not out.exists()


def _jsonl_images(root, ids) -> str:
  """root/c.jsonl naming one small image per caption id of `ids` (raw JSON values)."""
  _write_images(str(root), {"imgs": len(ids)})
  lines = [f'{{"image": "imgs/img{i:02d}.png", "caption_id": {v}}}' for i, v in enumerate(ids)]
  (root / "c.jsonl").write_text("\n".join(lines) + "\n")
  return str(root / "c.jsonl")


@pytest.mark.parametrize("bad", ["-1", "1.7", '"3"', "true"])
def test_jsonl_caption_ids_must_be_non_negative_integers(vae_dir, tmp_path, capsys, bad):
  path = _jsonl_images(tmp_path, ["0", bad])
  out = tmp_path / "out"
  err = _fails(capsys, "--input", f"jsonl:{path}", "--vae", vae_dir, "--out", out)
  assert f"--input jsonl:{path} line 2: " in err and \
      f"caption_id must be an integer >= 0, got {json.loads(bad)!r}" in err, err
  assert not out.exists()


def test_empty_jsonl_or_missing_image_stops_before_anything_is_written(vae_dir, tmp_path,
                                                                       capsys):
  (tmp_path / "empty.jsonl").write_text("\n  \n")
  out = tmp_path / "out"
  err = _fails(capsys, "--input", f"jsonl:{tmp_path / 'empty.jsonl'}", "--vae", vae_dir,
               "--out", out)
  assert f"--input jsonl:{tmp_path / 'empty.jsonl'}: no examples" in err, err
  assert not out.exists()
  path = _jsonl_images(tmp_path, ["0", "1", "2"])
  os.remove(tmp_path / "imgs" / "img01.png")
  os.remove(tmp_path / "imgs" / "img02.png")
  err = _fails(capsys, "--input", f"jsonl:{path}", "--vae", vae_dir, "--out", out)
  assert (f"line 2: image {tmp_path / 'imgs' / 'img01.png'}: no such file (2 of 3 images "
          "missing)") in err, err
  assert not out.exists()


@pytest.mark.parametrize("flag", ["--size", "--batch", "--shard_size"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_non_positive_size_batch_shard_size_are_refused(vae_dir, tmp_path, capsys, flag, value):
  _write_images(str(tmp_path / "imgs"), {"a": 1})
  out = tmp_path / "out"
  args = {"--size": str(SIZE), "--batch": "2", "--shard_size": "4", flag: value}
  err = _fails(capsys, "--input", f"folder:{tmp_path / 'imgs'}", "--vae", vae_dir, "--out", out,
               *[x for kv in args.items() for x in kv])
  assert err == f"error: {flag}: expected a positive number, got {value}", err
  assert not out.exists()


def test_tfds_unknown_or_unprepared_dataset_is_one_short_line(vae_dir, tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path / "tfds"
  out = tmp_path / "out"
  base = ["--vae", vae_dir, "--out", out, "--tfds_data_dir", data_dir]
  err = _fails(capsys, "--input", "tfds:mnist", *base)
  assert (f"--input tfds:mnist:train: not prepared in --tfds_data_dir {data_dir} (expected "
          f"{data_dir / 'mnist'}") in err and "never downloads" in err, err
  err = _fails(capsys, "--input", "tfds:no_such_dataset", *base)
  assert (f"--input tfds:no_such_dataset: no such tfds dataset (DatasetNotFoundError; "
          f"--tfds_data_dir {data_dir})") in err and len(err) < 200, err
  assert not out.exists()


def _kill_last_shard(out: str) -> list[str]:
  """What a run killed before its last shard leaves: removes that shard and meta.json; returns
  the listing left."""
  meta = records.read_meta(out)
  os.remove(os.path.join(out, meta["shards"][-1]))
  os.remove(os.path.join(out, records.META))
  return sorted(os.listdir(out))


def _resume_as_recorded_without(out: str, key: str, args) -> None:
  """Resumes `out` as if its precompute.json predated setting `key` (nothing to compare)."""
  path = os.path.join(out, precompute.SETTINGS)
  with open(path) as f:
    recorded = json.load(f)
  del recorded[key]
  with open(path, "w") as f:
    json.dump(recorded, f)
  _precompute(*args)


def test_resume_after_the_input_changed_with_the_same_count_is_refused(vae_dir, tmp_path, capsys):
  root = tmp_path / "imgs"
  _write_images(str(root), {"cat": 3, "dog": 3})
  out = str(tmp_path / "out")
  common = ["--input", f"folder:{root}", "--vae", vae_dir, "--out", out, "--size", str(SIZE),
            "--shard_size", "4"]
  _precompute(*common)
  left = _kill_last_shard(out)
  kept = [open(os.path.join(out, f), "rb").read() for f in left]
  os.replace(root / "cat" / "img00.png", root / "dog" / "zz_moved.png")  # same count, 6
  err = _fails(capsys, *common)
  assert (f"--out {out} holds shards of another --input folder:{root} listing (same count 6; "
          "files, their order, labels or caption ids changed since)") in err, err
  assert sorted(os.listdir(out)) == left
  assert [open(os.path.join(out, f), "rb").read() for f in left] == kept
  # an output written before precompute.json had the fingerprint: nothing to compare, resumes
  os.replace(root / "dog" / "zz_moved.png", root / "cat" / "img00.png")
  _resume_as_recorded_without(out, "input_fingerprint", common)
  assert records.read_meta(out)["count"] == 6


def test_resume_after_an_image_was_replaced_under_its_name_is_refused(vae_dir, tmp_path, capsys):
  """The listing is the same, the content is not: an image re-exported (another size on disk)
  would mix old and new encodings in one output."""
  from PIL import Image
  root = tmp_path / "imgs"
  _write_images(str(root), {"cat": 3})
  out = str(tmp_path / "out")
  common = ["--input", f"folder:{root}", "--vae", vae_dir, "--out", out, "--size", str(SIZE),
            "--shard_size", "2"]
  _precompute(*common)
  left = _kill_last_shard(out)
  before = os.path.getsize(root / "cat" / "img01.png")
  Image.new("RGB", (SIZE + 3, SIZE + 5), (200, 10, 10)).save(root / "cat" / "img01.png")
  assert os.path.getsize(root / "cat" / "img01.png") != before
  err = _fails(capsys, *common)
  assert (f"--out {out} holds shards of another version of --input folder:{root} (same listing; "
          "image files changed size since") in err, err
  assert sorted(os.listdir(out)) == left
  # an output written before precompute.json had the content fingerprint resumes
  _resume_as_recorded_without(out, "input_content", common)
  assert records.read_meta(out)["count"] == 3


def test_jsonl_reordered_with_the_same_count_is_refused(vae_dir, tmp_path, capsys):
  path = _jsonl_images(tmp_path, ["0", "1", "2"])
  out = str(tmp_path / "out")
  common = ["--input", f"jsonl:{path}", "--vae", vae_dir, "--out", out, "--size", str(SIZE),
            "--shard_size", "2"]
  _precompute(*common)
  assert records.read_meta(out)["caption_ids"] == {"min": 0, "max": 2}
  left = _kill_last_shard(out)
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(lines[::-1]) + "\n")
  assert "holds shards of another --input jsonl:" in _fails(capsys, *common)
  assert sorted(os.listdir(out)) == left


def test_latents_source_checks_the_largest_caption_id_at_setup(caption_latents, tmp_path):
  out, _, arr, ids = caption_latents
  meta = records.read_meta(out)
  assert meta["caption_ids"] == {"min": int(ids.min()), "max": int(ids.max())} and ids.max() == 6
  short = _save(tmp_path / "short", **{k: (v[:6] if len(v) == CAPTIONS else v)
                                       for k, v in arr.items()})
  msg = _error_line({"path": out, "text_embeds": short})
  assert msg == (f"data.text_embeds: {short}/embeds.npy has 6 captions, data.path {out}'s "
                 "records use caption ids up to 6 (embeddings of another caption file?)"), msg
  # an output written before meta.json had caption_ids still loads (checked per batch)
  old = str(tmp_path / "old")
  os.makedirs(old)
  for name in meta["shards"]:
    os.symlink(os.path.join(out, name), os.path.join(old, name))
  records.write_meta(old, {k: v for k, v in meta.items() if k != "caption_ids"})
  src = make_source({"name": "latents", "path": old, "text_embeds": short}, 0)
  with pytest.raises(ValueError, match="caption id 6 is outside embeds.npy's 6 captions"):
    src.batch(0, len(src))


@pytest.mark.parametrize("argv", [["-m", "launch.precompute", "--help"],
                                  ["-c", "import distill.data.latents"],
                                  ["-c", "import distill.data.prompts"]])
def test_precompute_and_data_modules_import_first_in_a_fresh_interpreter(argv):
  """`python -m launch.precompute ...` (the documented command) stopped with an ImportError
  traceback before parsing its flags: it imports distill.data.latents first, whose import of
  sources registers the datasets, and prompts then read names latents had not defined yet."""
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  r = subprocess.run([sys.executable, *argv], cwd=root, env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
