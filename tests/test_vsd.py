"""`vsd` (SwiftBrush with a LoRA fake teacher, SNOOPI random guidance): PyTorch parity of the
generator loss and of the LoRA teacher's loss (values and gradients w.r.t. the student and the
LoRA adapter), the LoRA teacher sharing the frozen teacher's weights, the VSD gradient on
Gaussian data against its closed form, a toy run and the sharded run (8 fake CPU devices).

Tolerances: float32 at the highest matmul precision on both sides: values to 1e-5 relative,
gradients to 1e-4 relative of the largest entry.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill.objectives import vsd
from tests import _matching_utils as mu
from tests.test_dmd2 import assert_close_tree, phase_kwargs

torch = pytest.importorskip("torch")

CONFIG = os.path.join(mu.ROOT, "configs", "toy", "vsd.py")
B = 16
RANK, ALPHA = 4, 6.0


@pytest.fixture(scope="module")
def setup():
  teacher = mu.make_teacher(num_classes=4, seed=11)
  engine, state, frozen = mu.make_engine(
      "vsd", teacher, batch=B, null_label_prob=0.3, random_guidance=True, guidance_min=1.0,
      guidance_max=4.0,
      lora_pattern=r"block_\d+/(fc1|fc2)", lora_rank=RANK, lora_alpha=ALPHA,
      fake_label_dropout=0.3, t_min_frac=0.05, t_max_frac=0.95)
  params = dict(state.params)
  params["student"] = mu.perturb(params["student"], 12)
  params["fake_score"] = mu.perturb(params["fake_score"], 13, scale=0.1)  # B != 0
  state = state.replace(params=params)
  batch = jax.device_get(engine.global_batch(0))
  return teacher, engine, state, frozen, batch


def test_lora_teacher_shares_the_frozen_teacher(setup):
  _, engine, state, frozen, _ = setup
  assert engine.plans["fake_score"].info.base == "teacher"
  paths = sorted(mu.flat_params(state.params["fake_score"]))
  assert paths == sorted(f"block_{i}/{l}/kernel/lora_{ab}" for i in range(2)
                         for l in ("fc1", "fc2") for ab in "AB")
  assert "teacher" in frozen and "teacher" not in state.params


def _torch_x0(net, p, x_t, t, labels):
  return mu.rf_x0(net(p, x_t, 1000.0 * t, labels), x_t, t)


def _torch_cfg_eps(net, p, x_t, t, labels, scale):
  null = torch.full_like(labels, 4)
  c = mu.rf_eps(net(p, x_t, 1000.0 * t, labels), x_t, t)
  u = mu.rf_eps(net(p, x_t, 1000.0 * t, null), x_t, t)
  return u + scale[:, None] * (c - u)


def test_generator_loss_matches_torch(setup):
  """g = sigma^2 (CFG_k eps_T - CFG_k eps_L), k ~ U[1, 4] per sample, shared by both."""
  teacher, engine, state, frozen, batch = setup
  draw, kw = phase_kwargs(engine, "generator")
  trainable, ctx = mu.phase_context(engine, state, frozen, ("student",))
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(14), batch["x"].shape)
  k = np.asarray(draws["guidance"])
  assert k.shape == (B,) and k.min() >= 1.0 and k.max() <= 4.0 and k.std() > 0.3
  fn = lambda tr: vsd.generator_loss_given(tr, ctx, batch, draws, **kw)
  (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"], requires_grad=True)
  p_t = mu.torch_params(frozen["teacher"])
  p_l = mu.torch_lora_merge(p_t, mu.torch_params(state.params["fake_score"]), ALPHA / RANK)
  labels = mu.step_labels(batch, draws["gen"])
  assert 0 < int(np.sum(draws["gen"]["null"])) < B  # some labels are null
  z = mu.n2t(draws["gen"]["z"])
  one = torch.ones(B)
  x = _torch_x0(net, p_s, z, one, labels)
  t, eps, scale = mu.n2t(draws["t"]), mu.n2t(draws["eps"]), mu.n2t(k)
  with torch.no_grad():
    x_t = (1 - t)[:, None] * x + t[:, None] * eps
    g = t[:, None] ** 2 * (_torch_cfg_eps(net, p_t, x_t, t, labels, scale)
                           - _torch_cfg_eps(net, p_l, x_t, t, labels, scale))
  ref = 0.5 * torch.mean((x - (x - g).detach()) ** 2)
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["student"]), {k_: mu.t2n(v.grad) for k_, v in
                                                       p_s.items()}, what="d/dstudent")


def test_lora_teacher_loss_matches_torch(setup):
  """The LoRA teacher's denoising loss (labels dropped w.p. 0.3): gradients w.r.t. A and B."""
  teacher, engine, state, frozen, batch = setup
  draw, kw = phase_kwargs(engine, "critic")
  trainable, ctx = mu.phase_context(engine, state, frozen, ("fake_score",))
  draws = draw(engine.nets["student"].process, jax.random.PRNGKey(15), batch["x"].shape)
  fn = lambda tr: vsd.critic_loss_given(tr, ctx, batch, draws, **kw)
  (loss, _), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(trainable)

  net = mu.torch_mlp(teacher)
  p_s = mu.torch_params(state.params["student"])
  p_t = mu.torch_params(frozen["teacher"])
  lora = mu.torch_params(state.params["fake_score"], requires_grad=True)
  p_l = mu.torch_lora_merge(p_t, lora, ALPHA / RANK)
  labels = mu.step_labels(batch, draws["gen"])
  with torch.no_grad():
    x = _torch_x0(net, p_s, mu.n2t(draws["gen"]["z"]), torch.ones(B), labels)
  f = draws["fake"]
  t, eps = mu.n2t(f["t"]), mu.n2t(f["eps"])
  lab = torch.where(mu.n2t(f["drop"]).bool(), torch.full_like(labels, 4), labels)
  x_t = (1 - t)[:, None] * x + t[:, None] * eps
  ref = torch.mean(torch.mean((net(p_l, x_t, 1000.0 * t, lab) - (eps - x)) ** 2, dim=1))
  ref.backward()
  np.testing.assert_allclose(float(loss), float(ref.detach()), rtol=1e-5)
  assert_close_tree(mu.flat_params(grads["fake_score"]),
                    {k: mu.t2n(v.grad) for k, v in lora.items()}, what="d/dlora")


