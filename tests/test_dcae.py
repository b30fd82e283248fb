"""DC-AE (AutoencoderDC): parity with diffusers and strict conversion, both ways.

Runs on CPU in float32 with jax_default_matmul_precision="highest" (tests/conftest.py).
Every torch parameter and BatchNorm running statistic is randomised first (weights and biases
~ N(0, 0.1^2), norm scales and running variances ~ 1 + N(0, 0.1^2)), so zero- or one-initialised
layers cannot hide a mapping error.

Tolerances (relative to the reference's largest magnitude): encode, decode and the decode
input-gradient agree to 1e-5. Both sides compute in float32 but sum convolutions and matmuls in
different orders (oneDNN vs XLA); measured at most 7.4e-7. A mapping error gives O(1).

The two configs cover: ResBlocks and EfficientViT blocks, one and two attention scales, the
linear (more pixels than head_dim) and the quadratic (fewer) attention branch, rms_norm and
batch_norm, SiLU and ReLU blocks, nearest-interpolate and pixel-shuffle up blocks, strided-conv
and pixel-unshuffle down blocks, and a first stage with 0 layers (conv_in / conv_out are then
shortcut-free down / up blocks).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from models.convert import from_diffusers, load_diffusers_dir, to_diffusers  # noqa: E402
from models.convert import dcae as dcae_convert  # noqa: E402
from models.dcae import AutoencoderDC, pixel_shuffle, pixel_unshuffle  # noqa: E402
from models.registry import build_model  # noqa: E402
from tests._torch_random import randomize_torch  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5

# name -> (diffusers AutoencoderDC kwargs, image side)
CONFIGS = {
    # SANA's DC-AE layout: ResBlocks then EfficientViT blocks, interpolate up, strided-conv down.
    "sana_like": (dict(
        in_channels=3, latent_channels=4, attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate", downsample_block_type="Conv",
        scaling_factor=0.41407), 8),
    # dc-ae-in-1.0-like decoder: batch_norm + ReLU stages, pixel (un)shuffle, 0-layer first
    # stage, two attention scales on a 2x2 latent (quadratic branch); ResBlock-only encoder.
    "batchnorm_shuffle": (dict(
        in_channels=3, latent_channels=8, attention_head_dim=8,
        encoder_block_types="ResBlock",
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32), decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(0, 1, 1), decoder_layers_per_block=(0, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), (3, 5)),
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu")), 8),
}



# The parity programs run for milliseconds: compile them with XLA's CPU backend optimisations
# off, which halves the compile time (the bulk of these tests' cost) and keeps the float32 math.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
  """`jax.jit(fn)` compiled for `args` with FAST_COMPILE; call it with the same args."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def random_dcae(name: str, seed: int = 0, std: float = 0.1):
  """A diffusers AutoencoderDC of config `name` with every parameter and statistic random."""
  kwargs, _ = CONFIGS[name]
  torch.manual_seed(seed)
  model = diffusers.AutoencoderDC(**kwargs).eval()
  return randomize_torch(model, seed, std, buffers=True)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  tm = random_dcae(name)
  module, variables = from_diffusers(tm)
  return tm, module, variables, CONFIGS[name][1]


