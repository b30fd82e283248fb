"""SANA: parity with diffusers' SanaTransformer2DModel, strict conversion, JVP, FLOPs.

Runs on CPU in float32 with jax_default_matmul_precision="highest" (tests/conftest.py).
Every torch parameter is randomised first (weights and biases ~ N(0, 0.1^2), norm scales
~ 1 + N(0, 0.1^2)), so zero-initialised layers (or the diffusers default tables) cannot hide a
mapping error.

Tolerances (relative to the reference's largest magnitude):
  * outputs, input gradients (w.r.t. x) and returned block features: 1e-5. Both sides do the
    same float32 math in different orders (oneDNN vs XLA summation, our linear attention's
    einsums vs torch's padded matmuls); measured at most 2.0e-6. A mapping error gives O(1).
    Heads are 16 wide: with 8-wide heads and QK-norm the input gradient is ill-conditioned
    (likely a query with few positive entries after the ReLU, i.e. a small linear-attention
    denominator), and *both* float32 implementations drift from a float64 torch run of the same
    weights (measured: torch 2.1e-5, ours 7.6e-6), which says nothing about the mapping.
  * JVP in (x, t) vs a float64 central difference with step 1e-6: 1e-7 (truncation ~1e-12,
    rounding ~1e-16 / 1e-6 relative to |t| = 700; measured 3.1e-9). The step is that small
    because the ReLUs of the linear attention are kinks: with steps of 1e-5 .. 1e-3 some q or
    k entry crosses zero and the difference is off by ~1e-4 (measured), the tangent is not.
  * FLOPs vs XLA's cost_analysis: 5% (XLA also counts norms, activations and softmax;
    measured +1.5% and +1.9%).
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

from models.convert import (from_diffusers, load_diffusers_dir, save_diffusers_dir,  # noqa: E402
                            to_diffusers)
from models.convert import sana as sana_convert  # noqa: E402
from models.convert.registry import CONVERTERS  # noqa: E402
from models.registry import build_model  # noqa: E402
from tests._torch_random import randomize_torch  # noqa: E402
from models.sana import Sana, flops_per_example  # noqa: E402

pytestmark = pytest.mark.torch

TOL = 1e-5
TOKENS = 5
AXIS_NAMES = {"embed", "mlp", "heads", "kv", "norm", "layers", "conv_in", "conv_out", None}

_BASE = dict(in_channels=4, num_layers=2, sample_size=8, cross_attention_dim=32,
             num_cross_attention_heads=2, cross_attention_head_dim=16, caption_channels=24)
CONFIGS = {
    # sin-cos position embedding, patch 2, q/k/v biases, affine norm2, no QK-norm or guidance.
    "pe_p2": dict(_BASE, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                  patch_size=2, interpolation_scale=1.0, attention_bias=True,
                  norm_elementwise_affine=True),
    # SANA 1.5 / SANA-Sprint: RMS QK-norm, guidance embedding, patch 1, no position embedding.
    "sprint_rms_qk": dict(_BASE, out_channels=8, num_attention_heads=2, attention_head_dim=16,
                          patch_size=1, qk_norm="rms_norm_across_heads", guidance_embeds=True,
                          mlp_ratio=2.0),
    # LayerNorm QK-norm across heads, interpolation scale 2, default out_channels (None).
    "ln_qk": dict(_BASE, num_layers=1, out_channels=None, num_attention_heads=2,
                  attention_head_dim=16,
                  patch_size=2, interpolation_scale=2.0, qk_norm="layer_norm_across_heads"),
}



# The parity programs run for milliseconds: compile them with XLA's CPU backend optimisations
# off, which halves the compile time (the bulk of these tests' cost) and keeps the float32 math.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
  """`jax.jit(fn)` compiled for `args` with FAST_COMPILE; call it with the same args."""
  return jax.jit(fn).lower(*args).compile(FAST_COMPILE)


def random_sana(name: str, seed: int = 0, std: float = 0.1):
  """A diffusers SanaTransformer2DModel of config `name`, every parameter drawn at random."""
  torch.manual_seed(seed)
  model = diffusers.SanaTransformer2DModel(**CONFIGS[name]).eval()
  return randomize_torch(model, seed, std)


@functools.lru_cache(maxsize=None)
def _setup(name: str):
  tm = random_sana(name)
  module, variables = from_diffusers(tm)
  return tm, module, variables


def _inputs(module: Sana, seed: int = 1):
  rng = np.random.default_rng(seed)
  s = module.sample_size
  x = rng.standard_normal((2, s, s, module.in_channels)).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  text = rng.standard_normal((2, TOKENS, module.caption_channels)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  kw = {"guidance": np.array([2.0, 4.5], np.float32)} if module.guidance_embeds else {}
  return x, t, text, mask, kw


def _nchw(a) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _torch_run(tm, x, t, text, mask, kw, w):
  """Output, its x-gradient against weights w and every block's output (torch forward hooks)."""
  feats = {}
  hooks = [tm.transformer_blocks[i].register_forward_hook(
      lambda _m, _a, out, i=i: feats.__setitem__(i, out.detach().numpy()))
      for i in range(len(tm.transformer_blocks))]
  xt = torch.from_numpy(_nchw(x)).requires_grad_(True)
  tkw = {k: torch.from_numpy(v) for k, v in kw.items()}
  if mask is not None:
    tkw["encoder_attention_mask"] = torch.from_numpy(mask)
  out = tm(xt, torch.from_numpy(text), torch.from_numpy(t), **tkw).sample
  (out * torch.from_numpy(_nchw(w))).sum().backward()
  for h in hooks:
    h.remove()
  return out.detach().numpy(), xt.grad.numpy(), feats


