"""launch.encode_prompts writes what diffusers' pipelines encode: SD1.5, SDXL and SANA prompt
embeddings (and pooled, mask, null prompt, CLIP token ids) in caption-id order, atomically.

Tiny random CLIP / Gemma-2 encoders and tokenizers (vocabularies written here, no download) are
saved into a pipeline folder; the reference is the diffusers pipeline's own `encode_prompt`
(StableDiffusionPipeline, StableDiffusionXLPipeline, SanaPipeline built from the same
components) on all captions in one batch, the tool encodes in batches of 2. Tolerance: 1e-6
(float32 both sides; only the batch composition differs); float16 output equals the float32
reference cast to float16.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
tokenizers = pytest.importorskip("tokenizers")

from launch import encode_prompts  # noqa: E402
from tests._tool_utils import one_error_line  # noqa: E402

pytestmark = pytest.mark.torch

WORDS = ["a", "cat", "the", "dog", "on", "mat", "red", "sat", "big", "of", "photo"]
CAPTIONS = ["a photo of a cat", "The big RED dog  ", "", "a cat sat on the mat",
            "a big red cat sat on the mat " * 5]  # the last is longer than 77 CLIP tokens
TOL = dict(rtol=1e-6, atol=1e-6)


def _clip_tokenizer(path: str, pad: str) -> None:
  """A character-level CLIP BPE vocabulary with a few merges (SDXL's 2nd tokenizer pads "!")."""
  os.makedirs(path, exist_ok=True)
  chars = list("abcdefghijklmnopqrstuvwxyz.,!'")
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  merges = ["t h</w>", "c a", "ca t</w>", "a t</w>"]
  for m in merges:
    vocab["".join(m.split())] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  with open(os.path.join(path, "vocab.json"), "w") as f:
    json.dump(vocab, f)
  with open(os.path.join(path, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = transformers.CLIPTokenizer(os.path.join(path, "vocab.json"),
                                   os.path.join(path, "merges.txt"), pad_token=pad,
                                   model_max_length=77)
  tok.save_pretrained(path)


def _clip_config(vocab: int, width: int, **kw):
  return transformers.CLIPTextConfig(
      vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab - 2,
      eos_token_id=vocab - 1, pad_token_id=vocab - 1, **kw)


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
  """tokenizer + text_encoder (CLIPTextModel, width 16) and tokenizer_2 + text_encoder_2
  (CLIPTextModelWithProjection, width 24, projection 20): SD1.5 uses the first pair."""
  root = str(tmp_path_factory.mktemp("sdxl"))
  _clip_tokenizer(os.path.join(root, "tokenizer"), "<|endoftext|>")
  _clip_tokenizer(os.path.join(root, "tokenizer_2"), "!")
  vocab = len(transformers.CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer")))
  torch.manual_seed(0)
  transformers.CLIPTextModel(_clip_config(vocab, 16)).save_pretrained(
      os.path.join(root, "text_encoder"))
  transformers.CLIPTextModelWithProjection(_clip_config(vocab, 24, projection_dim=20)) \
      .save_pretrained(os.path.join(root, "text_encoder_2"))
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True},
              f)
  return root


@pytest.fixture(scope="module")
def sana_dir(tmp_path_factory):
  """A word-level tokenizer adding <bos> (as Gemma's) and a tiny random Gemma2Model."""
  from tokenizers import models, pre_tokenizers, processors
  root = str(tmp_path_factory.mktemp("sana"))
  vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"] + WORDS)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                     special_tokens=[("<bos>", 2)])
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
      unk_token="<unk>").save_pretrained(os.path.join(root, "tokenizer"))
  config = transformers.Gemma2Config(
      vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512,
      pad_token_id=0, eos_token_id=1, bos_token_id=2)
  torch.manual_seed(1)
  transformers.Gemma2Model(config).save_pretrained(os.path.join(root, "text_encoder"))
  return root


def _jsonl(path, order) -> str:
  """Caption i written as caption_id i, lines in `order` (with a repeat and a blank line)."""
  lines = [json.dumps({"image": f"{i}.png", "caption_id": i, "caption": CAPTIONS[i]})
           for i in order]
  with open(path, "w") as f:
    f.write("\n".join(lines + ["", lines[0]]) + "\n")
  return str(path)


def _run(*args) -> None:
  assert encode_prompts.main([str(a) for a in args]) == 0


def _load(out) -> dict:
  return {f[:-4]: np.load(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".npy")}


def _clip_parts(root: str, names: tuple[str, ...]) -> dict:
  t = transformers
  parts = {"tokenizer": t.CLIPTokenizer, "tokenizer_2": t.CLIPTokenizer,
           "text_encoder": t.CLIPTextModel, "text_encoder_2": t.CLIPTextModelWithProjection}
  return {n: parts[n].from_pretrained(os.path.join(root, n)) for n in names}


def test_encode_prompts_sd15_equals_pipeline_in_caption_id_order(sdxl_dir, tmp_path, capsys):
  out = tmp_path / "sd15"
  captions = _jsonl(tmp_path / "c.jsonl", [3, 0, 4, 2, 1])
  _run("--kind", "sd15", "--pipeline", sdxl_dir, "--captions", captions, "--out", out,
       "--batch", 2)
  got = _load(out)
  assert sorted(got) == ["clip_tokens", "embeds", "null"]
  pipe = diffusers.StableDiffusionPipeline(
      vae=None, unet=None, scheduler=None, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False, **_clip_parts(sdxl_dir, ("tokenizer", "text_encoder")))
  with torch.no_grad():
    want, null = pipe.encode_prompt(CAPTIONS, "cpu", 1, True, negative_prompt=[""] * 5)
  assert got["embeds"].shape == (5, 77, 16) and got["embeds"].dtype == np.float32
  np.testing.assert_allclose(got["embeds"], want.numpy(), **TOL)
  np.testing.assert_allclose(got["null"], null[0].numpy(), **TOL)
  ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(got["clip_tokens"], np.asarray(ids, np.int32))
  assert json.loads((out / "captions.json").read_text()) == CAPTIONS
  meta = json.loads((out / "meta.json").read_text())
  assert meta["count"] == 5 and meta["truncated"] == 1 and meta["kind"] == "sd15"
  # an existing output is never replaced without --overwrite (one line, nothing touched)
  capsys.readouterr()
  assert encode_prompts.main(["--kind", "sd15", "--pipeline", sdxl_dir, "--captions", captions,
                              "--out", str(out), "--dtype", "float16"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--overwrite" in err[0], err
  assert np.load(out / "embeds.npy").dtype == np.float32
  _run("--kind", "sd15", "--pipeline", sdxl_dir, "--captions", captions, "--out", out,
       "--dtype", "float16", "--overwrite")
  half = _load(out)
  assert half["embeds"].dtype == np.float16 and half["clip_tokens"].dtype == np.int32
  np.testing.assert_array_equal(half["embeds"], got["embeds"].astype(np.float16))
  assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.old")


def test_encode_prompts_sdxl_equals_pipeline(sdxl_dir, tmp_path):
  out = tmp_path / "sdxl"
  captions = CAPTIONS + ["a cat\u2028on a\rmat"]  # only "\n" ends a line of a text file
  with open(tmp_path / "c.txt", "w", encoding="utf-8", newline="") as f:
    f.write("\n".join(captions) + "\r\n")  # id = line number - 1
  _run("--kind", "sdxl", "--pipeline", sdxl_dir, "--captions", tmp_path / "c.txt", "--out", out,
       "--batch", 2)
  got = _load(out)
  assert sorted(got) == ["clip_tokens", "embeds", "null", "null_pooled", "pooled"]
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=None, unet=None, scheduler=None, force_zeros_for_empty_prompt=False,
      **_clip_parts(sdxl_dir, ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")))
  with torch.no_grad():
    want, null, pooled, null_pooled = pipe.encode_prompt(captions, device="cpu",
                                                         negative_prompt=[""] * 6)
  assert got["embeds"].shape == (6, 77, 16 + 24) and got["pooled"].shape == (6, 20)
  np.testing.assert_allclose(got["embeds"], want.numpy(), **TOL)
  np.testing.assert_allclose(got["pooled"], pooled.numpy(), **TOL)
  np.testing.assert_allclose(got["null"], null[0].numpy(), **TOL)
  np.testing.assert_allclose(got["null_pooled"], null_pooled[0].numpy(), **TOL)
  meta = json.loads((out / "meta.json").read_text())
  assert meta["force_zeros_for_empty_prompt"] is True
  assert json.loads((out / "captions.json").read_text()) == captions


@pytest.mark.parametrize("instruction", [False, True])
def test_encode_prompts_sana_equals_pipeline(sana_dir, sdxl_dir, tmp_path, instruction):
  out = tmp_path / "sana"
  flags = ["--complex_human_instruction"] if instruction else []
  _run("--kind", "sana", "--pipeline", sana_dir, "--captions",
       _jsonl(tmp_path / "c.jsonl", [4, 1, 0, 3, 2]), "--out", out, "--batch", 2,
       "--max_sequence_length", 12, "--clip_tokenizer", os.path.join(sdxl_dir, "tokenizer"),
       *flags)
  got = _load(out)
  assert sorted(got) == ["clip_tokens", "embeds", "mask", "null", "null_mask"]
  pipe = diffusers.SanaPipeline(
      vae=None, transformer=None, scheduler=None,
      tokenizer=transformers.AutoTokenizer.from_pretrained(os.path.join(sana_dir, "tokenizer")),
      text_encoder=transformers.AutoModel.from_pretrained(os.path.join(sana_dir, "text_encoder")))
  chi = encode_prompts.sana_instruction().split("\n") if instruction else None
  with torch.no_grad():
    want, mask, null, null_mask = pipe.encode_prompt(
        CAPTIONS, negative_prompt="", device="cpu", max_sequence_length=12,
        complex_human_instruction=chi)
  assert got["embeds"].shape == (5, 12, 16) and got["mask"].shape == (5, 12)
  np.testing.assert_allclose(got["embeds"], want.numpy(), **TOL)
  np.testing.assert_array_equal(got["mask"], mask.numpy())
  np.testing.assert_allclose(got["null"], null[0].numpy(), **TOL)
  np.testing.assert_array_equal(got["null_mask"], null_mask[0].numpy())
  assert got["null_mask"].sum() == 1 and (instruction or got["mask"][1].sum() == 5)  # <bos> +4
  clip = transformers.CLIPTokenizer.from_pretrained(os.path.join(sdxl_dir, "tokenizer"))
  ids = clip(CAPTIONS, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(got["clip_tokens"], np.asarray(ids, np.int32))


def test_encode_prompts_failures_leave_no_output(sdxl_dir, sana_dir, tmp_path, capsys,
                                                 monkeypatch):
  out = tmp_path / "o"
  base = ["--kind", "sd15", "--pipeline", sdxl_dir, "--out", str(out)]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"caption_id": 0, "caption": "a cat"}) + "\n{\"caption_id\": 1}\n")
  assert encode_prompts.main(base + ["--captions", str(bad)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "line 2" in err[0] and "caption" in err[0], err
  gap = tmp_path / "gap.jsonl"
  gap.write_text(json.dumps({"caption_id": 1, "caption": "a cat"}) + "\n")
  assert encode_prompts.main(base + ["--captions", str(gap)]) == 2
  assert "id 0 is missing" in capsys.readouterr().err
  good = _jsonl(tmp_path / "c.jsonl", range(5))
  assert encode_prompts.main(["--kind", "sdxl", "--pipeline", str(tmp_path), "--captions", good,
                              "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--tokenizer" in err[0], err
  # The kind must match the encoders: a SANA pipeline is not encoded as SD1.5, nor the reverse.
  clip = encode_prompts.CLIP_TYPE
  for kind, pipeline, found in (("sd15", sana_dir, "gemma2"), ("sana", sdxl_dir, clip)):
    assert encode_prompts.main(["--kind", kind, "--pipeline", pipeline, "--captions", good,
                                "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--kind {kind}" in err[0] and repr(found) in err[0], err
  calls = []

  def failing(models, texts):
    calls.append(len(texts))
    if len(calls) > 2:  # the null prompt, one chunk, then the failure mid-run
      raise ValueError("encoder failed")
    return real(models, texts)

  real = encode_prompts.encode_sd15
  monkeypatch.setattr(encode_prompts, "encode_sd15", failing)
  assert encode_prompts.main(base + ["--captions", good, "--batch", "2"]) == 2
  assert "encoder failed" in capsys.readouterr().err and len(calls) == 3
  assert not out.exists() and not (tmp_path / "o.partial").exists()


def _fails(capsys, *args) -> str:
  """The one stderr line of an encode_prompts run that exits 2."""
  return one_error_line(capsys, encode_prompts.main, *args)


def test_json_lines_are_read_as_jsonl_whatever_the_file_name(sdxl_dir, tmp_path):
  lines = _jsonl(tmp_path / "c.jsonl", [3, 0, 4, 2, 1])
  for name in ("caps.txt", "caps.JSONL", "captions"):
    (tmp_path / name).write_text(open(lines).read())
    assert encode_prompts.read_captions(str(tmp_path / name)) == CAPTIONS, name
  # a text file stays one caption per line, even with braces or JSON that is no caption object
  plain = ["{a cat}", '{"image": "x.png"}', "[1, 2]", "a dog"]
  (tmp_path / "plain.txt").write_text("\n".join(plain) + "\n")
  assert encode_prompts.read_captions(str(tmp_path / "plain.txt")) == plain
  out = tmp_path / "out"
  _run("--kind", "sd15", "--pipeline", sdxl_dir, "--captions", tmp_path / "caps.txt",
       "--out", out)
  assert json.loads((out / "captions.json").read_text()) == CAPTIONS


@pytest.mark.parametrize("bad", ["-1", "1.7", '"3"', "true"])
def test_caption_ids_must_be_non_negative_integers(tmp_path, capsys, bad):
  path = tmp_path / "c.jsonl"
  path.write_text('{"caption_id": 0, "caption": "a cat"}\n'
                  f'{{"caption_id": {bad}, "caption": "a dog"}}\n')
  out = tmp_path / "out"
  err = _fails(capsys, "--kind", "sd15", "--pipeline", tmp_path, "--captions", path, "--out", out)
  assert f"--captions {path} line 2: " in err and \
      f"caption_id must be an integer >= 0, got {json.loads(bad)!r}" in err, err
  assert not out.exists()


def _tree(root) -> dict:
  """Every file under `root` with its bytes."""
  return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
          for d, _, files in os.walk(root) for f in files}


def test_overwrite_replaces_only_a_previous_output(sdxl_dir, tmp_path, capsys):
  captions = _jsonl(tmp_path / "c.jsonl", range(5))
  latents = tmp_path / "latents"   # what launch.precompute writes
  latents.mkdir()
  (latents / "meta.json").write_text(json.dumps({"format": "distill-latents/1",
                                                 "kind": "mean_std"}))
  (latents / "latents-00000-of-00001.array_record").write_bytes(b"records")
  other = tmp_path / "other"       # a folder without meta.json (e.g. a pipeline)
  other.mkdir()
  (other / "model_index.json").write_text("{}")
  plain = tmp_path / "file.npy"
  plain.write_bytes(b"not a directory")
  for out, why in ((latents, "its meta.json has kind 'mean_std', not one of sd15, sdxl, sana"),
                   (other, "no meta.json with a kind of sd15, sdxl, sana"),
                   (plain, "not a directory")):
    before = _tree(out) if out.is_dir() else out.read_bytes()
    err = _fails(capsys, "--kind", "sd15", "--pipeline", sdxl_dir, "--captions", captions,
                 "--out", out, "--overwrite")
    assert err == (f"error: --out {out}: not a launch.encode_prompts output ({why}); "
                   "--overwrite replaces only those, so it is left untouched: choose another "
                   "--out"), err
    assert (_tree(out) if out.is_dir() else out.read_bytes()) == before
    assert not os.path.exists(f"{out}.partial") and not os.path.exists(f"{out}.old")
