"""Functional LoRA: selection, zero-B identity, merged == unmerged reference, stacked kernels."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.dit import DiT, stack_block_params
from models.lora import (LORA_A, LORA_B, lora_dense, lora_init, lora_param_count, lora_scale,
                         lora_targets)
from models.lora import lora_merge as _lora_merge

# Merging runs inside the jitted loss in training; eager it would compile every small op.
lora_merge = jax.jit(_lora_merge, static_argnames=("scale", "alpha"))

def key(i):
  return jax.random.key(i, impl="rbg")  # compiles much faster than threefry on CPU


DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
           sample_size=8, patch_size=2, num_embeds_ada_norm=10)


class ConvDense(nn.Module):
  """A conv (3x3) then a Dense: the two kernel kinds LoRA adapts."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(6, (3, 3), padding="SAME", name="conv")(x)
    return nn.Dense(5, name="dense")(jnp.tanh(h))


def dit_params(**kw):
  model = DiT(**DIT, **kw)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *model.dummy_inputs(1)))
  leaves, tree = jax.tree_util.tree_flatten(nn.meta.unbox(abstract)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_unflatten(
      tree, [jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype) for x in leaves])
  return model, params


def test_pattern_selects_exactly_the_expected_kernels():
  _, params = dit_params()
  assert lora_targets(params, r"attn/(to_q|to_v)") == [
      f"transformer_blocks_{i}/attn/{n}/kernel" for i in (0, 1) for n in ("to_q", "to_v")]
  assert lora_targets(params, r"mlp") == [
      f"transformer_blocks_{i}/mlp/{n}/kernel" for i in (0, 1) for n in ("fc1", "fc2")]
  assert lora_targets(params, r"^patch_embed") == ["patch_embed/kernel"]
  # Biases, norms and embedding tables are never adapted.
  assert lora_targets(params, r"embedding_table|bias") == []
  lora = lora_init(params, r"transformer_blocks_1/attn/to_out", 3, key(0))
  assert list(lora) == ["transformer_blocks_1"]
  entry = lora["transformer_blocks_1"]["attn"]["to_out"]["kernel"]
  assert entry[LORA_A].shape == (16, 3) and entry[LORA_B].shape == (3, 16)
  assert lora_param_count(lora) == 2 * 16 * 3
  with pytest.raises(ValueError, match="selects no"):
    lora_init(params, r"nothing_matches", 3, key(0))


def test_zero_b_init_is_the_base_model():
  model, params = dit_params()
  lora = lora_init(params, r"attn|mlp|patch_embed|norm1/linear", 4, key(1))
  merged = lora_merge(params, lora, alpha=8.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, merged, params)
  a = lora["transformer_blocks_0"]["attn"]["to_q"]["kernel"][LORA_A]
  # PEFT's kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in = 16.
  assert float(jnp.max(jnp.abs(a))) <= 1 / 16**0.5 and float(jnp.std(a)) > 0.05


def _randomize_b(lora, seed=2):
  leaves, tree = jax.tree_util.tree_flatten_with_path(lora)
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_unflatten(tree, [
      jnp.asarray(rng.standard_normal(x.shape), x.dtype) if path[-1].key == LORA_B else x
      for path, x in leaves])


def test_merged_equals_unmerged_reference():
  model = ConvDense()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 5, 3)), jnp.float32)
  params = jax.jit(model.init)(key(0), x)["params"]
  lora = _randomize_b(lora_init(params, r"conv|dense", 2, key(1)))
  alpha, scale = 4.0, 0.7
  mult = lora_scale(2, alpha, scale)
  out = jax.jit(model.apply)({"params": lora_merge(params, lora, scale=scale, alpha=alpha)}, x)

  # Reference: base layers plus PEFT's unmerged low-rank branches.
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  c, c_l = params["conv"], lora["conv"]["kernel"]
  h = conv(x, c["kernel"]) + c["bias"] + conv(x, c_l[LORA_A]) @ c_l[LORA_B] * mult
  d = params["dense"]
  ref = lora_dense(jnp.tanh(h), d["kernel"], d["bias"], lora["dense"]["kernel"], mult)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(out - jax.jit(model.apply)({"params": params}, x)))) > 1e-2


def test_stacked_kernels_get_one_adapter_per_layer():
  _, params = dit_params()
  scanned = stack_block_params(params, 2)
  lora = _randomize_b(lora_init(scanned, r"attn/to_k", 2, key(0)))
  entry = lora["transformer_blocks"]["attn"]["to_k"]["kernel"]
  assert entry[LORA_A].shape == (2, 16, 2) and entry[LORA_B].shape == (2, 2, 16)
  merged = lora_merge(scanned, lora)
  for layer in range(2):
    want = (scanned["transformer_blocks"]["attn"]["to_k"]["kernel"][layer]
            + entry[LORA_A][layer] @ entry[LORA_B][layer])
    np.testing.assert_allclose(merged["transformer_blocks"]["attn"]["to_k"]["kernel"][layer],
                               want, rtol=1e-6, atol=1e-7)


def test_gradients_flow_to_lora_only_through_the_merge():
  model, params = dit_params()
  lora = lora_init(params, r"attn/to_v", 2, key(0))
  x = jnp.ones((1, 8, 8, 4))

  def loss(lora):
    out = model.apply({"params": _lora_merge(params, lora)}, x, jnp.ones(1), jnp.ones(1, int))
    return jnp.sum(out**2)

  grads = jax.jit(jax.grad(loss))(lora)
  g = grads["transformer_blocks_0"]["attn"]["to_v"]["kernel"]
  assert float(jnp.max(jnp.abs(g[LORA_B]))) > 0  # B moves first (A's grad is 0 while B = 0)
  assert float(jnp.max(jnp.abs(g[LORA_A]))) == 0