# --------------------------------------------------------------------------------------------
# Parity with diffusers.

# pe_p2 runs without a mask (the None path), the others with one.
MASKED = ("sprint_rms_qk", "ln_qk")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_outputs_gradients_and_features(name):
  tm, module, variables = _setup(name)
  x, t, text, mask, kw = _inputs(module)
  mask = mask if name in MASKED else None
  w = np.random.default_rng(2).standard_normal(
      x.shape[:3] + (module.output_channels,)).astype(np.float32)
  ref_out, ref_grad, ref_feats = _torch_run(tm, x, t, text, mask, kw, w)

  def run(variables, x):
    def loss(x):
      out, feats = module.apply(variables, x, t, text, encoder_attention_mask=mask,
                                return_features=(0, -1), **kw)
      return jnp.sum(out * w), (out, feats)
    (_, (out, feats)), grad = jax.value_and_grad(loss, has_aux=True)(x)
    return out, grad, feats

  out, grad, feats = _compile(run, variables, x)(variables, x)
  assert out.shape == x.shape[:3] + (module.output_channels,)
  tokens = module.sample_size**2 // module.patch_size**2
  assert sorted(feats) == [-1, 0] and feats[0].shape == (2, tokens, module.hidden_size)
  assert rel_err(_nchw(out), ref_out) < TOL
  assert rel_err(_nchw(grad), ref_grad) < TOL
  assert rel_err(feats[0], ref_feats[0]) < TOL
  assert rel_err(feats[-1], ref_feats[module.num_layers - 1]) < TOL


def test_the_mask_matters():
  """The masked parity tests would be vacuous if masking two tokens changed nothing."""
  tm, module, _ = _setup("sprint_rms_qk")
  x, t, text, mask, kw = _inputs(module)
  tkw = {k: torch.from_numpy(v) for k, v in kw.items()}
  args = (torch.from_numpy(_nchw(x)), torch.from_numpy(text), torch.from_numpy(t))
  with torch.no_grad():
    masked = tm(*args, encoder_attention_mask=torch.from_numpy(mask), **tkw).sample.numpy()
    plain = tm(*args, **tkw).sample.numpy()
  assert rel_err(masked[0], plain[0]) > 1e-3
  np.testing.assert_allclose(masked[1], plain[1], rtol=1e-5, atol=1e-6)  # all-ones row


def test_guidance_is_required_iff_embedded():
  _, sprint, v = _setup("sprint_rms_qk")
  x, t, text, _, _ = _inputs(sprint)
  with pytest.raises(ValueError, match="guidance"):
    sprint.apply(v, x, t, text)
  _, plain, v = _setup("pe_p2")
  x, t, text, _, _ = _inputs(plain)
  with pytest.raises(ValueError, match="guidance"):
    plain.apply(v, x, t, text, guidance=np.ones(2, np.float32))


# --------------------------------------------------------------------------------------------
# Conversion.

@pytest.mark.parametrize("name", ["pe_p2", "sprint_rms_qk"])
def test_round_trip_is_bit_identical(name):
  tm, module, variables = _setup(name)
  back = to_diffusers(module, variables)
  ref, got = tm.state_dict(), back.state_dict()
  assert sorted(ref) == sorted(got)
  for k in ref:
    assert ref[k].dtype == got[k].dtype and torch.equal(ref[k], got[k]), k
  for k, v in tm.config.items():
    if not k.startswith("_"):
      assert back.config[k] == v, k


