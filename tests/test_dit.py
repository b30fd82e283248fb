"""DiT module: shapes, extras, scan/remat equivalence, logical axes, FLOPs, JVP (no torch).

Parity with diffusers is in test_dit_convert.py.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.dit import (DiT, REMAT_POLICIES, apply_rope, flops_per_example, rope_2d,
                        stack_block_params, unstack_block_params)
from models.registry import build_model

AXIS_NAMES = {"embed", "mlp", "heads", "kv", "norm", "layers", "conv_in", "conv_out", None}
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)
ONE_BLOCK = dict(TINY, num_layers=1)
EXTRAS = dict(norm="rms", qk_norm=True, rope=True, pos_embed="none", mlp="swiglu",
              guidance_embed=True, timestep2_embed=True)


def randomize(variables, seed=0, std=0.05):
  """Every parameter at random (the zero-initialised adaLN/final layers would hide bugs).

  Drawn with numpy from (possibly abstract) variables: compiling `init` costs seconds on CPU.
  """
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(variables))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(std * rng.standard_normal(x.shape), x.dtype) for x in leaves])


def abstract_variables(model):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(1)))


def init(model, seed=0, std=0.05):
  return randomize(abstract_variables(model), seed, std)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model, static):
  return jax.jit(lambda v, a, kw, r: model.apply(v, *a, rngs=r, **kw, **dict(static)))


def apply(model, variables, *args, rngs=None, **kwargs):
  """`model.apply` under jit, cached per model (eager Flax compiles every op separately)."""
  static = tuple(sorted((k, kwargs.pop(k)) for k in ("train", "return_features") if k in kwargs))
  return _jitted_apply(model, static)(variables, args, kwargs, rngs)


def batch(model, n=2, seed=1):
  s = model.sample_size
  x = np.random.default_rng(seed).standard_normal((n, s, s, model.in_channels))
  return (jnp.asarray(x, model.dtype), jnp.array([10.0, 700.0][:n]),
          jnp.array([3, model.num_embeds_ada_norm][:n]))


def test_shapes_learn_sigma_and_features():
  model = build_model("dit", **TINY, learn_sigma=True)
  v = init(model)
  out, feats = apply(model, v, *batch(model), return_features=(0, -1))
  assert out.shape == (2, 8, 8, 8)
  assert sorted(feats) == [-1, 0] and feats[-1].shape == (2, 16, 32)   # keyed as requested
  _, again = apply(model, v, *batch(model), return_features=(1,))
  np.testing.assert_array_equal(again[1], feats[-1])
  with pytest.raises(ValueError, match="guidance"):
    apply(model, v, *batch(model), guidance=jnp.ones(2))


def test_scan_equals_unscanned_with_restacked_params():
  plain = DiT(**dict(TINY, num_layers=3), **EXTRAS)
  scanned = plain.clone(scan_blocks=True, remat="full")
  v = init(plain)
  params = stack_block_params(v["params"], 3)
  ref = nn.meta.unbox(abstract_variables(scanned))["params"]
  assert jax.tree_util.tree_map(jnp.shape, ref) == jax.tree_util.tree_map(jnp.shape, params)
  x, t, y = batch(plain)
  kw = dict(guidance=jnp.array([1.0, 4.0]), timestep2=jnp.array([0.0, 300.0]),
            return_features=(1,))
  out0, f0 = jax.jit(lambda v: plain.apply(v, x, t, y, **kw))(v)
  out1, f1 = jax.jit(lambda p: scanned.apply({"params": p}, x, t, y, **kw))(params)
  np.testing.assert_allclose(out1, out0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(f1[1], f0[1], rtol=1e-6, atol=1e-6)
  back = unstack_block_params(params, 3)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, v["params"])


def test_scan_unroll_keeps_values_gradients_and_layout():
  """scan_unroll=2 over 3 blocks: one loop iteration of two blocks plus a remainder block."""
  plain = DiT(**dict(TINY, num_layers=3), **EXTRAS)
  scanned = plain.clone(scan_blocks=True)
  params = stack_block_params(init(plain)["params"], 3)
  x, t, y = batch(plain)

  def loss_and_grad(model):
    return jax.jit(jax.value_and_grad(
        lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, t, y,
                                              guidance=jnp.array([1.0, 4.0]))))))(params)

  ref = loss_and_grad(scanned)
  for unroll in (2, 3):
    model = scanned.clone(scan_unroll=unroll)
    assert (jax.tree_util.tree_map(jnp.shape, nn.meta.unbox(abstract_variables(model))["params"])
            == jax.tree_util.tree_map(jnp.shape, params))
    val, grad = loss_and_grad(model)
    np.testing.assert_allclose(val, ref[0], rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           grad, ref[1])
  # scan_unroll = num_layers leaves no loop in the lowered program; 1 keeps one.
  def loops(model):
    return jax.jit(lambda p: model.apply({"params": p}, x, t, y, guidance=jnp.ones(2))
                   ).lower(params).as_text().count("stablehlo.while")
  assert loops(scanned) == 1 and loops(scanned.clone(scan_unroll=3)) == 0


def test_remat_policies_keep_values_and_gradients():
  base = DiT(**ONE_BLOCK)
  x, t, y = batch(base)
  v = init(base)

  def all_policies(v):  # one compile for every policy
    out = {}
    for name in REMAT_POLICIES.names():
      model = base.clone(remat=name)
      out[name] = jax.value_and_grad(lambda v: jnp.sum(jnp.sin(model.apply(v, x, t, y))))(v)
    return out

  results = jax.jit(all_policies)(v)
  ref = results["none"]
  for name, (val, grad) in results.items():
    np.testing.assert_allclose(val, ref[0], rtol=1e-6, err_msg=name)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           grad, ref[1])


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
  model = DiT(**TINY, **EXTRAS, norm_elementwise_affine=True, scan_blocks=scan)
  boxed = abstract_variables(model)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda z: isinstance(z, nn.Partitioned))
  assert leaves
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) <= AXIS_NAMES, name
    named = [n for n in leaf.names if n is not None]
    assert len(named) == len(set(named)), name  # one mesh axis per dim
    if scan and "transformer_blocks" in name:
      assert leaf.names[0] == "layers", name


@pytest.mark.parametrize("kw", [
    dict(num_attention_heads=4, attention_head_dim=64, num_layers=2, sample_size=16,
         patch_size=2, learn_sigma=True),
    dict(num_attention_heads=3, attention_head_dim=64, num_layers=1, sample_size=32,
         patch_size=4, **EXTRAS),
], ids=["dit", "extras_p4"])
def test_flops_match_xla_cost_analysis(kw):
  """Our matmul count vs XLA's (which also counts elementwise work: expect +1-3%)."""
  model = DiT(in_channels=4, num_embeds_ada_norm=10, **kw)
  abstract = nn.meta.unbox(abstract_variables(model))
  x = jax.ShapeDtypeStruct((2, model.sample_size, model.sample_size, 4), jnp.float32)
  fn = lambda v, x: model.apply(v, x, jnp.ones((2,)), jnp.ones((2,), jnp.int32))
  cost = jax.jit(fn).lower(abstract, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ratio = cost["flops"] / (2 * flops_per_example(model))
  assert 0.99 < ratio < 1.05, ratio
  assert model.flops_per_example() == flops_per_example(model)


def test_jvp_matches_float64_finite_difference():
  """Forward-mode tangent vs a central difference in float64 (error ~ eps^2 ~ 1e-10)."""
  with jax.enable_x64(True):
    model = DiT(**TINY, **EXTRAS, dtype=jnp.float64, param_dtype=jnp.float64)
    v = init(model, std=0.2)
    x, t, y = batch(model)
    dx = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape))
    f = lambda x: model.apply(v, x, t, y, guidance=jnp.array([2.0, 3.0]))
    jvp = jax.jit(lambda x, dx: jax.jvp(f, (x,), (dx,)))  # one compile serves the FD too
    _, tangent = jvp(x, dx)
    eps = 1e-4
    fd = (jvp(x + eps * dx, dx)[0] - jvp(x - eps * dx, dx)[0]) / (2 * eps)
    assert tangent.dtype == jnp.float64
    err = float(jnp.max(jnp.abs(tangent - fd)) / jnp.max(jnp.abs(fd)))
    assert err < 1e-7, err


