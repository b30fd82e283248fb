"""DiT parity with diffusers' DiTTransformer2DModel and strict weight conversion.

Tolerances: float32 on CPU at "highest" matmul precision; both sides do the same float32 math
in a different order, so outputs and input gradients agree to ~1e-6 relative. We assert 2e-5
relative to the largest magnitude (a mapping error gives O(1)).
"""
import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from models.convert import (from_diffusers, load_diffusers_dir, save_diffusers_dir,  # noqa: E402
                            to_diffusers)
from models.convert.common import check_keys, load_torch_file  # noqa: E402
from models.convert.dit import (CONVERTER, diffusers_to_original, from_original,  # noqa: E402
                                to_original)
from models.convert.registry import CONVERTERS  # noqa: E402
from models.dit import sincos_pos_embed  # noqa: E402

pytestmark = pytest.mark.torch

RTOL = 2e-5

CONFIGS = {
    # learn_sigma (out = 2C), patch 2, 2 layers.
    "p2_d2_sigma": dict(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                        num_embeds_ada_norm=10),
    # patch 4, 1 layer, 4 heads, no learn_sigma.
    "p4_d1": dict(num_attention_heads=4, attention_head_dim=8, in_channels=4, num_layers=1,
                  sample_size=16, patch_size=4, num_embeds_ada_norm=5),
    # 3 layers, exact GELU, affine norm3, no qkv bias, 1000 classes.
    "p2_d3_variants": dict(num_attention_heads=3, attention_head_dim=16, in_channels=4,
                           out_channels=8, num_layers=3, sample_size=8, patch_size=2,
                           num_embeds_ada_norm=1000, activation_fn="gelu",
                           norm_elementwise_affine=True, attention_bias=False),
}


def random_dit(cfg, seed=0, std=0.05):
  """A diffusers DiT with every parameter drawn at random (zero-init layers hide bugs)."""
  torch.manual_seed(seed)
  model = diffusers.DiTTransformer2DModel(**cfg)
  with torch.no_grad():
    for p in model.parameters():
      torch.nn.init.normal_(p, std=std)
  return model.eval()


def inputs(cfg, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  s, c = cfg["sample_size"], cfg.get("in_channels", 4)
  x = rng.standard_normal((batch, c, s, s)).astype(np.float32)
  t = np.array([3.0, 567.0][:batch], np.float32)
  y = np.array([1, cfg["num_embeds_ada_norm"]][:batch], np.int64)  # a class and the null class
  return x, t, y


def torch_forward(model, x, t, y):
  return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("name,scan", [(n, False) for n in sorted(CONFIGS)]
                         + [("p2_d3_variants", True)])
def test_parity_outputs_and_input_gradients(name, scan):
  cfg = CONFIGS[name]
  tm = random_dit(cfg)
  module, variables = from_diffusers(tm, scan_blocks=scan)
  x, t, y = inputs(cfg)
  w = np.random.default_rng(2).standard_normal(
      (2, module.output_channels, cfg["sample_size"], cfg["sample_size"])).astype(np.float32)

  xt = torch.from_numpy(x).requires_grad_(True)
  out_t = tm(xt, torch.from_numpy(t), torch.from_numpy(y)).sample
  (out_t * torch.from_numpy(w)).sum().backward()

  xj = jnp.asarray(x.transpose(0, 2, 3, 1))
  wj = jnp.asarray(w.transpose(0, 2, 3, 1))

  def loss(x):
    out = module.apply(variables, x, jnp.asarray(t), jnp.asarray(y))
    return jnp.sum(out * wj), out

  (_, out_j), grad_j = jax.jit(jax.value_and_grad(loss, has_aux=True))(xj)

  assert out_j.shape == (2, cfg["sample_size"], cfg["sample_size"], module.output_channels)
  assert rel_err(nchw(out_j), out_t.detach().numpy()) < RTOL
  assert rel_err(nchw(grad_j), xt.grad.numpy()) < RTOL


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_bit_identical(scan):
  tm = random_dit(CONFIGS["p2_d3_variants"])
  module, variables = from_diffusers(tm, scan_blocks=scan)
  back = to_diffusers(module, variables)
  sd0, sd1 = tm.state_dict(), back.state_dict()
  assert sorted(sd0) == sorted(sd1)
  for k in sd0:
    assert sd0[k].dtype == sd1[k].dtype and torch.equal(sd0[k], sd1[k]), k


def test_bf16_round_trip_is_bit_identical():
  tm = random_dit(CONFIGS["p4_d1"]).to(torch.bfloat16)
  module, variables = from_diffusers(tm)
  assert module.param_dtype == jnp.bfloat16
  assert variables["params"]["proj_out_2"]["kernel"].dtype == jnp.bfloat16
  back = to_diffusers(module, variables)
  for k, v in tm.state_dict().items():
    assert back.state_dict()[k].dtype == torch.bfloat16 and torch.equal(back.state_dict()[k], v)


def test_save_dir_loads_in_diffusers_and_back(tmp_path):
  cfg = CONFIGS["p2_d2_sigma"]
  tm = random_dit(cfg)
  module, variables = from_diffusers(tm)
  save_diffusers_dir(module, variables, str(tmp_path / "dit"))
  loaded = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "dit")).eval()
  x, t, y = inputs(cfg)
  with torch.no_grad():
    assert torch.equal(torch_forward(loaded, x, t, y), torch_forward(tm, x, t, y))
  module2, variables2 = load_diffusers_dir(str(tmp_path / "dit"))
  assert module2 == module.clone(out_channels=8)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, variables)