def test_bf16_round_trip_keeps_dtype_and_bits():
  tm = random_sana("ln_qk").to(torch.bfloat16)
  module, variables = from_diffusers(tm)
  assert module.param_dtype == jnp.bfloat16
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(variables))
  back = to_diffusers(module, variables)
  for k, v in tm.state_dict().items():
    assert back.state_dict()[k].dtype == torch.bfloat16 and torch.equal(back.state_dict()[k], v)


def test_missing_unexpected_and_misshaped_keys_raise_one_error_naming_them():
  tm, module, _ = _setup("sprint_rms_qk")
  state = dict(tm.state_dict())
  del state["transformer_blocks.1.attn2.norm_k.weight"]
  state["transformer_blocks.0.attn1.extra.weight"] = torch.zeros(3)
  state["time_embed.guidance_embedder.linear_1.weight"] = torch.zeros(32, 255)
  with pytest.raises(ValueError) as err:
    sana_convert.params_from_state_dict(module, state)
  msg = str(err.value)
  assert "transformer_blocks.1.attn2.norm_k.weight" in msg
  assert "transformer_blocks.0.attn1.extra.weight" in msg
  assert "time_embed.guidance_embedder.linear_1.weight" in msg and "(32, 256)" in msg
  assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg


def test_config_mismatch_and_flax_side_mismatch_raise():
  tm, module, variables = _setup("pe_p2")
  with pytest.raises(ValueError, match="transformer_blocks.2"):
    sana_convert.from_config_state(dict(tm.config, num_layers=3), tm.state_dict())
  with pytest.raises(ValueError, match="norm_q"):  # weights have no QK-norm
    sana_convert.from_config_state(dict(tm.config, qk_norm="rms_norm_across_heads"),
                                   tm.state_dict())
  params = dict(variables["params"])
  del params["proj_out"]
  with pytest.raises(ValueError, match="proj_out/kernel"):
    sana_convert.state_dict_from_params(module, {"params": params})


def test_unsupported_config_raises_naming_the_key():
  cfg = dict(CONFIGS["pe_p2"], qk_norm="rms_norm")
  with pytest.raises(ValueError, match="qk_norm='rms_norm'"):
    sana_convert.module_from_config(cfg)
  with pytest.raises(ValueError, match="cross_attention_dim=48"):
    sana_convert.module_from_config(dict(CONFIGS["pe_p2"], cross_attention_dim=48))
  with pytest.raises(ValueError, match="cross_attention_dim=None"):
    sana_convert.module_from_config(dict(CONFIGS["pe_p2"], cross_attention_dim=None))


def test_diffusers_directory_loads(tmp_path):
  tm, module, variables = _setup("sprint_rms_qk")
  tm.save_pretrained(str(tmp_path / "saved"))
  loaded, loaded_vars = load_diffusers_dir(str(tmp_path / "saved"))
  assert loaded == module
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded_vars, variables)
  save_diffusers_dir(module, variables, str(tmp_path / "ours"))
  again = diffusers.SanaTransformer2DModel.from_pretrained(str(tmp_path / "ours"))
  for k, v in tm.state_dict().items():
    assert torch.equal(again.state_dict()[k], v), k


def test_peft_lora_export_names_torch_modules():
  """A models.lora tree (the kernel leaf replaced by {lora_A, lora_B}) -> PEFT tensors."""
  _, module, _ = _setup("pe_p2")
  lora = {"transformer_blocks_1": {
      "attn1": {"to_q": {"kernel": {"lora_A": np.ones((32, 4), np.float32),
                                    "lora_B": np.ones((4, 32), np.float32)}}},
      "ff": {"conv_inverted": {"kernel": {"lora_A": np.ones((1, 1, 32, 4), np.float32),
                                          "lora_B": np.ones((4, 160), np.float32)}}}}}
  tensors, config = CONVERTERS.get("SanaTransformer2DModel").peft_lora(
      module, {"params": lora}, rank=4, alpha=4.0)
  assert config["target_modules"] == ["transformer_blocks.1.attn1.to_q",
                                      "transformer_blocks.1.ff.conv_inverted"]
  prefix = "base_model.model.transformer_blocks.1"
  assert tensors[f"{prefix}.attn1.to_q.lora_A.weight"].shape == (4, 32)
  assert tensors[f"{prefix}.ff.conv_inverted.lora_B.weight"].shape == (160, 4, 1, 1)


