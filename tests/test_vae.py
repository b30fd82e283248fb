"""AutoencoderKL: parity with diffusers, strict conversion, latent scaling and tiled decoding.

Runs on CPU in float32 with jax_default_matmul_precision="highest" (tests/conftest.py).
Every torch parameter is randomised first (weights and biases ~ N(0, 0.05^2), norm scales
~ 1 + N(0, 0.05^2)), so zero- or one-initialised layers cannot hide a mapping error.

Tolerances (all relative to the reference's largest magnitude):
  * encode mean / logvar, decode output, decode input-gradient: 1e-5. Both sides compute in
    float32 but sum convolutions and matmuls in different orders (oneDNN vs XLA); the rounding
    differences (~1e-7 per op) grow through ~20-40 conv / norm layers. Measured max 4.3e-6
    (flux_3blocks decode gradient), 0.8e-6 .. 2e-6 elsewhere.
  * tiled decode vs diffusers' tiled_decode: 1e-5 (same math, tile by tile).
  * tiled vs plain decode on a smooth input: relative L2 error 0.1 (measured 0.055; see that
    test). Tiling is an approximation by design (zero padding and GroupNorm statistics per
    tile), so this shows the tiles land where they belong; exactness is the diffusers test.
  * bfloat16 compute vs float32 (reconstruction): 0.1 (measured 0.044; bf16 keeps 8 mantissa
    bits and the error grows through ~30 layers of random weights).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from models.convert import vae as vae_convert  # noqa: E402
from models.convert.registry import CONVERTERS  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.vae import AutoencoderKL, attend, blend  # noqa: E402
from tests._torch_random import randomize_torch  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5

# name -> (diffusers AutoencoderKL kwargs, image side)
CONFIGS = {
    # SD / SDXL-like: 4 latent channels, quant convs, two blocks (downscale 2).
    "sd_2blocks": (dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=16), 16),
    # One block (no down/upsampling), exact GELU, no mid-block attention, group size 1.
    "one_block_gelu_noattn": (dict(block_out_channels=(8,), layers_per_block=2, norm_num_groups=8,
                                   latent_channels=4, act_fn="gelu",
                                   mid_block_add_attention=False, sample_size=12), 12),
    # SD3 / FLUX-like: 16 latent channels, no quant convs, shift factor, three blocks.
    "flux_3blocks": (dict(block_out_channels=(32, 32, 64), layers_per_block=2,
                          norm_num_groups=32, latent_channels=16, use_quant_conv=False,
                          use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
                          sample_size=32), 32),
}
FAST = ("sd_2blocks", "one_block_gelu_noattn")
SLOW = pytest.mark.slow


def _params(names, slow=("flux_3blocks",)):
  return [pytest.param(n, marks=SLOW) if n in slow else n for n in names]


def _torch_vae(name: str, seed: int = 0):
  """A diffusers AutoencoderKL of config `name` with every parameter randomised."""
  kwargs, _ = CONFIGS[name]
  n = len(kwargs["block_out_channels"])
  model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kwargs).eval()
  return randomize_torch(model, seed, 0.05)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  """(torch model, our module, variables, image side) for config `name`, built once."""
  torch.set_num_threads(1)
  model = _torch_vae(name)
  module, variables = vae_convert.from_torch(model)
  return model, module, variables, CONFIGS[name][1]


def _nhwc(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def _nchw(a) -> "torch.Tensor":
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _rel_err(ours, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _inputs(module: AutoencoderKL, side: int, seed: int = 1):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, (2, side, side, module.in_channels)).astype(np.float32)
  s = side // module.downscale
  z = rng.standard_normal((2, s, s, module.latent_channels)).astype(np.float32)
  return x, z


# --------------------------------------------------------------------------------------------
# Parity with diffusers.

@pytest.mark.parametrize("name", _params(CONFIGS))
def test_encode_decode_match_diffusers(name):
  model, module, variables, side = _setup(name)
  x, z = _inputs(module, side)
  with torch.no_grad():
    post = model.encode(_nchw(x)).latent_dist
    ref_dec = model.decode(_nchw(z)).sample
  mean, logvar = jax.jit(functools.partial(module.apply, method="encode"))(variables, x)
  dec = jax.jit(functools.partial(module.apply, method="decode"))(variables, z)
  assert mean.shape == (2, side // module.downscale, side // module.downscale,
                        module.latent_channels)
  assert _rel_err(mean, _nhwc(post.mean)) < TOL
  assert _rel_err(logvar, _nhwc(post.logvar)) < TOL
  assert _rel_err(dec, _nhwc(ref_dec)) < TOL


@pytest.mark.parametrize("name", _params(CONFIGS, slow=("flux_3blocks", "one_block_gelu_noattn")))
def test_decode_input_gradient_matches_torch(name):
  model, module, variables, side = _setup(name)
  _, z = _inputs(module, side)
  w = np.random.default_rng(2).standard_normal(
      (2, side, side, module.out_channels)).astype(np.float32)

  z_t = _nchw(z).requires_grad_(True)
  (model.decode(z_t).sample * _nchw(w)).sum().backward()

  def loss(z):
    return jnp.sum(module.apply(variables, z, method="decode") * w)

  grad = jax.jit(jax.grad(loss))(z)
  assert _rel_err(grad, _nhwc(z_t.grad)) < TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bit_identical(name):
  model, module, variables, _ = _setup(name)
  back = CONVERTERS.get("AutoencoderKL").to_torch(module, variables)
  ref, got = model.state_dict(), back.state_dict()
  assert set(ref) == set(got)
  for k in ref:
    assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
  for k, v in model.config.items():
    if not k.startswith("_"):
      assert back.config[k] == v or list(back.config[k]) == list(v), k


def test_diffusers_directory_round_trip(tmp_path):
  from models.convert import from_diffusers, load_diffusers_dir, save_diffusers_dir
  model, module, variables, _ = _setup("sd_2blocks")
  assert from_diffusers(model)[0] == module
  save_diffusers_dir(module, variables, str(tmp_path))
  loaded, loaded_vars = load_diffusers_dir(str(tmp_path))
  assert loaded == module
  for a, b in zip(jax.tree_util.tree_leaves(loaded_vars), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_boxed_variables_export_too():
  _, module, variables, side = _setup("sd_2blocks")
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                         jnp.zeros((1, side, side, 3)))
  boxed = jax.tree_util.tree_map(lambda box, v: box.replace_boxed(v), boxed, variables,
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert isinstance(boxed["params"]["encoder"]["conv_in"]["kernel"], nn.Partitioned)
  state = vae_convert.state_dict_from_params(module, boxed)
  plain = vae_convert.state_dict_from_params(module, variables)
  assert set(state) == set(plain)
  assert all(np.array_equal(state[k], plain[k]) for k in plain)


# --------------------------------------------------------------------------------------------
# Strict conversion.

def test_missing_unexpected_and_misshaped_keys_raise_one_error_naming_them():
  model, module, _, _ = _setup("sd_2blocks")
  state = dict(model.state_dict())
  del state["decoder.mid_block.attentions.0.to_q.weight"]
  state["encoder.extra.weight"] = torch.zeros(3)
  state["encoder.conv_in.weight"] = torch.zeros(16, 3, 3, 4)
  with pytest.raises(ValueError) as err:
    vae_convert.params_from_state_dict(module, state)
  msg = str(err.value)
  assert "decoder.mid_block.attentions.0.to_q.weight" in msg
  assert "encoder.extra.weight" in msg
  assert "encoder.conv_in.weight" in msg and "(16, 3, 3, 3)" in msg


def test_legacy_attention_key_names_load():
  model, module, variables, _ = _setup("sd_2blocks")
  legacy = {}
  for k, v in model.state_dict().items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    legacy[k] = v
  assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
  params = vae_convert.params_from_state_dict(module, legacy)
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)


def test_flax_side_mismatch_raises_naming_the_path():
  _, module, variables, _ = _setup("sd_2blocks")
  params = jax.tree_util.tree_map(lambda a: a, dict(variables["params"]))
  params["decoder"] = dict(params["decoder"])
  del params["decoder"]["conv_out"]
  with pytest.raises(ValueError, match="decoder/conv_out/kernel"):
    vae_convert.state_dict_from_params(module, {"params": params})


def test_config_mismatch_raises():
  model, _, _, _ = _setup("sd_2blocks")
  cfg = dict(model.config)
  cfg["layers_per_block"] = 2  # the weights have one resnet per encoder block
  with pytest.raises(ValueError, match="missing"):
    CONVERTERS.get("AutoencoderKL").from_config_state(cfg, model.state_dict())
  cfg = dict(model.config, down_block_types=("DownBlock2D", "DownEncoderBlock2D"))
  with pytest.raises(ValueError, match="DownBlock2D"):
    vae_convert.module_from_config(cfg)


def test_registries_and_overrides():
  model, _, _, _ = _setup("sd_2blocks")
  assert isinstance(build_model("autoencoder_kl", latent_channels=16), AutoencoderKL)
  module, variables = CONVERTERS.get("AutoencoderKL").from_torch(
      model, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat="full")
  assert module.dtype == jnp.bfloat16 and module.remat == "full"
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(variables))


def test_logical_axis_names():
  module = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8)
  boxed = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  specs = nn.get_partition_spec(boxed)["params"]
  assert specs["encoder"]["conv_in"]["kernel"] == jax.sharding.PartitionSpec(
      None, None, "conv_in", "conv_out")
  attn = specs["decoder"]["mid_block"]["attentions_0"]
  assert attn["to_q"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert attn["group_norm"]["scale"] == jax.sharding.PartitionSpec("norm")


def test_attention_by_name_matches_xla():
  pytest.importorskip("models.attention")
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 16, 32)) for i in range(3))
  # pallas runs in interpret mode on CPU; same math, different summation order.
  np.testing.assert_allclose(attend(q, k, v, "pallas"), attend(q, k, v), atol=1e-5)


@SLOW
def test_remat_gives_the_same_gradient():
  _, module, variables, side = _setup("sd_2blocks")
  _, z = _inputs(module, side)

  def grad(m):
    return jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, z, method="decode") ** 2)))(variables)

  for a, b in zip(jax.tree_util.tree_leaves(grad(module)),
                  jax.tree_util.tree_leaves(grad(module.clone(remat="full")))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Latents for denoisers.

def test_latent_scaling_and_shift():
  module = AutoencoderKL(scaling_factor=0.5, shift_factor=0.25)
  z = jnp.arange(8.0).reshape(1, 2, 1, 4)
  np.testing.assert_allclose(module.scale_latents(z), (z - 0.25) * 0.5)
  np.testing.assert_allclose(module.unscale_latents(module.scale_latents(z)), z, rtol=1e-6)
  per_channel = AutoencoderKL(scaling_factor=0.5, latents_mean=(1.0, 2.0, 3.0, 4.0),
                              latents_std=(2.0, 2.0, 4.0, 4.0))
  expected = (z - jnp.array([1.0, 2, 3, 4])) * 0.5 / jnp.array([2.0, 2, 4, 4])
  np.testing.assert_allclose(per_channel.scale_latents(z), expected, rtol=1e-6)


def test_encode_latents_and_decode_latents():
  _, module, variables, side = _setup("one_block_gelu_noattn")
  module = module.clone(scaling_factor=0.7, shift_factor=0.1)
  x, z = _inputs(module, side)
  key = jax.random.PRNGKey(3)

  @jax.jit
  def run(variables):
    apply = functools.partial(module.apply, variables)
    mean, logvar = apply(x, method="encode")
    draw = apply(key, mean, logvar, method="sample")
    return dict(mean=mean, logvar=logvar,
                recon=apply(x, True, key), dec_draw=apply(draw, method="decode"),
                lat=apply(x, method="encode_latents"),
                lat_sample=apply(x, key, method="encode_latents"),
                dec=apply(z, method="decode"),
                dec_lat=apply((z - 0.1) * 0.7, method="decode_latents"))

  out = run(variables)
  np.testing.assert_allclose(out["lat"], (out["mean"] - 0.1) * 0.7, rtol=1e-6)
  draw = module.sample(key, out["mean"], out["logvar"])
  np.testing.assert_allclose(out["lat_sample"], (draw - 0.1) * 0.7, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["dec_lat"], out["dec"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out["recon"], out["dec_draw"], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Tiled decoding.

def test_blend_ramps_linearly():
  a = jnp.full((1, 4, 1, 1), 2.0)
  b = jnp.zeros((1, 3, 1, 1))
  out = blend(a, b, extent=2, axis=1)[0, :, 0, 0]
  np.testing.assert_allclose(out, [2.0, 1.0, 0.0])


def test_decode_tiled_matches_diffusers_tiled_decode():
  model, module, variables, _ = _setup("sd_2blocks")
  z = np.random.default_rng(4).standard_normal((1, 14, 12, 4)).astype(np.float32)
  # ours (tile=8, overlap=2) == diffusers (tile_latent_min_size=8, overlap factor 0.25):
  # tiles every int(8 * 0.75) = 6 latents, blend int(16 * 0.25) = 4 = 2 * downscale pixels.
  model.tile_latent_min_size, model.tile_sample_min_size = 8, 16
  model.tile_overlap_factor = 0.25
  with torch.no_grad():
    ref = model.tiled_decode(_nchw(z)).sample
  ours = jax.jit(functools.partial(module.apply, tile=8, overlap=2, method="decode_tiled"))(
      variables, z)
  assert ours.shape == (1, 28, 24, 3)
  assert _rel_err(ours, _nhwc(ref)) < TOL


def test_decode_tiled_with_one_tile_is_plain_decode():
  _, module, variables, side = _setup("sd_2blocks")
  _, z = _inputs(module, side)
  tiled, plain = jax.jit(lambda v: (
      module.apply(v, z, tile=64, overlap=16, method="decode_tiled"),
      module.apply(v, z, method="decode")))(variables)
  np.testing.assert_array_equal(tiled, plain)
  with pytest.raises(ValueError, match="overlap"):
    module.apply(variables, z, tile=4, overlap=4, method="decode_tiled")


def _near_local(shapes, seed: int = 1, noise: float = 0.2):
  """Conv kernels = identity at the centre tap + N(0, noise^2 / fan_in); norm scales ~ 1.

  With random weights every tile boundary acts like an image border (zero padding, per-tile
  GroupNorm statistics) and tiling means little; a decoder dominated by its centre taps is close
  to local, as a trained VAE is on smooth content, so tiles can be compared with the whole.
  """
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    shape, name = leaf.shape, str(path[-1].key)
    fan = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    x = noise / np.sqrt(fan) * rng.standard_normal(shape)
    if name == "kernel" and len(shape) == 4:
      n = np.arange(min(shape[2], shape[3]))
      x[shape[0] // 2, shape[1] // 2, n, n] += 1.0
    return jnp.asarray(x + (1.0 if name == "scale" else 0.0), jnp.float32)

  return jax.tree_util.tree_map_with_path(init, shapes)


@SLOW
def test_decode_tiled_stays_close_to_plain_decode_on_smooth_input():
  module = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  variables = _near_local(nn.meta.unbox(jax.eval_shape(
      module.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))))
  # Period-4 waves: the 16- and 12-latent tiles and the 24-latent whole hold whole periods, so
  # tile statistics equal global ones up to border effects.
  yy, xx = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
  z = 0.5 * np.stack([np.sin(2 * np.pi * (xx / 4 + c / 4)) + np.cos(2 * np.pi * (yy / 4 + c / 3))
                      for c in range(4)], -1)[None].astype(np.float32)

  @jax.jit
  def run(variables):
    return (module.apply(variables, z, tile=16, overlap=4, method="decode_tiled"),
            module.apply(variables, z, method="decode"))

  tiled, plain = run(variables)

  def rel_l2(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  err = rel_l2(tiled, plain)  # measured 0.055
  assert err < 0.1, err
  # The bound has teeth: the plain decode moved by 2 pixels is off by ~0.96.
  assert rel_l2(jnp.roll(plain, 2, axis=2), plain) > 0.5


# --------------------------------------------------------------------------------------------
# Reduced precision and cost.

@SLOW
def test_bfloat16_compute_close_to_float32():
  _, module, variables, side = _setup("sd_2blocks")
  x, z = _inputs(module, side)
  bf16 = module.clone(dtype=jnp.bfloat16)
  ref = jax.jit(functools.partial(module.apply, method="__call__"))(variables, x)
  low = jax.jit(functools.partial(bf16.apply, method="__call__"))(variables, x)
  assert low.dtype == jnp.float32
  assert _rel_err(low, np.asarray(ref)) < 1e-1  # measured 4.4e-2


def test_flops_per_example_matches_xla_cost_analysis():
  module = AutoencoderKL(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  for method, shape in (("decode", (1, 32, 32, 4)), ("encode", (1, 64, 64, 3))):
    arg = jax.ShapeDtypeStruct(shape, jnp.float32)
    cost = jax.jit(functools.partial(module.apply, method=method)).lower(
        variables, arg).cost_analysis()
    ours = module.flops_per_example(64, 64, part=method)
    # XLA also counts norms, activations and softmax (a few percent here) and skips taps that
    # fall on padding (a few percent at this size), so the two agree to within 5%.
    assert abs(cost["flops"] / ours - 1) < 0.05, (method, cost["flops"], ours)
  assert module.flops_per_example(64, 64, "both") == (
      module.flops_per_example(64, 64, "encode") + module.flops_per_example(64, 64, "decode"))