def test_fresh_extras_are_identity_and_then_matter():
  plain = DiT(**ONE_BLOCK)
  extra = plain.clone(guidance_embed=True, timestep2_embed=True)
  # "rbg" keys compile much faster than threefry on CPU.
  v = nn.meta.unbox(jax.jit(extra.init)(jax.random.key(0, impl="rbg"), *extra.dummy_inputs(1)))
  # Randomise the base but keep the zero-initialised last layers of the new embedders.
  base = {k: p for k, p in v["params"].items() if not k.endswith("_embedder")}
  base = randomize({"params": base})["params"]
  params = dict(v["params"], **base)
  x, t, y = batch(plain)
  ref = apply(plain, {"params": base}, x, t, y)
  for w, t2 in [(None, None), (jnp.array([1.0, 7.5]), jnp.array([5.0, 900.0]))]:
    out = apply(extra, {"params": params}, x, t, y, guidance=w, timestep2=t2)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  params = randomize({"params": params})["params"]
  t2 = jnp.array([5.0, 900.0])
  a, b = (apply(extra, {"params": params}, x, t, y, guidance=jnp.array([1.0, w]), timestep2=t2)
          for w in (1.0, 6.0))
  np.testing.assert_allclose(a[0], b[0], rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(a[1] - b[1]))) > 1e-4


