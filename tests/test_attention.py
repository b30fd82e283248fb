"""Attention implementations against the plain-jnp `xla` reference (CPU, float32, interpret mode).

Tolerances. The inputs are standard normal, so outputs, gradients and tangents are O(1). The
kernels reorder the same float32 sums (blockwise online softmax), measured max abs error
<= 1e-6 on CPU at `jax_default_matmul_precision="highest"`; we assert rtol = atol = 1e-5
(`TOL`). Finite differences are taken in float64 with a central step of 1e-6 (truncation
~1e-12, round-off ~1e-10), so the float64 `xla` tangent matches them to 1e-8 and the float32
kernel tangent to `TOL`. bfloat16 kernels are compared with the float32 reference at 3e-2
(bf16 has an 8-bit mantissa, ~4e-3 relative per rounding, compounded over the sums).
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from models import attention as attn
from models.attention import ATTENTION, BlockSizes, attention, sharded_attention

TOL = dict(rtol=1e-5, atol=1e-5)
SMALL = BlockSizes(16, 16, 16, 16, 16, 16)   # several tiles even for the short test sequences

# (B, Lq, Lk, H, D, block sizes). Lengths not multiples of 16, D = 72 (DiT-XL), B, H > 1,
# cross-attention (Lq != Lk), and one shape that fits a single default block.
SHAPES = [
    pytest.param((2, 40, 40, 2, 72, SMALL), id="B2-L40-H2-D72-blk16"),
    pytest.param((1, 24, 50, 3, 32, SMALL), id="B1-Lq24-Lk50-H3-D32-blk16"),
    pytest.param((1, 64, 64, 2, 64, None), id="B1-L64-H2-D64-default"),
    pytest.param((2, 80, 80, 2, 72, BlockSizes(32, 32, 16, 32, 32, 16)), id="B2-L80-H2-D72-mixed",
                 marks=pytest.mark.slow),
]


# Jitted references: eager jnp would compile every primitive separately (slow on CPU).
_ref = jax.jit(attention)
_ref_jvp = jax.jit(lambda p, t: jax.jvp(attention, p, t))


def _inputs(shape, n=3, seed=0, dtype=jnp.float32):
  b, lq, lk, h, d, _ = shape
  keys = jax.random.split(jax.random.key(seed), n)
  shapes = [(b, lq, h, d), (b, lk, h, d), (b, lk, h, d)] * (n // 3)
  return [jax.random.normal(kk, s, dtype) for kk, s in zip(keys, shapes)]


def _close(a, b, **tol):
  np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), **(tol or TOL))


def test_registry_and_impl_check():
  assert ATTENTION.names() == ["cudnn", "mosaic_jvp", "pallas", "pallas_jvp", "splash", "xla"]
  attn.check_impls("pallas", "pallas_jvp")
  attn.check_impls("splash", "xla")
  attn.check_impls("splash", "mosaic_jvp")
  with pytest.raises(ValueError, match="model.attention='mosaic_jvp' cannot serve"):
    attn.check_impls("mosaic_jvp", "xla")
  with pytest.raises(ValueError, match="model.jvp_attention='pallas' cannot serve"):
    attn.check_impls("xla", "pallas")
  with pytest.raises(ValueError, match="model.attention='pallas_jvp' cannot serve"):
    attn.check_impls("pallas_jvp", "xla")
  with pytest.raises(ValueError, match="unknown attention implementation"):
    attn.check_impls("flash", "xla")
  with pytest.raises(ValueError, match="powers of two"):
    BlockSizes(block_q=48)


def test_xla_reference_matches_jax_nn():
  """The reference equals jax.nn.dot_product_attention, also with a mask and a bias."""
  q, k, v = _inputs((2, 12, 20, 2, 8, None))
  mask = jax.random.bernoulli(jax.random.key(1), 0.7, (2, 1, 12, 20)).at[..., 0].set(True)
  bias = jax.random.normal(jax.random.key(2), (1, 2, 12, 20))
  ours = jax.jit(lambda q, k, v, m, b: (attention(q, k, v),
                                         attention(q, k, v, mask=m, bias=b, scale=0.3)))
  theirs = jax.jit(lambda q, k, v, m, b: (
      jax.nn.dot_product_attention(q, k, v),
      jax.nn.dot_product_attention(q, k, v, bias=b, mask=m, scale=0.3)))
  for a, b in zip(ours(q, k, v, mask, bias), theirs(q, k, v, mask, bias)):
    _close(a, b)


@pytest.mark.parametrize("shape", SHAPES)
def test_pallas_forward_and_grad(shape):
  """Forward, and d/d(q, k, v) of a random scalar loss, through the custom_vjp kernels."""
  q, k, v = _inputs(shape)
  w = jax.random.normal(jax.random.key(7), q.shape)
  bs = shape[-1]

  def loss(impl):
    def f(q, k, v):
      out = attention(q, k, v, impl=impl, block_sizes=bs)
      return jnp.sum(w * out), out
    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)

  (_, out), grads = jax.jit(loss("pallas"))(q, k, v)
  (_, ref_out), ref = jax.jit(loss("xla"))(q, k, v)
  _close(out, ref_out)
  for g, r in zip(grads, ref):
    _close(g, r)


@pytest.mark.parametrize("shape", SHAPES)
def test_pallas_jvp_matches_xla_jvp(shape):
  """Primal and tangent of the fused kernel against jax.jvp of the reference."""
  q, k, v, tq, tk, tv = _inputs(shape, n=6)
  bs = shape[-1]
  fused = jax.jit(lambda p, t: jax.jvp(
      lambda q, k, v: attention(q, k, v, impl="pallas_jvp", block_sizes=bs), p, t))
  out, tan = fused((q, k, v), (tq, tk, tv))
  ref_out, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  _close(out, ref_out)
  _close(tan, ref_tan)


def test_pallas_jvp_primal_path():
  """Without jax.jvp, `pallas_jvp` runs the plain forward kernel."""
  q, k, v = _inputs((1, 40, 40, 1, 72, SMALL))
  _close(attention(q, k, v, impl="pallas_jvp", block_sizes=SMALL), _ref(q, k, v))


# (B, Lq, Lk, H, D): one block per axis with padding (200 -> 256, D 72 -> 128); cross attention
# over three key blocks with a padded last one (300 -> 384, the online-softmax rescaling); five
# query and key blocks (520 -> 640).
MOSAIC_SHAPES = [
    pytest.param((2, 200, 200, 2, 72), id="B2-L200-H2-D72"),
    pytest.param((1, 24, 300, 2, 72), id="B1-Lq24-Lk300-H2-D72"),
    pytest.param((1, 520, 520, 1, 32), id="B1-L520-H1-D32", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", MOSAIC_SHAPES)
def test_mosaic_jvp_matches_xla_jvp(shape):
  """The TPU (Mosaic) fused kernel in Pallas interpret mode: primal and tangent against jax.jvp
  of the reference, and its primal-only path (no jax.jvp) against the reference forward."""
  q, k, v, tq, tk, tv = _inputs(shape + (None,), n=6, seed=5)
  fused = lambda q, k, v: attention(q, k, v, impl="mosaic_jvp", interpret=True)
  out, tan = jax.jit(lambda p, t: jax.jvp(fused, p, t))((q, k, v), (tq, tk, tv))
  ref_out, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  assert float(jnp.max(jnp.abs(ref_tan))) > 0.1
  _close(out, ref_out)
  _close(tan, ref_tan)
  _close(jax.jit(fused)(q, k, v), ref_out)


def test_mosaic_jvp_bfloat16_and_platform():
  """bf16 inputs (f32 accumulation) against the float32 reference at 3e-2, as the Triton
  kernels; off TPU without interpret mode it refuses with one line."""
  q, k, v, tq, tk, tv = _inputs((1, 40, 40, 2, 72, None), n=6, seed=6)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v, tq, tk, tv)]
  with jax.default_matmul_precision("default"):
    o, t = jax.jit(lambda p, t: jax.jvp(
        lambda q, k, v: attention(q, k, v, impl="mosaic_jvp", interpret=True), p, t))(
            tuple(bf[:3]), tuple(bf[3:]))
  assert o.dtype == t.dtype == jnp.bfloat16
  ref, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  _close(o, ref, rtol=3e-2, atol=3e-2)
  _close(t, ref_tan, rtol=3e-2, atol=3e-2)
  with pytest.raises(RuntimeError, match="'mosaic_jvp' needs a TPU backend.*'cpu'"):
    attention(q, k, v, impl="mosaic_jvp")


def _enable_x64():
  ctx = getattr(jax, "enable_x64", None)
  if ctx is None:
    from jax.experimental import enable_x64 as ctx  # pylint: disable=g-import-not-at-top
  return ctx(True)


def test_jvp_tangent_matches_float64_finite_difference():
  """The closed-form tangent (sCM App. F) equals a central difference of the reference."""
  shape = (1, 20, 20, 2, 72, SMALL)
  q, k, v, tq, tk, tv = _inputs(shape, n=6, seed=3)
  tan = jax.jvp(lambda q, k, v: attention(q, k, v, impl="pallas_jvp", block_sizes=SMALL),
                (q, k, v), (tq, tk, tv))[1]
  with _enable_x64():
    p64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v)]
    t64 = [jnp.asarray(np.asarray(x), jnp.float64) for x in (tq, tk, tv)]
    eps = 1e-6
    f = jax.jit(lambda s: attention(*[p + s * t for p, t in zip(p64, t64)]))
    fd = (np.asarray(f(eps)) - np.asarray(f(-eps))) / (2 * eps)
    tan64 = np.asarray(jax.jit(lambda p, t: jax.jvp(attention, p, t)[1])(tuple(p64), tuple(t64)))
    assert tan64.dtype == np.float64
  _close(tan64, fd, rtol=1e-7, atol=1e-7)
  _close(tan, fd)


def test_bfloat16_kernels_close_to_float32_reference():
  """bf16 forward, gradient (pallas) and tangent (pallas_jvp) vs the float32 reference.
  Measured max abs error <= 1.4e-2 (the bf16 `xla` path: <= 1.3e-2); bound 3e-2."""
  shape = (1, 20, 20, 2, 72, SMALL)
  q, k, v, tq, tk, tv = _inputs(shape, n=6, seed=4)
  w = jax.random.normal(jax.random.key(7), q.shape)
  bf = [x.astype(jnp.bfloat16) for x in (q, k, v, tq, tk, tv)]
  bf16 = dict(rtol=3e-2, atol=3e-2)

  def vag(impl):
    def f(q, k, v):
      out = attention(q, k, v, impl=impl, block_sizes=SMALL)
      return jnp.sum(w * out.astype(jnp.float32)), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, out), grads = vag("pallas")(*bf[:3])
  assert out.dtype == grads[0].dtype == jnp.bfloat16
  (_, ref), ref_grads = vag("xla")(q, k, v)
  _close(out, ref, **bf16)
  for g, r in zip(grads, ref_grads):
    _close(g, r, **bf16)
  o, t = jax.jit(lambda p, t: jax.jvp(
      lambda q, k, v: attention(q, k, v, impl="pallas_jvp", block_sizes=SMALL), p, t))(
          tuple(bf[:3]), tuple(bf[3:]))
  assert o.dtype == t.dtype == jnp.bfloat16
  ref, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  _close(o, ref, **bf16)
  _close(t, ref_tan, **bf16)


def test_scm_style_split_tangent_and_gradient_passes():
  """An sCM-shaped loss: tangent pass through pallas_jvp on stop-gradiented parameters, gradient
  pass through pallas, in one jitted grad; equals the all-xla loss and gradient."""
  b, l, h, d = 1, 20, 2, 16
  x = jax.random.normal(jax.random.key(0), (b, l, h * d))
  dx = jax.random.normal(jax.random.key(1), x.shape)
  params = jax.random.normal(jax.random.key(2), (3, h * d, h * d)) / np.sqrt(h * d)

  def net(impl, w, x):
    q, k, v = (jnp.einsum("blc,cd->bld", x, w[i]).reshape(b, l, h, d) for i in range(3))
    return attention(q, k, v, impl=impl, block_sizes=SMALL).reshape(b, l, h * d)

  def loss(grad_impl, tangent_impl, w):
    frozen = jax.lax.stop_gradient(w)
    _, tangent = jax.jvp(lambda x: net(tangent_impl, frozen, x), (x,), (dx,))
    return jnp.mean((net(grad_impl, w, x) - jax.lax.stop_gradient(tangent)) ** 2)

  val, grad = jax.jit(jax.value_and_grad(lambda w: loss("pallas", "pallas_jvp", w)))(params)
  ref_val, ref_grad = jax.jit(jax.value_and_grad(lambda w: loss("xla", "xla", w)))(params)
  _close(val, ref_val)
  _close(grad, ref_grad)


@pytest.mark.parametrize("pair", [("pallas", "pallas_jvp"), ("xla", "pallas_jvp"),
                                  ("pallas", "xla"), ("xla", "mosaic_jvp")])
def test_shared_primal_pair_matches_xla(pair):
  """A shared-primal pair: one jax.jvp inside the gradient, reverse mode through its primal, the
  tangent stop-gradient'd (sCM's shared pass). Output, tangent, loss and parameter gradient equal
  the all-xla pass, where plain jnp serves both modes itself."""
  b, l, h, d = 2, 20, 2, 16
  x = jax.random.normal(jax.random.key(0), (b, l, h * d))
  dx = jax.random.normal(jax.random.key(1), x.shape)
  c = jax.random.normal(jax.random.key(3), x.shape)
  params = jax.random.normal(jax.random.key(2), (3, h * d, h * d)) / np.sqrt(h * d)
  impl = attn.shared_primal_impl(*pair)
  assert impl == "+".join(pair)

  def net(impl, w, x):
    q, k, v = (jnp.einsum("blc,cd->bld", x, w[i]).reshape(b, l, h, d) for i in range(3))
    return attention(q, k, v, impl=impl, block_sizes=SMALL, interpret=True).reshape(
        b, l, h * d)

  def loss(impl, w):
    out, tangent = jax.jvp(lambda x: net(impl, w, x), (x,), (dx,))
    tangent = jax.lax.stop_gradient(tangent)
    return jnp.sum(c * out) + jnp.sum(jnp.tanh(out) * tangent), (out, tangent)

  (val, (out, tan)), grad = jax.jit(jax.value_and_grad(lambda w: loss(impl, w), has_aux=True))(
      params)
  (ref_val, (ref_out, ref_tan)), ref_grad = jax.jit(jax.value_and_grad(
      lambda w: loss("xla", w), has_aux=True))(params)
  assert float(jnp.max(jnp.abs(ref_tan))) > 0.1
  _close(out, ref_out)
  _close(tan, ref_tan)
  # Sums over 1280 products of O(1) values: rtol 1e-5 of the loss and gradient scale.
  _close(val, ref_val, rtol=1e-5, atol=1e-5 * float(jnp.sum(jnp.abs(c * ref_out))))
  _close(grad, ref_grad, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref_grad))))


def test_shared_primal_pair_keeps_the_bias_gradient_and_tangent():
  """A bias is an argument of the pair like q, k, v: its gradient (through the primal) and its
  tangent equal plain xla's (the pair `xla+xla` runs the pair's code with xla on both sides)."""
  q, k, v, t = _inputs((2, 10, 10, 2, 8, None), n=6)[:4]
  bias = jax.random.normal(jax.random.key(4), (1, 2, 10, 10))
  tbias = jax.random.normal(jax.random.key(5), bias.shape)

  def loss(impl, q, b):
    out, tan = jax.jvp(lambda q, b: attention(q, k, v, impl=impl, bias=b), (q, b), (t, tbias))
    return jnp.sum(out * jax.lax.stop_gradient(tan)), tan

  grads, tan = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)(
      "xla+xla", q, bias)
  ref_grads, ref_tan = jax.jit(jax.grad(loss, argnums=(1, 2), has_aux=True), static_argnums=0)(
      "xla", q, bias)
  assert float(jnp.max(jnp.abs(ref_grads[1]))) > 0.1
  _close(tan, ref_tan)
  for g, r in zip(grads, ref_grads):
    _close(g, r)


def test_shared_primal_pair_names():
  """(xla, xla) needs no pair; a pair is internal: a config naming one is refused, and a plain
  reverse pass through it (no jvp: the pair's rule would be differentiated) fails loudly. (A
  differentiated *tangent* of a pair is zero by contract: sCM stop-gradients it.)"""
  assert attn.shared_primal_impl("xla", "xla") == "xla"
  assert attn.shared_primal_impl("cudnn", "pallas_jvp") == "cudnn+pallas_jvp"
  with pytest.raises(ValueError, match="model.attention='cudnn\\+pallas_jvp'"):
    attn.check_impls("cudnn+pallas_jvp", "pallas_jvp")
  with pytest.raises(KeyError, match="unknown attention implementation 'flash'"):
    attention(*_inputs((1, 16, 16, 1, 16, None)), impl="pallas+flash")
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  with pytest.raises(NotImplementedError, match="stop_gradient"):
    jax.grad(lambda q: jnp.sum(attention(q, k, v, impl="pallas+xla")))(q)


def test_jvp_through_custom_vjp_impl_raises():
  """Why two entry points: `pallas` (custom_vjp) cannot be pushed through jax.jvp."""
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  f = lambda q: attention(q, k, v, impl="pallas")
  with pytest.raises(TypeError, match="pallas_jvp"):           # eager: our message
    jax.jvp(f, (q,), (q,))
  with pytest.raises(TypeError, match="forward-mode autodiff"):  # under jit: JAX's, at lowering
    jax.jit(lambda q, t: jax.jvp(f, (q,), (t,)))(q, q)


def test_grad_through_pallas_jvp_raises():
  """And `pallas_jvp` (custom_jvp around a kernel) cannot be transposed: no reverse mode."""
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  with pytest.raises(ValueError, match="Linearization failed"):
    jax.grad(lambda q: jnp.sum(attention(q, k, v, impl="pallas_jvp")))(q)


def test_kernels_reject_mask_and_bias():
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  for impl in ("pallas", "pallas_jvp", "splash"):
    with pytest.raises(NotImplementedError, match="neither mask nor bias"):
      attention(q, k, v, impl=impl, mask=jnp.ones((1, 1, 16, 16), bool), interpret=True)


def test_cudnn_and_splash_raise_on_cpu():
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  with pytest.raises(RuntimeError, match="'cudnn' needs a CUDA GPU backend.*'cpu'"):
    attention(q, k, v, impl="cudnn")
  with pytest.raises(RuntimeError, match="'splash' needs a TPU backend.*'cpu'"):
    attention(q, k, v, impl="splash")


def test_splash_interpret_matches_xla():
  """The splash wrapper (scale folding, padding L to 128 with masked keys, D 72 -> 128,
  (B, L, H, D) <-> per-example (H, L, D)) in TPU interpret mode: forward."""
  q, k, v = _inputs((2, 40, 40, 2, 72, None))
  _close(attention(q, k, v, impl="splash", interpret=True), _ref(q, k, v))


@pytest.mark.slow
def test_splash_interpret_gradient_matches_xla():
  q, k, v = _inputs((1, 40, 40, 2, 72, None))
  w = jax.random.normal(jax.random.key(7), q.shape)
  loss = lambda impl: lambda q, k, v: jnp.sum(w * attention(q, k, v, impl=impl, interpret=True))
  grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)):
    _close(g, r)


def test_sharded_attention_one_device_mesh():
  mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
  shape = (2, 20, 20, 2, 16, SMALL)
  q, k, v, tq, tk, tv = _inputs(shape, n=6)
  ref, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  _close(jax.jit(lambda q, k, v: sharded_attention(q, k, v, impl="xla", mesh=mesh))(q, k, v), ref)

  def loss(impl, shard):
    def f(q):
      out = (sharded_attention(q, k, v, impl=impl, mesh=mesh, block_sizes=SMALL) if shard
             else attention(q, k, v, impl=impl))
      return jnp.sum(out ** 2), out
    return jax.value_and_grad(f, has_aux=True)

  (_, out), g = jax.jit(loss("pallas", True))(q)
  _close(out, ref)
  _close(g, jax.jit(loss("xla", False))(q)[1])
  out, tan = jax.jit(lambda p, t: jax.jvp(lambda q, k, v: sharded_attention(
      q, k, v, impl="pallas_jvp", mesh=mesh, block_sizes=SMALL), p, t))((q, k, v), (tq, tk, tv))
  _close(out, ref)
  _close(tan, ref_tan)

  def shared(impl, shard):   # a shared-primal pass: gradient through the primal of a jvp
    def f(q):
      fn = lambda q: (sharded_attention(q, k, v, impl=impl, mesh=mesh, block_sizes=SMALL)
                      if shard else attention(q, k, v, impl=impl))
      out, tan = jax.jvp(fn, (q,), (tq,))
      return jnp.sum(out * jax.lax.stop_gradient(tan)), tan
    return jax.grad(f, has_aux=True)

  g, tan = jax.jit(shared("pallas+pallas_jvp", True))(q)
  g_ref, tan_ref = jax.jit(shared("xla", False))(q)
  _close(tan, tan_ref)
  _close(g, g_ref)


_MULTI_DEVICE = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from models.attention import BlockSizes, attention, sharded_attention
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 2), ("data", "fsdp", "tensor"))
    bs = BlockSizes(16, 16, 16, 16, 16, 16)
    q, k, v, tq, tk, tv = (jax.random.normal(jax.random.key(i), (2, 24, 2, 16)) for i in range(6))
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, sh) for x in (q, k, v))
    f = jax.jit(lambda q, k, v: sharded_attention(q, k, v, impl="pallas", mesh=mesh,
                                                  block_sizes=bs))
    out = f(q, k, v)
    assert out.sharding.is_equivalent_to(sh, 4), out.sharding
    assert out.addressable_shards[0].data.shape == (1, 24, 1, 16)
    np.testing.assert_allclose(out, attention(q, k, v), rtol=1e-5, atol=1e-5)
    hlo = f.lower(q, k, v).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo
    o, t = jax.jit(lambda p, t: jax.jvp(lambda q, k, v: sharded_attention(
        q, k, v, impl="pallas_jvp", mesh=mesh, block_sizes=bs), p, t))((q, k, v), (tq, tk, tv))
    ro, rt = jax.jvp(attention, (q, k, v), (tq, tk, tv))
    np.testing.assert_allclose(t, rt, rtol=1e-5, atol=1e-5)
    def shared(impl, shard):   # sCM's shared pass: gradient through the primal of a jvp
      def f(q):
        fn = lambda q: (sharded_attention(q, k, v, impl=impl, mesh=mesh, block_sizes=bs)
                        if shard else attention(q, k, v))
        o, t = jax.jvp(fn, (q,), (tq,))
        return jnp.sum(o * jax.lax.stop_gradient(t)), t
      return jax.jit(jax.grad(f, has_aux=True))
    (g, t), (rg, rt) = shared("pallas+pallas_jvp", True)(q), shared("xla", False)(q)
    np.testing.assert_allclose(t, rt, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, rg, rtol=1e-5, atol=1e-5)
    try:
      sharded_attention(q[:, :, :1], k[:, :, :1], v[:, :, :1], impl="pallas", mesh=mesh)
      raise SystemExit("expected a divisibility error")
    except ValueError as e:
      assert "heads 1 by 2" in str(e), e
    print("OK")
""")