@pytest.mark.parametrize("t_value,delta,v", [(0.3, 0.4, 1.5), (0.6, -0.3, 0.6)])
def test_vsd_gradient_gaussian_closed_form(t_value, delta, v):
  """The VSD gradient for Gaussian data, exact teacher and fake (LoRA teacher) scores.

  Data N(mu, s^2 I_D), generator x = m + v z, fake exact for N(m, v^2), rectified flow at t
  (a = 1 - t, sig = t). eps = (x_t - a x0) / sig, so sig^2 (e_T - e_L) = a sig (y_f - y_r) with
  y = (1 - a k) mean + k x_t, k_r = a s^2 / (a^2 s^2 + sig^2), k_f = a v^2 / (a^2 v^2 + sig^2):

    E[g] = a sig (1 - a k_r)(m - mu),   E[g z] = a sig (k_f - k_r) a v.

  L = 1/2 mean (x - sg(x - g))^2 over N = B D entries has dL/dx = g / N, hence (no normaliser:
  exact in expectation)

    dL/dm_d   -> a sig (1 - a k_r) delta / D       (descent moves m towards mu)
    dL/dlog v -> a^2 sig (k_f - k_r) v^2            (> 0 iff v > s)
  """
  dim, b, s = 1024, 128, 1.0
  mu_vec = np.linspace(-1, 1, dim).astype(np.float32)
  nets, params = mu.gaussian_context(mu_vec, s, dim=dim, fake=(mu_vec + delta, v))
  ctx = ctx_lib.Context(params=params, ema={}, model_state={}, nets=nets)
  trainable = {"student": {"m": jnp.asarray(mu_vec + delta), "log_v": jnp.log(jnp.float32(v))}}
  k1, k2 = jax.random.split(jax.random.PRNGKey(2))
  draws = {"gen": {"z": jax.random.normal(k1, (b, dim))}, "t": jnp.full((b,), t_value),
           "eps": jax.random.normal(k2, (b, dim))}
  fn = lambda tr: vsd.generator_loss_given(tr, ctx, {"x": jnp.zeros((b, dim))}, draws,
                                           num_steps=1, guidance=1.0, weighting="sigma2")[0]
  g = jax.jit(jax.grad(fn))(trainable)["student"]
  a, sig = 1 - t_value, t_value
  k_r = a * s * s / (a * a * s * s + sig * sig)
  k_f = a * v * v / (a * a * v * v + sig * sig)
  gm = np.asarray(g["m"])
  assert np.mean(np.sign(gm) == np.sign(delta)) > 0.9  # per coordinate: B Monte-Carlo draws
  np.testing.assert_allclose(gm.mean(), a * sig * (1 - a * k_r) * delta / dim, rtol=0.03)
  assert np.sign(float(g["log_v"])) == np.sign(v - s)
  np.testing.assert_allclose(float(g["log_v"]), a * a * sig * (k_f - k_r) * v * v, rtol=0.08)


# --------------------------------------------------------------------------------------------
# Subprocess runs (slow)
# --------------------------------------------------------------------------------------------

SMALL = ["--config.train.batch_size=64", "--config.eval.num_samples=256",
         "--config.eval.teacher_steps=8", "--config.sample.num=64",
         "--config.checkpoint.async_save=false"]


def losses(rows):
  return [{k: v for k, v in r.items() if k == "step" or k.endswith(("/loss", "/vsd", "/fake"))}
          for r in rows]


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
  teacher = mu.shared_tiny_teacher("gmm", 20)
  args = [*SMALL, f"--config.teacher.checkpoint={teacher}", "--config.train.steps=10",
          "--config.train.log_every=5", "--config.checkpoint.every_steps=0",
          "--config.eval.at_end=false", "--config.objective.random_guidance=true",
          "--config.objective.guidance_min=1.0", "--config.objective.guidance_max=3.0"]
  mu.check_sharded_losses(CONFIG, tmp_path, args, losses, ("generator/vsd",))


@pytest.mark.slow
def test_toy_run_closes_the_one_step_gap(tmp_path):
  """A small spiral teacher, then 600 VSD steps: >= 50% of the 1-step gap closed; the student's
  weights moved away from the teacher's."""
  mu.check_toy_run(CONFIG, tmp_path, 600, min_fraction=0.5)
