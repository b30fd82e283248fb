"""CLIP: parity with transformers' CLIPModel (tiny random configs), strict conversion, CLIP's
image preprocessing against CLIPImageProcessorPil, and the CLIP score.

Runs on CPU in float32 with jax_default_matmul_precision="highest" (tests/conftest.py). Tiny
configs (hidden 32, 2 layers, 4 heads, 32x32 images in 8x8 patches) with every parameter random
(transformers' init, logit_scale included), in two variants: the legacy `eos_token_id == 2`
(EOS pooled at the argmax of the ids) with quick_gelu, and `eos_token_id = 50` (first EOS,
*not* the largest id, so the two rules pick different positions) with exact gelu in the text
tower.

Tolerances:
  * image / text embeds: 1e-5 relative to the largest magnitude (float32 on both sides, sums in
    different orders through 2 layers; measured 2.2e-7 image, 4.6e-7 text).
  * clip score: 1e-4 absolute on a 0..100 scale (cosines from the embeds above; measured
    1.6e-5).
  * preprocessing vs CLIPImageProcessorPil: 0.02 absolute in normalised units. PIL rounds the
    resized image to 8 bits (one level = 1/255/std = 0.0146); measured max 0.0141.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from distill.metrics import clip  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5
VOCAB, T = 100, 12


def _config(eos: int, text_act: str):
  text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, hidden_act=text_act,
              eos_token_id=eos, bos_token_id=0, pad_token_id=1)
  vision = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, hidden_act="quick_gelu")
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)


VARIANTS = {"legacy_eos": (2, "quick_gelu"), "first_eos": (50, "gelu")}


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  torch.manual_seed(0)
  torch.set_num_threads(2)
  model = transformers.CLIPModel(_config(*VARIANTS[name])).eval()
  with torch.no_grad():  # random everywhere (LN scales / biases too)
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape))
  module, variables = clip.from_transformers(model)
  return model, module, variables


def _ids(n: int, seed: int = 0) -> np.ndarray:
  """Prompts of random ids in [51, 99] with an EOS (50) at varying positions, then padding 50;
  a larger id after the EOS makes `argmax(ids)` differ from the first EOS."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(51, VOCAB, (n, T))
  for i in range(n):
    j = 2 + i % (T - 4)
    ids[i, j:] = 50
    ids[i, j + 1] = 99
  return ids.astype(np.int32)


def _images(n: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, 32, 32, 3)).astype(np.float32)


def _rel_err(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_embeds_and_score_match_transformers(name):
  model, module, variables = _setup(name)
  images, ids = _images(5), _ids(5)
  pixels = torch.from_numpy(np.asarray(clip.preprocess(images, 32)).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=pixels)
    img_ref = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    txt_ref = model.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output.numpy()
  scorer = clip.CLIPScorer(module, variables, batch_size=4)  # 5 pairs: a padded last batch
  ours = scorer.outputs(images, ids)
  err_img, err_txt = _rel_err(ours["image_embeds"], img_ref), _rel_err(ours["text_embeds"], txt_ref)
  assert err_img < TOL and err_txt < TOL, (err_img, err_txt)
  # torchmetrics: max(100 * mean cos, 0), cos of the (normalised) CLIPModel embeds.
  cos = (out.image_embeds * out.text_embeds).sum(-1).numpy()
  np.testing.assert_allclose(ours["clip_score"], 100 * cos, atol=1e-4)
  assert clip.score_from_pairs(ours["clip_score"]) == pytest.approx(max(100 * cos.mean(), 0.0),
                                                                    abs=1e-4)


def test_score_clamps_the_mean_not_each_pair():
  assert clip.score_from_pairs([30.0, -10.0]) == pytest.approx(10.0)
  assert clip.score_from_pairs([5.0, -10.0]) == 0.0


def test_strict_conversion_and_directory_load(tmp_path):
  model, module, variables = _setup("legacy_eos")
  model.save_pretrained(tmp_path / "clip")  # config.json + model.safetensors
  loaded_module, loaded = clip.load(str(tmp_path / "clip"))
  assert loaded_module.cfg == module.cfg
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, variables)
  sd = dict(model.state_dict())
  del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
  sd["text_model.extra.weight"] = torch.zeros(2)
  sd["visual_projection.weight"] = torch.zeros(3, 3)
  with pytest.raises(ValueError) as e:
    clip.from_state_dict(model.config, sd, what="my_clip.safetensors")
  msg = str(e.value)
  assert "my_clip.safetensors" in msg and "layers.1.mlp.fc2.bias" in msg
  assert "text_model.extra.weight" in msg and "visual_projection.weight" in msg
  with pytest.raises(FileNotFoundError, match="never downloaded"):
    clip.load(str(tmp_path / "absent"))


def test_preprocess_matches_clip_image_processor():
  pil = pytest.importorskip("PIL")
  del pil
  proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                            crop_size={"height": 32, "width": 32})
  rng = np.random.default_rng(0)
  for h, w in ((48, 40), (36, 64)):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([127 + 100 * np.sin(yy / 5.0 + c) * np.cos(xx / 7.0) for c in range(3)], -1)
    img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
    ref = proc(images=[img], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(clip.preprocess(img[None].astype(np.float32) / 127.5 - 1, 32))[0]
    assert ours.shape == (32, 32, 3)
    np.testing.assert_allclose(ours, ref, atol=0.02)
