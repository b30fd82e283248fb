"""The sCM tangent pass through a DiT with the fused JVP attention (Pallas, interpret mode on
CPU) equals the same tangent with XLA attention, which tests/test_dit.py checks against a
float64 central finite difference; a custom_vjp attention cannot be pushed through jax.jvp."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.dit import DiT


def _tangent(model, variables, x, t, y, dx, dt):
  f = lambda xx, tt: model.apply(variables, xx, tt, y)
  return jax.jvp(f, (x, t), (dx, dt))


@pytest.mark.slow
def test_dit_jvp_with_pallas_jvp_attention_matches_xla():
  kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  ref = DiT(**kw)
  key = jax.random.PRNGKey(0)
  kx, kt, kd, kp = jax.random.split(key, 4)
  x = jax.random.normal(kx, (2, 8, 8, 4))
  t = jnp.array([10.0, 500.0])
  y = jnp.array([1, 3])
  variables = ref.init(kp, x, t, y)
  # Randomise every parameter (zero-initialised adaLN layers would hide attention entirely).
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(kd, len(leaves))
  variables = jax.tree_util.tree_unflatten(
      tree, [0.05 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  dx = jax.random.normal(kd, x.shape)
  dt = jnp.array([1.0, -2.0])
  p_ref, t_ref = _tangent(ref, variables, x, t, y, dx, dt)
  fused = ref.clone(attention="pallas_jvp")
  p_fused, t_fused = _tangent(fused, variables, x, t, y, dx, dt)
  scale = float(jnp.max(jnp.abs(t_ref)))
  assert scale > 0
  # float32 blockwise online softmax vs the plain softmax: ~1e-6 relative.
  np.testing.assert_allclose(p_fused, p_ref, atol=2e-5 * float(jnp.max(jnp.abs(p_ref))))
  np.testing.assert_allclose(t_fused, t_ref, atol=2e-5 * scale)
  with pytest.raises(TypeError):
    _tangent(ref.clone(attention="pallas"), variables, x, t, y, dx, dt)


@pytest.mark.slow
def test_dit_shared_primal_pass_with_kernel_pair_matches_xla():
  """sCM's shared pass through a DiT: one jax.jvp inside the parameter gradient, the attention
  the pair (pallas primal and backward, pallas_jvp tangent); output, tangent and parameter
  gradient equal the all-xla pass."""
  from models.attention import shared_primal_impl
  kw = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)
  ref = DiT(**kw)
  kx, kt, kd, kp = jax.random.split(jax.random.PRNGKey(1), 4)
  x = jax.random.normal(kx, (2, 8, 8, 4))
  t, y = jnp.array([0.3, 0.9]), jnp.array([1, 3])
  variables = ref.init(kp, x, t, y)
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(kd, len(leaves))
  variables = jax.tree_util.tree_unflatten(
      tree, [0.05 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
  dx, dt = jax.random.normal(kt, x.shape), jnp.array([1.0, -2.0])
  c = jax.random.normal(kd, x.shape)

  def loss(model, v):
    out, tan = _tangent(model, v, x, t, y, dx, dt)
    tan = jax.lax.stop_gradient(tan)
    return jnp.sum(c * out) + jnp.sum(jnp.tanh(out) * tan), (out, tan)

  pair = ref.clone(attention=shared_primal_impl("pallas", "pallas_jvp"))
  grad, (out, tan) = jax.jit(jax.grad(lambda v: loss(pair, v), has_aux=True))(variables)
  ref_grad, (ref_out, ref_tan) = jax.jit(jax.grad(lambda v: loss(ref, v), has_aux=True))(
      variables)
  # float32 blockwise online softmax vs the plain softmax: ~1e-6 relative, so 2e-5 of each
  # array's scale (for gradients the largest leaf's: the key bias' is 0 up to round-off).
  g_scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(ref_grad))
  np.testing.assert_allclose(out, ref_out, atol=2e-5 * float(jnp.max(jnp.abs(ref_out))))
  np.testing.assert_allclose(tan, ref_tan, atol=2e-5 * float(jnp.max(jnp.abs(ref_tan))))
  for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(ref_grad)):
    np.testing.assert_allclose(a, b, atol=2e-5 * g_scale)
  assert float(jnp.max(jnp.abs(ref_tan))) > 0