@pytest.mark.slow
def test_sharded_attention_four_device_mesh_subprocess():
  """Batch over data, heads over tensor on 4 fake CPU devices: equal to unsharded, output
  really split, no collectives in the compiled step; jvp through shard_map + pallas_jvp, and the
  shared pass (grad through the primal of a jvp) through shard_map + the pallas+pallas_jvp pair."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  res = subprocess.run([sys.executable, "-c", _MULTI_DEVICE], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_kernels_lower_for_gpu(dtype):
  """Forward, both backward kernels and the fused JVP kernel lower to Triton (CUDA) from a CPU
  host: catches unsupported ops and non-power-of-two tiles without a GPU (the PTX compile and
  the numbers are checked on a GPU machine)."""
  q = jnp.ones((2, 80, 2, 72), dtype)
  kw = dict(interpret=False, platform="gpu")
  if dtype == jnp.float32:
    kw["precision"] = jax.lax.Precision.HIGHEST   # IEEE float32 Triton dots
  fwd = lambda q, k, v: attention(q, k, v, impl="pallas", **kw)
  fns = [fwd,
         jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)),
         lambda q, k, v: jax.jvp(lambda q, k, v: attention(q, k, v, impl="pallas_jvp", **kw),
                                 (q, k, v), (q, k, v))]
  for f, n_kernels in zip(fns, (1, 3, 1)):
    text = jax.jit(f).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == n_kernels


def test_splash_lowers_for_tpu():
  """Splash forward and gradient lower to Mosaic for TPU from a CPU host (AOT path)."""
  q = jnp.ones((2, 40, 2, 72), jnp.bfloat16)
  fwd = lambda q, k, v: attention(q, k, v, impl="splash", platform="tpu")
  grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  for f in (fwd, grad):
    text = jax.jit(f).trace(q, q, q).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_pallas_refuses_tpu():
  q, k, v = _inputs((1, 16, 16, 1, 16, None))
  for impl in ("pallas", "pallas_jvp"):
    with pytest.raises(RuntimeError, match="Pallas Triton kernel .* backend is 'tpu'"):
      attention(q, k, v, impl=impl, platform="tpu")


# ------------------------------------------------------------------------------------------------
# Device checks: skipped on CPU. On a GPU machine run
#   JAX_PLATFORMS=cuda python -m pytest tests/test_attention.py -k on_gpu -s
# (conftest defaults JAX_PLATFORMS to cpu); on TPU, JAX_PLATFORMS=tpu ... -k on_tpu -s.
# Reference on device: float32 `xla` at "highest" precision. Float32 kernels run their dots in
# IEEE float32 (precision=HIGHEST); the bound 2e-4 allows for the device's exp/log and
# summation order. bf16 kernels use the CPU bf16 bound (3e-2).

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
on_tpu = pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")

# (B, Lq, Lk, H, D): DiT-XL/2 at 256 px (L=256) and 512 px (L=1024), a toy DiT, odd lengths
# with cross-attention.
DEVICE_SHAPES = [(4, 256, 256, 16, 72), (2, 1024, 1024, 16, 72), (8, 16, 16, 4, 32),
                 (3, 80, 120, 6, 64)]


def _device_parity(impls, shape, dtype, tol, **kw):
  b, lq, lk, h, d = shape
  q, k, v, tq, tk, tv = _inputs((b, lq, lk, h, d, None), n=6)
  w = jax.random.normal(jax.random.key(7), q.shape)
  cast = lambda xs: tuple(x.astype(dtype) for x in xs)

  def vag(impl, **kw):
    def f(q, k, v):
      out = attention(q, k, v, impl=impl, **kw)
      return jnp.sum(w * out.astype(jnp.float32)), out
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

  (_, ref), ref_grads = vag("xla")(q, k, v)
  _, ref_tan = _ref_jvp((q, k, v), (tq, tk, tv))
  for impl in impls:
    if impl == "pallas_jvp":
      out, tan = jax.jit(lambda p, t: jax.jvp(
          lambda q, k, v: attention(q, k, v, impl=impl, **kw), p, t))(cast((q, k, v)),
                                                                      cast((tq, tk, tv)))
      _close(out, ref, **tol)
      _close(tan, ref_tan, **tol)
    else:
      (_, out), grads = vag(impl, **kw)(*cast((q, k, v)))
      _close(out, ref, **tol)
      for g, r in zip(grads, ref_grads):
        _close(g, r, **tol)


@on_gpu
@pytest.mark.parametrize("shape", DEVICE_SHAPES)
def test_on_gpu_pallas_float32_parity(shape):
  _device_parity(("pallas", "pallas_jvp"), shape, jnp.float32, dict(rtol=2e-4, atol=2e-4),
                 precision=jax.lax.Precision.HIGHEST)


@on_gpu
@pytest.mark.parametrize("shape", DEVICE_SHAPES)
def test_on_gpu_bfloat16_parity(shape):
  _device_parity(("pallas", "pallas_jvp", "cudnn"), shape, jnp.bfloat16,
                 dict(rtol=3e-2, atol=3e-2))


def _bench(fn, *args, reps=20):
  import time  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


@on_gpu
def test_on_gpu_timings():
  """Prints median ms (bf16, default matmul precision) of forward, forward+backward and
  primal+tangent per implementation at DiT-XL/2 shapes (not asserted: numbers for the report)."""
  import json  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision("default"):
    for b, l, h, d in [(64, 256, 16, 72), (16, 1024, 16, 72)]:
      q, k, v = (x.astype(jnp.bfloat16) for x in _inputs((b, l, l, h, d, None)))
      row = {"B": b, "L": l, "H": h, "D": d}
      for impl in ("xla", "cudnn", "pallas"):
        f = jax.jit(lambda q, k, v, impl=impl: attention(q, k, v, impl=impl))
        g = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
            attention(q, k, v, impl=impl).astype(jnp.float32)), argnums=(0, 1, 2)))
        row[f"{impl}_fwd_ms"] = _bench(f, q, k, v)
        row[f"{impl}_fwd_bwd_ms"] = _bench(g, q, k, v)
      for impl in ("xla", "pallas_jvp"):
        j = jax.jit(lambda q, k, v, impl=impl: jax.jvp(
            lambda q, k, v: attention(q, k, v, impl=impl), (q, k, v), (q, k, v)))
        row[f"{impl}_jvp_ms"] = _bench(j, q, k, v)
      print(json.dumps(row))


@on_tpu
@pytest.mark.parametrize("shape", DEVICE_SHAPES)
def test_on_tpu_splash_bfloat16_parity(shape):
  _device_parity(("splash",), shape, jnp.bfloat16, dict(rtol=3e-2, atol=3e-2))
