"""The SD UNet (models/unet.py): parity with diffusers' UNet2DConditionModel, strict conversion,
jvp vs a float64 finite difference, FLOP counts vs XLA.

CPU, float32, jax_default_matmul_precision="highest" (tests/conftest.py). Every torch parameter
is randomised first (weights and biases ~ N(0, 0.05^2), norm scales ~ 1 + N(0, 0.05^2); the
class table ~ N(0, 1)), so zero-initialised layers (diffusers zero-inits nothing here, but
random init hides little) cannot hide a mapping error.

Configurations (small widths, the structure of each family):
  sd15      CrossAttnDown, Down / Up, CrossAttnUp; conv proj_in/out; one head count
  sd21      linear projections, per-block heads (SD2.1 also is v-prediction: a scheduler
            setting, not a UNet one), an encoder attention mask
  sdxl      Down, CrossAttnDown x2 with transformer depths 1, 2, 3; text_time conditioning
            (pooled text embeds + 6 time ids), linear projections
  lcm       sd15 + time_cond_proj_dim (LCM's guidance-scale embedding)
  misc      class table (num_class_embeds), scale_shift resnets, encoder_hid_proj, no mid
            block, mid-block scale factor, 1-layer blocks

Tolerances (relative to the reference's largest magnitude): outputs and input gradients 1e-5.
Both sides compute in float32 but sum convolutions and matmuls in different orders (oneDNN vs
XLA); rounding (~1e-7 per op) grows through ~20-40 conv / attention / norm layers. Measured max
errors are in the note of each assertion's message when it fails.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from models import convert  # noqa: E402
from models.convert import unet as unet_convert  # noqa: E402
from models.registry import build_model  # noqa: E402
from tests._torch_random import randomize_torch  # noqa: E402
from models.unet import UNet  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5
TEXT_LEN = 5

_SD15 = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             cross_attention_dim=24, attention_head_dim=2,
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
CONFIGS = {
    "sd15": _SD15,
    "sd21": dict(_SD15, use_linear_projection=True, attention_head_dim=(2, 4),
                 cross_attention_dim=32, layers_per_block=2),
    "sdxl": dict(block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
                 cross_attention_dim=32, attention_head_dim=(1, 2, 4),
                 transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8),
    "lcm": dict(_SD15, time_cond_proj_dim=16),
    "misc": dict(_SD15, num_class_embeds=10, resnet_time_scale_shift="scale_shift",
                 encoder_hid_dim=12, mid_block_type=None, mid_block_scale_factor=1.0,
                 time_embedding_act_fn="silu", flip_sin_to_cos=False, freq_shift=1),
    "mid_scale": dict(_SD15, mid_block_scale_factor=1.4142, downsample_padding=0),
}
SIDE = 8


def _torch_unet(name: str, seed: int = 0):
  """A diffusers UNet2DConditionModel of config `name` with every parameter randomised."""
  model = diffusers.UNet2DConditionModel(sample_size=SIDE, **CONFIGS[name]).eval()
  return randomize_torch(model, seed, 0.05, unit_normal=("class_embedding.weight",))


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  torch.set_num_threads(1)
  model = _torch_unet(name)
  module, variables = unet_convert.from_torch(model)
  return model, module, variables


def _nhwc(t) -> np.ndarray:
  return t.detach().permute(0, 2, 3, 1).numpy()


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _rel_err(ours, ref: np.ndarray) -> float:
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def _inputs(module: UNet, seed: int = 1) -> dict:
  """Random inputs for our call and diffusers' (numpy), keyed by our argument names."""
  rng = np.random.default_rng(seed)
  ctx_dim = module.encoder_hid_dim or module.plan("cross_attention_dim")[0]
  f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
  inp = {"x": f32(2, SIDE, SIDE, module.in_channels),
         "timestep": np.array([3.0, 741.0], np.float32),
         "encoder_hidden_states": f32(2, TEXT_LEN, ctx_dim)}
  if module.addition_embed_type == "text_time":
    pooled = module.projection_class_embeddings_input_dim - 6 * module.addition_time_embed_dim
    inp["added_cond"] = {"text_embeds": f32(2, pooled),
                         "time_ids": np.array([[64, 64, 0, 0, 64, 64], [48, 80, 8, 4, 64, 64]],
                                              np.float32)}
  if module.time_cond_proj_dim:
    inp["timestep_cond"] = f32(2, module.time_cond_proj_dim)
  if module.num_class_embeds:
    inp["class_labels"] = np.array([3, 7], np.int32)
  return inp


