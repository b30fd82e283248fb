"""The toy MLP denoiser: shapes, conditioning, zero-init extras, partitioning, FLOP count.

Compilation dominates on CPU (a Flax `init` costs seconds, mostly in the PRNG), so only the
zero-init test runs the real (jitted) initialiser; the other tests fill the parameter tree of
`jax.eval_shape(model.init)` with seeded numpy values and run the forward pass eagerly (all
models share the same widths, so the per-primitive executables are compiled once).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.mlp import MLPDenoiser, sinusoidal_embedding
from models.registry import build_model

SMALL = dict(hidden=32, depth=2, time_embed_dim=16)
B = 8


def _inputs(dim=2, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.standard_normal((B, dim)), jnp.float32),
          jnp.asarray(rng.uniform(0, 999.0, B), jnp.float32))


def _random_variables(model, x, t, seed=0, **kw):
  """The model's (unboxed) variable tree filled with N(0, 0.3^2) values: no PRNG compiles."""
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, **kw))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


def test_registered_and_output_shape():
  model = build_model("mlp", dim=3, **SMALL)
  assert isinstance(model, MLPDenoiser)
  x, t = _inputs(3)
  variables = _random_variables(model, x, t)
  out = model.apply(variables, x, t)
  assert out.shape == (B, 3) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  scalar = model.apply(variables, x, jnp.float32(5.0))  # a scalar timestep broadcasts
  np.testing.assert_allclose(scalar, model.apply(variables, x, jnp.full((B,), 5.0)), rtol=1e-6)
  assert not np.allclose(model.apply(variables, x, t + 1.0), out)  # the time input is live
  with pytest.raises(ValueError, match="expects"):
    jax.eval_shape(model.apply, variables, jnp.zeros((B, 2)), t)


def test_sinusoidal_embedding():
  emb = sinusoidal_embedding(jnp.array([0.0, 1.0]), 8)
  assert emb.shape == (2, 8)
  np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
  freqs = 10_000.0 ** (-np.arange(4) / 4)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(freqs), np.sin(freqs)]), rtol=1e-6)


def test_time_scale_and_null_class_conditioning():
  """`time_scale` multiplies the timestep; `None` labels mean the null class `num_classes`."""
  model = MLPDenoiser(**SMALL, num_classes=4)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  assert variables["params"]["class_embed"]["embedding"].shape == (5, 32)  # 4 + the null class
  f = lambda labels: model.apply(variables, x, t, labels)
  none, null = f(None), f(jnp.full((B,), 4))
  zeros, ones = f(jnp.zeros((B,), jnp.int32)), f(jnp.ones((B,), jnp.int32))
  mixed = f(jnp.array([0, 1] * (B // 2)))
  np.testing.assert_array_equal(none, null)
  assert not np.allclose(zeros, null) and not np.allclose(zeros, ones)
  np.testing.assert_allclose(mixed[0::2], zeros[0::2], rtol=1e-6)  # labels act per example
  np.testing.assert_allclose(mixed[1::2], ones[1::2], rtol=1e-6)
  scaled = MLPDenoiser(**SMALL, num_classes=4, time_scale=1000.0)
  np.testing.assert_allclose(scaled.apply(variables, x, t / 1000.0), none, rtol=1e-4, atol=1e-5)


def test_unconditional_model_ignores_labels():
  model = MLPDenoiser(**SMALL)
  x, t = _inputs()
  variables = _random_variables(model, x, t)
  assert "class_embed" not in variables["params"]
  np.testing.assert_array_equal(model.apply(variables, x, t, jnp.zeros((B,), jnp.int32)),
                                model.apply(variables, x, t))


def test_zero_init_extras_start_like_the_plain_model():
  x, t = _inputs()
  labels = jnp.arange(B) % 3
  plain = MLPDenoiser(**SMALL, num_classes=3)
  extra = MLPDenoiser(**SMALL, num_classes=3, extra_time_input=True, guidance_embed=True)
  params = nn.unbox(jax.jit(extra.init)(jax.random.key(1), x, t, timestep2=t * 0.5,
                                        guidance=jnp.full((B,), 3.0)))["params"]
  shared = {k: v for k, v in params.items() if k not in ("time2_embed", "guidance_embed")}
  plain_shapes = nn.unbox(jax.eval_shape(plain.init, jax.random.key(1), x, t))["params"]
  assert jax.tree_util.tree_structure(shared) == jax.tree_util.tree_structure(plain_shapes)
  for name in ("time2_embed", "guidance_embed"):
    assert not np.any(params[name]["fc2"]["kernel"]) and not np.any(params[name]["fc2"]["bias"])
    assert np.any(params[name]["fc1"]["kernel"])  # only the last layer is zero

  def out(p, t2, w):
    return extra.apply({"params": p}, x, t, labels, timestep2=t2, guidance=w)

  ref = plain.apply({"params": shared}, x, t, labels)
  np.testing.assert_array_equal(out(params, None, None), ref)
  np.testing.assert_array_equal(out(params, t * 0.5, jnp.full((B,), 7.0)), ref)

  # The extras are live: once their last layer is non-zero the output depends on them.
  rng = np.random.default_rng(0)
  bumped = jax.tree_util.tree_map(lambda v: v, params)
  for name in ("time2_embed", "guidance_embed"):
    kernel = bumped[name]["fc2"]["kernel"]
    bumped[name]["fc2"]["kernel"] = jnp.asarray(0.1 * rng.standard_normal(kernel.shape),
                                                kernel.dtype)
  w2 = jnp.full((B,), 2.0)
  base = out(bumped, t * 0.5, w2)
  assert not np.allclose(out(bumped, t * 0.9, w2), base)
  assert not np.allclose(out(bumped, t * 0.5, w2 + 3.0), base)


def test_parameters_carry_logical_axis_names():
  model = MLPDenoiser(**SMALL, num_classes=2, extra_time_input=True)
  x, t = _inputs()
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  boxed = jax.tree_util.tree_leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert boxed and all(isinstance(v, nn.Partitioned) for v in boxed)
  allowed = {None, "embed", "mlp", "norm"}
  for v in boxed:
    assert set(v.names) <= allowed and len(v.names) == v.value.ndim
  specs = nn.get_partition_spec(variables)["params"]
  assert tuple(specs["block_0"]["fc1"]["kernel"]) == ("embed", "mlp")
  assert tuple(specs["block_0"]["fc2"]["kernel"]) == ("mlp", "embed")
  assert tuple(specs["block_0"]["norm"]["scale"]) == ("norm",)


@pytest.mark.parametrize("kw", [
    dict(dim=2),  # the default 256 x 4
    dict(dim=5, hidden=128, depth=3, mlp_ratio=2, num_classes=10, extra_time_input=True,
         guidance_embed=True),
])
def test_flops_per_example_matches_xla_cost_analysis(kw):
  model = MLPDenoiser(**kw)
  x, t = jnp.zeros((16, kw["dim"])), jnp.zeros((16,))
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  compiled = jax.jit(model.apply).lower(variables, x, t).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  xla = cost["flops"] / 16
  ours = model.flops_per_example()
  # XLA also counts element-wise work (norms, SiLU, sinusoids, biases), a few % at these widths.
  assert ours <= xla <= 1.1 * ours, (ours, xla)