def test_registries_and_overrides():
  tm, _, _ = _setup("pe_p2")
  assert "SanaTransformer2DModel" in CONVERTERS and "AutoencoderDC" in CONVERTERS
  assert isinstance(build_model("sana", num_layers=1), Sana)
  module, variables = from_diffusers(tm, dtype=jnp.bfloat16, remat="full")
  assert module.dtype == jnp.bfloat16 and module.remat == "full"
  assert module.diffusers_class == "SanaTransformer2DModel" and module.hidden_size == 32


# --------------------------------------------------------------------------------------------
# Module properties (no torch reference needed).

def test_every_parameter_has_logical_axes():
  module = Sana(**{k: v for k, v in CONFIGS["sprint_rms_qk"].items()},
                norm_elementwise_affine=True)
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *module.dummy_inputs(1),
                                             **module.dummy_kwargs(1)))
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda z: isinstance(z, nn.Partitioned))
  assert len(leaves) > 40
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), name
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, name
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named)), name


def _randomize(abstract, seed=0, std=0.2, dtype=None):
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(abstract))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(std * rng.standard_normal(a.shape), dtype or a.dtype) for a in leaves])


def _enable_x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:  # older jax
    from jax.experimental import enable_x64 as ctx  # pylint: disable=import-outside-toplevel
  return ctx(True)


def test_jvp_in_x_and_t_matches_float64_finite_difference():
  """Forward-mode tangent in (x, t) vs a float64 central difference (error ~ eps^2)."""
  with _enable_x64():
    cfg = dict(CONFIGS["sprint_rms_qk"], out_channels=4)
    model = Sana(**cfg, dtype=jnp.float64, param_dtype=jnp.float64)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(1),
                                                 **model.dummy_kwargs(1)))
    v = _randomize(abstract, dtype=jnp.float64)
    x, t, text, mask, kw = _inputs(model)
    x, t, text = (jnp.asarray(a, jnp.float64) for a in (x, t, text))
    rng = np.random.default_rng(5)
    dx = jnp.asarray(rng.standard_normal(x.shape))
    dt = jnp.asarray([1.0, -2.0])

    def f(x, t):
      return model.apply(v, x, t, text, encoder_attention_mask=mask,
                         guidance=jnp.asarray(kw["guidance"], jnp.float64))

    jvp = _compile(lambda x, t: jax.jvp(f, (x, t), (dx, dt)), x, t)  # serves the FD too
    out, tangent = jvp(x, t)
    eps = 1e-6
    fd = (jvp(x + eps * dx, t + eps * dt)[0] - jvp(x - eps * dx, t - eps * dt)[0]) / (2 * eps)
    assert out.dtype == jnp.float64 and tangent.dtype == jnp.float64
    err = float(jnp.max(jnp.abs(tangent - fd)) / jnp.max(jnp.abs(fd)))
    assert err < 1e-7, err


@pytest.mark.parametrize("kw", [
    dict(num_attention_heads=4, attention_head_dim=32, num_layers=2, sample_size=16,
         patch_size=1, num_cross_attention_heads=4, cross_attention_head_dim=32,
         cross_attention_dim=128, caption_channels=96, mlp_ratio=2.5),
    dict(num_attention_heads=3, attention_head_dim=64, num_layers=1, sample_size=32,
         patch_size=2, num_cross_attention_heads=2, cross_attention_head_dim=96,
         cross_attention_dim=192, caption_channels=64, guidance_embeds=True,
         qk_norm="rms_norm_across_heads", interpolation_scale=1.0),
], ids=["p1", "p2_guidance_qk"])
def test_flops_match_xla_cost_analysis(kw):
  """Our matmul count vs XLA's (which also counts elementwise work)."""
  model = Sana(in_channels=8, out_channels=8, **kw)
  tokens = 24
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), *model.dummy_inputs(1), **model.dummy_kwargs(1))))
  s = model.sample_size
  x = jax.ShapeDtypeStruct((2, s, s, 8), jnp.float32)
  text = jax.ShapeDtypeStruct((2, tokens, model.caption_channels), jnp.float32)
  fn = lambda v, x, c: model.apply(v, x, jnp.ones((2,)), c, **model.dummy_kwargs(2))  # noqa
  # The lowered (unoptimised) module's count: the same number as after compiling (checked),
  # without paying for the compile.
  cost = jax.jit(fn).lower(abstract, x, text).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = flops_per_example(model, tokens=tokens)
  ratio = cost["flops"] / (2 * ours)
  assert abs(ratio - 1) < 0.05, ratio
  assert model.flops_per_example(s, s, tokens) == ours