def _torch_forward(model, inp: dict, x=None):
  added = inp.get("added_cond")
  kwargs = dict(
      timestep_cond=None if "timestep_cond" not in inp else torch.from_numpy(inp["timestep_cond"]),
      class_labels=None if "class_labels" not in inp else torch.from_numpy(
          inp["class_labels"].astype(np.int64)),
      added_cond_kwargs=None if added is None else {k: torch.from_numpy(v)
                                                    for k, v in added.items()},
      encoder_attention_mask=(None if "encoder_attention_mask" not in inp
                              else torch.from_numpy(inp["encoder_attention_mask"])))
  x = _nchw(inp["x"]) if x is None else x
  return model(x, torch.from_numpy(inp["timestep"]),
               torch.from_numpy(inp["encoder_hidden_states"]), **kwargs).sample


def _our_forward(module, variables, inp: dict, x=None):
  kw = {k: inp[k] for k in ("class_labels", "encoder_attention_mask") if k in inp}
  return module.apply(variables, inp["x"] if x is None else x, inp["timestep"],
                      inp["encoder_hidden_states"], inp.get("added_cond"),
                      inp.get("timestep_cond"), **kw)


# --------------------------------------------------------------------------------------------
# Parity with diffusers.

@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_diffusers(name):
  model, module, variables = _setup(name)
  inp = _inputs(module)
  if name == "sd21":  # a padded prompt: the last two tokens are masked out of cross attention
    inp["encoder_attention_mask"] = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  with torch.no_grad():
    ref = _nhwc(_torch_forward(model, inp))
  out = jax.jit(functools.partial(_our_forward, module))(variables, inp)
  assert out.shape == inp["x"].shape[:3] + (module.out_channels,)
  err = _rel_err(out, ref)
  assert err < TOL, (name, err)
  if name == "sd21":  # the mask matters (so the test above really exercised it)
    unmasked = dict(inp)
    del unmasked["encoder_attention_mask"]
    assert _rel_err(jax.jit(functools.partial(_our_forward, module))(variables, unmasked),
                    ref) > 1e-3


@pytest.mark.parametrize("name", ["sd21", "sdxl"])
def test_input_gradient_matches_torch(name):
  model, module, variables = _setup(name)
  inp = _inputs(module)
  w = np.random.default_rng(2).standard_normal(inp["x"].shape).astype(np.float32)
  x_t = _nchw(inp["x"]).requires_grad_(True)
  (_torch_forward(model, inp, x_t) * _nchw(w)).sum().backward()
  grad = jax.jit(jax.grad(lambda x: jnp.sum(_our_forward(module, variables, inp, x) * w)))(
      inp["x"])
  err = _rel_err(grad, _nhwc(x_t.grad))
  assert err < TOL, (name, err)