def _nchw(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_decode_and_decode_gradient_match_diffusers(name):
  tm, module, variables, side = _setup(name)
  rng = np.random.default_rng(1)
  s = side // module.downscale
  x = rng.uniform(-1, 1, (2, side, side, 3)).astype(np.float32)
  z = rng.standard_normal((2, s, s, module.latent_channels)).astype(np.float32)
  w = rng.standard_normal((2, side, side, 3)).astype(np.float32)

  ref_enc = tm.encode(torch.from_numpy(_nchw(x))).latent.detach().numpy()
  zt = torch.from_numpy(_nchw(z)).requires_grad_(True)
  ref_dec = tm.decode(zt).sample
  (ref_dec * torch.from_numpy(_nchw(w))).sum().backward()

  def run(variables, x, z):
    apply = functools.partial(module.apply, variables)
    enc = apply(x, method="encode")

    def loss(z):
      dec = apply(z, method="decode")
      return jnp.sum(dec * w), dec
    (_, dec), grad = jax.value_and_grad(loss, has_aux=True)(z)
    return enc, dec, grad

  enc, dec, grad = _compile(run, variables, x, z)(variables, x, z)
  assert enc.shape == (2, s, s, module.latent_channels) and dec.shape == x.shape
  assert rel_err(_nchw(enc), ref_enc) < TOL
  assert rel_err(_nchw(dec), ref_dec.detach().numpy()) < TOL
  assert rel_err(_nchw(grad), zt.grad.numpy()) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(name):
  tm, module, variables, _ = _setup(name)
  assert ("batch_stats" in variables) == (name == "batchnorm_shuffle")
  back = to_diffusers(module, variables)
  ref, got = tm.state_dict(), back.state_dict()
  assert sorted(ref) == sorted(got)
  for k in ref:
    assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
  for k, v in tm.config.items():
    if not k.startswith("_"):
      assert back.config[k] == v, k


def test_missing_unexpected_and_misshaped_keys_raise_one_error_naming_them():
  tm, module, _, _ = _setup("batchnorm_shuffle")
  state = dict(tm.state_dict())
  del state["decoder.up_blocks.1.1.norm.running_var"]
  state["decoder.up_blocks.2.0.attn.extra.weight"] = torch.zeros(3)
  state["decoder.up_blocks.2.0.attn.to_qkv_multiscale.1.proj_in.weight"] = torch.zeros(
      96, 1, 3, 3)
  with pytest.raises(ValueError) as err:
    dcae_convert.variables_from_state_dict_dc(module, state)
  msg = str(err.value)
  assert "decoder.up_blocks.1.1.norm.running_var" in msg
  assert "decoder.up_blocks.2.0.attn.extra.weight" in msg
  assert "decoder.up_blocks.2.0.attn.to_qkv_multiscale.1.proj_in.weight" in msg
  assert "(96, 1, 5, 5)" in msg
  # The BatchNorm counters are accepted but nothing else extra is.
  with pytest.raises(ValueError, match="encoder.conv_in.conv.num_batches_tracked"):
    dcae_convert.variables_from_state_dict_dc(
        module, dict(tm.state_dict(), **{"encoder.conv_in.conv.num_batches_tracked":
                                         torch.tensor(0)}))


def test_unsupported_config_raises_naming_the_key():
  base, _ = CONFIGS["sana_like"]
  with pytest.raises(ValueError, match="decoder_norm_types entry 'layer_norm'"):
    dcae_convert.module_from_config(dict(base, decoder_norm_types="layer_norm"))
  with pytest.raises(ValueError, match="encoder_block_types entry 'AttnBlock'"):
    dcae_convert.module_from_config(dict(base, encoder_block_types="AttnBlock"))
  with pytest.raises(ValueError, match="decoder_act_fns"):
    dcae_convert.module_from_config(dict(base, decoder_act_fns=("silu",)))
  with pytest.raises(ValueError, match="relu6"):
    dcae_convert.module_from_config(dict(base, decoder_conv_act_fn="relu6"))


def test_diffusers_directory_loads(tmp_path):
  tm, module, variables, _ = _setup("batchnorm_shuffle")
  tm.save_pretrained(str(tmp_path))
  loaded, loaded_vars = load_diffusers_dir(str(tmp_path))
  assert loaded == module
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_vars, variables)


def test_pixel_shuffle_matches_torch_and_inverts():
  x = np.random.default_rng(0).standard_normal((2, 4, 6, 12)).astype(np.float32)
  ref = torch.nn.functional.pixel_shuffle(torch.from_numpy(_nchw(x)), 2).numpy()
  np.testing.assert_array_equal(_nchw(pixel_shuffle(x)), ref)
  ref = torch.nn.functional.pixel_unshuffle(torch.from_numpy(_nchw(x)), 2).numpy()
  np.testing.assert_array_equal(_nchw(pixel_unshuffle(x)), ref)
  np.testing.assert_array_equal(pixel_shuffle(pixel_unshuffle(x)), x)


def test_latent_scaling():
  _, module, _, _ = _setup("sana_like")
  z = jnp.arange(8.0).reshape(1, 2, 1, 4)
  np.testing.assert_allclose(module.scale_latents(z), z * 0.41407, rtol=1e-6)
  np.testing.assert_allclose(module.unscale_latents(module.scale_latents(z)), z, rtol=1e-6)


def test_registry_and_overrides():
  tm, _, _, _ = _setup("sana_like")
  assert isinstance(build_model("dcae", latent_channels=8), AutoencoderDC)
  module, variables = from_diffusers(tm, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                     remat="full")
  assert module.dtype == jnp.bfloat16 and module.remat == "full"
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(variables))
  assert module.downscale == 2 and module.diffusers_class == "AutoencoderDC"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_per_example_matches_xla_cost_analysis(name):
  """The analytic count against XLA's count of the compiled encode / decode, at 16x the config's
  side (at the configs' own 8-px sides most 3x3 taps fall on padding, which XLA does not count:
  0.6-0.9x). XLA also counts norms and activations: measured 0.99-1.07x; bound 8%."""
  kw, side = CONFIGS[name]
  module = AutoencoderDC(**kw)
  size = 16 * side
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  latent = (1, size // module.downscale, size // module.downscale, kw["latent_channels"])
  for method, shape in (("encode", (1, size, size, 3)), ("decode", latent)):
    cost = jax.jit(functools.partial(module.apply, method=method)).lower(
        variables, jax.ShapeDtypeStruct(shape, jnp.float32)).cost_analysis()
    ours = module.flops_per_example(size, size, part=method)
    assert abs(cost["flops"] / ours - 1) < 0.08, (method, cost["flops"], ours)
  assert module.flops_per_example(size, size, "both") == (
      module.flops_per_example(size, size, "encode") + module.flops_per_example(size, size,
                                                                                "decode"))
  with pytest.raises(ValueError, match="part must be"):
    module.flops_per_example(size, size, "forward")