def test_label_dropout_and_null_class():
  model = DiT(**ONE_BLOCK, class_dropout_prob=1.0)
  v = init(model)
  x, t, y = batch(model)
  null = apply(model, v, x, t, None)
  dropped = apply(model, v, x, t, y, train=True, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(dropped, null, rtol=1e-6, atol=1e-7)
  assert float(jnp.max(jnp.abs(apply(model, v, x, t, y) - null))) > 1e-4


def test_rope_is_relative():
  cos, sin = rope_2d(3, 4, 8)
  rng = np.random.default_rng(0)
  q = jnp.asarray(np.broadcast_to(rng.standard_normal(8), (1, 12, 1, 8)), jnp.float32)
  k = jnp.asarray(np.broadcast_to(rng.standard_normal(8), (1, 12, 1, 8)), jnp.float32)
  qr, kr = apply_rope(q, (cos, sin))[0, :, 0], apply_rope(k, (cos, sin))[0, :, 0]
  np.testing.assert_allclose(jnp.linalg.norm(qr, axis=-1), jnp.linalg.norm(q[0, :, 0], axis=-1),
                             rtol=1e-6)
  dot = lambda i, j: float(qr[i] @ kr[j])
  # Positions (row, col) -> index row*4 + col: the shift (1, 1) gives the same score anywhere.
  assert abs(dot(0, 5) - dot(6, 11)) < 1e-5
  assert abs(dot(0, 5) - dot(0, 6)) > 1e-4


def test_bf16_compute_is_close_to_fp32():
  model = DiT(**ONE_BLOCK)
  v = init(model)
  x, t, y = batch(model)
  ref = apply(model, v, x, t, y)
  out = apply(model.clone(dtype=jnp.bfloat16), v, x, t, y)
  assert out.dtype == jnp.bfloat16
  # bf16 has 8 mantissa bits; a block of matmuls keeps the error near 1e-2 of the scale.
  assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) < 3e-2