def test_mid_block_features_and_remat_are_the_same_function():
  _, module, variables = _setup("sd15")
  inp = _inputs(module)
  forward = jax.jit(_our_forward, static_argnums=0)
  out = forward(module, variables, inp)
  kw = dict(return_features=("mid", "down_1", "up_0"))
  out2, feats = jax.jit(functools.partial(module.apply, **kw))(
      variables, inp["x"], inp["timestep"], inp["encoder_hidden_states"])
  np.testing.assert_array_equal(out, out2)
  assert feats["mid"].shape == feats["down_1"].shape == (2, SIDE // 2, SIDE // 2, 64)
  assert feats["up_0"].shape == (2, SIDE, SIDE, 64)
  rematted = module.clone(remat="full")
  np.testing.assert_allclose(forward(rematted, variables, inp), out, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown feature 'bottleneck'"):
    module.apply(variables, inp["x"], inp["timestep"], inp["encoder_hidden_states"],
                 return_features=("bottleneck",))


# --------------------------------------------------------------------------------------------
# Conversion.

@pytest.mark.parametrize("name", ["sd21", "sdxl", "misc"])
def test_round_trip_is_bit_identical(name, tmp_path):
  model, module, variables = _setup(name)
  back = unet_convert.to_torch(module, variables)
  ref = model.state_dict()
  got = back.state_dict()
  assert set(ref) == set(got)
  for k in ref:
    assert torch.equal(ref[k], got[k]), k
  assert unet_convert.module_from_config(back.config) == module
  # A diffusers-layout directory loads straight from its tensors, equal again.
  model.save_pretrained(tmp_path, safe_serialization=True)
  module2, variables2 = convert.load_diffusers_dir(str(tmp_path))
  assert module2 == module
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables2, variables)


def test_conversion_is_strict():
  model, module, _ = _setup("sd15")
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  bad = dict(state)
  bad.pop("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight")
  bad["down_blocks.0.resnets.0.extra.weight"] = np.zeros(3, np.float32)
  bad["conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  with pytest.raises(ValueError) as e:
    unet_convert.params_from_state_dict(module, bad)
  msg = str(e.value)
  assert "attn2.to_k.weight" in msg and "extra.weight" in msg and "conv_in.weight" in msg
  with pytest.raises(ValueError, match="'dual_cross_attention'"):
    unet_convert.module_from_config(dict(model.config, dual_cross_attention=True))
  with pytest.raises(ValueError, match="'only_cross_attention'"):
    unet_convert.module_from_config(dict(model.config, only_cross_attention=[True, False]))
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    unet_convert.module_from_config(dict(model.config, down_block_types=(
        "SimpleCrossAttnDownBlock2D", "DownBlock2D")))


def test_registry_and_fresh_init():
  assert build_model("unet", block_out_channels=(32, 64)) == UNet(block_out_channels=(32, 64))
  lcm = unet_convert.module_from_config(dict(CONFIGS["lcm"], sample_size=SIDE))
  args, kwargs = lcm.dummy_inputs(2)
  variables = jax.jit(lcm.init)(jax.random.PRNGKey(0), *args, **kwargs)
  boxed = variables["params"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]
  assert boxed["attn1"]["to_q"]["kernel"].names == ("embed", "heads")
  out = jax.jit(lcm.apply)(variables, *args, **kwargs)
  assert out.shape == (2, SIDE, SIDE, 4) and bool(jnp.all(jnp.isfinite(out)))
  # Latents of another VAE (3 channels, or unbatched) are one line, not a conv shape error.
  for x in (jnp.zeros((2, SIDE, SIDE, 3)), jnp.zeros((SIDE, SIDE, 4))):
    with pytest.raises(ValueError, match=r"UNet expects \(B, H, W, 4\) inputs, got"):
      lcm.apply(variables, x, *args[1:], **kwargs)


# --------------------------------------------------------------------------------------------
# Forward-mode AD and FLOPs.

def test_jvp_matches_float64_finite_difference():
  """The tangent along (x, t) vs a central difference in float64 (error ~ eps^2)."""
  _, module, variables = _setup("lcm")
  inp = _inputs(module)
  with jax.enable_x64(True):
    m64 = module.clone(dtype=jnp.float64, param_dtype=jnp.float64)
    v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), variables)
    cast = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
    w_emb = cast(inp["timestep_cond"])
    rng = np.random.default_rng(5)
    dx = jnp.asarray(rng.standard_normal(inp["x"].shape))
    dt = jnp.asarray([30.0, -50.0])
    f = lambda x, t: m64.apply(v64, x, t, cast(inp["encoder_hidden_states"]),  # noqa: E731
                               timestep_cond=w_emb)
    jvp = jax.jit(lambda x, t: jax.jvp(f, (x, t), (dx, dt)))
    x, t = cast(inp["x"]), cast(inp["timestep"])
    _, tangent = jvp(x, t)
    eps = 1e-5  # t moves by 3e-4: truncation ~ eps^2 |f3|, rounding ~ 1e-16 / eps
    fd = (jvp(x + eps * dx, t + eps * dt)[0] - jvp(x - eps * dx, t - eps * dt)[0]) / (2 * eps)
    assert tangent.dtype == jnp.float64
    err = float(jnp.max(jnp.abs(tangent - fd)) / jnp.max(jnp.abs(fd)))
    assert err < 1e-7, err