def test_sharded_dir_loads(tmp_path):
  tm = random_dit(CONFIGS["p2_d2_sigma"])
  tm.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert any(f.endswith(".safetensors.index.json") for f in os.listdir(tmp_path))
  _, variables = load_diffusers_dir(str(tmp_path))
  _, ref = from_diffusers(tm)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, ref)


def test_bad_state_dict_names_every_key():
  tm = random_dit(CONFIGS["p2_d2_sigma"])
  sd = dict(tm.state_dict())
  del sd["proj_out_2.bias"]
  sd["transformer_blocks.0.attn1.extra.weight"] = torch.zeros(3)
  sd["transformer_blocks.1.attn1.to_q.weight"] = torch.zeros(5, 16)
  with pytest.raises(ValueError) as e:
    CONVERTER.from_config_state(dict(tm.config), sd)
  msg = str(e.value)
  for key in ("proj_out_2.bias", "transformer_blocks.0.attn1.extra.weight",
              "transformer_blocks.1.attn1.to_q.weight"):
    assert key in msg
  assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def test_bad_dir_raises(tmp_path):
  tm = random_dit(CONFIGS["p2_d2_sigma"])
  tm.save_pretrained(str(tmp_path))
  cfg = json.loads((tmp_path / "config.json").read_text())
  cfg["num_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="transformer_blocks.2"):
    load_diffusers_dir(str(tmp_path))


def test_check_keys_lists_all():
  with pytest.raises(ValueError) as e:
    check_keys({"a": (1,), "b": (2,), "c": (3,)}, {"b": (2,), "c": (4,), "d": (1,)})
  msg = str(e.value)
  assert "a" in msg and "d" in msg and "c expected (3,) got (4,)" in msg


def test_pt_pickle_with_objects_is_rejected(tmp_path):
  bad = tmp_path / "train_ckpt.pt"
  torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1.0)}, str(bad))
  with pytest.raises(ValueError, match="train_ckpt.pt"):
    load_torch_file(str(bad))
  mixed = tmp_path / "mixed.pt"
  torch.save({"w": torch.zeros(2), "step": 5}, str(mixed))
  with pytest.raises(ValueError, match="mixed.pt.*step"):
    load_torch_file(str(mixed))
  good = tmp_path / "good.pt"
  torch.save({"ema": {"w": torch.ones(2)}, "steps": 3}, str(good))
  assert torch.equal(load_torch_file(str(good), key="ema")["w"], torch.ones(2))


def _share_block_embedders(tm):
  """Original DiT has one t/y embedder; diffusers copies it into every block."""
  sd = tm.state_dict()
  with torch.no_grad():
    for k, v in sd.items():
      if k.startswith("transformer_blocks.") and ".norm1.emb." in k:
        v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
  return tm


def test_original_layout_matches_diffusers_route(tmp_path):
  cfg = CONFIGS["p2_d2_sigma"]
  tm = _share_block_embedders(random_dit(cfg))
  module, ref = from_diffusers(tm)
  orig = diffusers_to_original(tm.state_dict(), cfg["num_layers"])
  orig["pos_embed"] = sincos_pos_embed(16, 4, 4, 4)[None]
  path = tmp_path / "DiT-tiny.pt"
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in orig.items()}, str(path))
  module2, variables = from_original(load_torch_file(str(path)), num_attention_heads=2)
  assert module2 == module
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, ref)
  # Our inverse mapping gives back the same original-layout tensors.
  back = to_original(module, ref)
  assert sorted(back) == sorted(orig)
  for k in orig:
    np.testing.assert_array_equal(back[k], np.asarray(orig[k]), err_msg=k)
  # Strict: a missing original key is named.
  del orig["blocks.1.attn.qkv.bias"]
  with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
    from_original(orig, num_attention_heads=2)


def test_sincos_matches_diffusers_non_square():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  ref = get_2d_sincos_pos_embed(32, (3, 5), base_size=4, output_type="pt").float().numpy()
  np.testing.assert_allclose(sincos_pos_embed(32, 3, 5, 4), ref, rtol=0, atol=1e-6)


def test_registry_and_export_guard():
  assert "DiTTransformer2DModel" in CONVERTERS
  tm = random_dit(CONFIGS["p4_d1"])
  module, variables = from_diffusers(tm)
  with pytest.raises(ValueError, match="qk_norm"):
    to_diffusers(module.clone(qk_norm=True), variables)