@pytest.mark.parametrize("kw,side", [
    (dict(block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=4,
          norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")), 16),
    (dict(block_out_channels=(64, 128, 128), cross_attention_dim=96, attention_head_dim=(2, 4, 4),
          transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
          norm_num_groups=32, addition_embed_type="text_time", addition_time_embed_dim=32,
          projection_class_embeddings_input_dim=64 + 6 * 32,
          down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")), 16),
], ids=["sd15_like", "sdxl_like"])
def test_flops_match_xla_cost_analysis(kw, side):
  """Our matmul + conv count vs XLA's cost analysis of the CPU forward (which also counts the
  elementwise work of norms, activations and softmax: expect a few percent more)."""
  module = unet_convert.module_from_config(dict(kw, sample_size=side))
  args, kwargs = module.dummy_inputs(2, text_length=16)
  abstract = jax.eval_shape(lambda r: module.init(r, *args, **kwargs), jax.random.PRNGKey(0))
  fn = lambda v, a, k: module.apply(v, *a, **k)  # noqa: E731
  cost = jax.jit(fn).lower(nn.meta.unbox(abstract), args, kwargs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = module.flops_per_example(text_length=16)
  ratio = cost["flops"] / (2 * ours)
  assert 1.0 <= ratio < 1.05, ratio
  assert ours == module.flops_per_example(side, side, 16) > 0
  # The count scales with the latent area (convs, projections) and faster (self attention).
  assert module.flops_per_example(2 * side, 2 * side, 16) > 4 * ours
  assert math.isclose(module.flops_per_example(text_length=16), ours)


def test_scanned_transformer_stacks_compute_the_same_function():
  """scan_blocks=True: each Transformer2D's blocks under nn.scan, params stacked on a leading
  layer axis (stack_transformer_blocks); same outputs (1e-6: the scan changes nothing but XLA's
  fusion boundaries), conversion both ways through the unscanned layout, integer features."""
  model, module, variables = _setup("sdxl")
  scanned, sv = unet_convert.from_torch(model, scan_blocks=True)
  assert scanned.scan_blocks
  stack = sv["params"]["down_blocks_2"]["attentions_0"]["transformer_blocks"]
  assert stack["attn1"]["to_q"]["kernel"].shape[0] == 3      # SDXL-like depth 3
  inp = _inputs(module)
  forward = jax.jit(_our_forward, static_argnums=0)
  np.testing.assert_allclose(forward(scanned, sv, inp), forward(module, variables, inp),
                             rtol=0, atol=1e-6)
  back = unet_convert.to_torch(scanned, sv).state_dict()
  for k, v in model.state_dict().items():
    assert torch.equal(v, back[k]), k
  # Integer features index the forward order (integer-keyed objective settings work).
  assert module.feature_names == ["down_0", "down_1", "down_2", "mid", "up_0", "up_1", "up_2"]
  assert module._feature_name(3) == "mid" and module._feature_name(-1) == "up_2"


def test_guidance_input_is_diffusers_lcm_w_embedding():
  """A guidance-embedded UNet student takes CFG scale w as LCM's `timestep_cond`: diffusers'
  get_guidance_scale_embedding of w - 1 (LCM's eps_c + w' (eps_c - eps_null), w' = w - 1, as its
  pipeline embeds guidance_scale - 1), 256-d; the engine adds that input for `guidance_embed`."""
  from diffusers import LatentConsistencyModelPipeline
  from distill import context as ctx_lib
  from distill.engine import network_kwargs
  from distill.objective import Network
  w = np.array([1.0, 4.5, 9.0], np.float32)
  module = UNet(time_cond_proj_dim=256)
  got = ctx_lib.guidance_inputs(module, jnp.asarray(w))["timestep_cond"]
  want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
      None, torch.tensor(w - 1.0), embedding_dim=256, dtype=torch.float32).numpy()
  # Arguments reach 1000 (w - 1) = 8000 rad: one float32 rounding of the argument (or of a
  # frequency) moves sin/cos by up to 8000 * 6e-8 = 5e-4, so 1e-3 absolute.
  np.testing.assert_allclose(got, want, atol=1e-3)
  student = Network("student", init="teacher", kwargs={"guidance_embed": True})
  assert network_kwargs(student, {"name": "unet"}) == {"time_cond_proj_dim": 256}
  assert network_kwargs(student, {"name": "unet", "time_cond_proj_dim": 64}) == {
      "time_cond_proj_dim": 64}
  assert ctx_lib.embeds_guidance(module) and not ctx_lib.embeds_guidance(UNet())
  assert network_kwargs(student, {"name": "sana"}) == {"guidance_embeds": True}
