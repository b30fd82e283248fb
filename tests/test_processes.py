"""Processes: closed forms, conversions, weightings, proposals, grids and the ODE velocity.

Reference values come from formulas written here independently (float64 numpy) or from diffusers
(alphas_cumprod); tolerances are stated next to each check.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import processes as procs
from tests._solver_utils import gaussian_denoiser, marginal_std

NAMES = ["vp_discrete", "vp_cosine", "edm", "rectified_flow", "trigflow"]
KINDS = ["x0", "eps", "v", "flow"]


def _np(a):
  return np.asarray(a, np.float64)


def _interior_t(proc, n, seed):
  """n times spread over the process's interval with |logSNR| <= 8 (conversions that divide by
  alpha or sigma stay well conditioned)."""
  t = np.linspace(proc.t_min, proc.t_max, 4001)
  keep = np.abs(_np(proc.logsnr(t))) <= 8.0
  return np.random.RandomState(seed).choice(t[keep], n).astype(np.float32)


def _build(kind, x0, eps, a, s):
  """Prediction targets from their definitions."""
  return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "flow": eps - x0}[kind]


# --------------------------------------------------------------------------------------------
# Registry, closed forms, boundaries
# --------------------------------------------------------------------------------------------


def test_registry_and_static_hashable():
  assert sorted(procs.PROCESSES) == sorted(NAMES)
  for name in NAMES:
    p = procs.make_process(name)
    assert p == procs.make_process(name=name) and hash(p) == hash(procs.make_process(name))
    f = jax.jit(lambda t, proc: proc.alpha_sigma(t)[1], static_argnums=1)
    np.testing.assert_allclose(f(jnp.float32(p.t_max) * 0.5, p),
                               p.alpha_sigma(p.t_max * 0.5)[1], rtol=1e-6)
  with pytest.raises(KeyError, match="unknown process"):
    procs.make_process("ve")
  with pytest.raises(dataclasses_error()):
    procs.make_process("edm").sigma_max = 1.0


def dataclasses_error():
  import dataclasses
  return dataclasses.FrozenInstanceError


@pytest.mark.torch
@pytest.mark.parametrize("schedule,start,end", [("scaled_linear", 0.00085, 0.012),
                                                ("linear", 1e-4, 0.02)])
def test_vp_discrete_matches_diffusers_alphas_cumprod(schedule, start, end):
  """alpha^2 = alphas_cumprod[t] at integer t (rtol 2e-6: diffusers' float32 cumprod vs our
  float64 one; sigma^2 vs diffusers' float32 1 - abar, atol 5e-7: cancellation there costs
  ~1e-7 per unit); index -1 is clean; the default beta endpoints are the schedule's own."""
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDPMScheduler(beta_schedule=schedule, beta_start=start,
                                beta_end=end).alphas_cumprod.numpy()
  proc = procs.make_process("vp_discrete", beta_schedule=schedule)
  a, s = proc.alpha_sigma(jnp.arange(1000.0))
  np.testing.assert_allclose(_np(a) ** 2, ref, rtol=2e-6)
  np.testing.assert_allclose(_np(s) ** 2, 1 - ref, rtol=0, atol=5e-7)
  a, s = proc.alpha_sigma(-1.0)
  assert float(a) == 1.0 and float(s) == 0.0
  assert (proc.t_min, proc.t_max, proc.t_end) == (0.0, 999.0, -1.0)


def test_vp_discrete_interpolates_ve_sigma_linearly():
  """Between indices sigma / alpha is linear in t (diffusers' fractional-timestep rule)."""
  proc = procs.make_process("vp_discrete")
  ve = lambda t: _np(proc.alpha_sigma(t)[1]) / _np(proc.alpha_sigma(t)[0])
  np.testing.assert_allclose(ve(10.25), 0.75 * ve(10.0) + 0.25 * ve(11.0), rtol=1e-6)


def test_vp_cosine_closed_form():
  """logsnr(t) = -2 log tan(a t + b) with logsnr(0) = 20, logsnr(1) = -20 (float64 reference;
  atol 2e-3 in logsnr: tan near pi/2 in float32 loses ~3 digits at t = 1)."""
  proc = procs.make_process("vp_cosine")
  b = np.arctan(np.exp(-10.0))
  a = np.arctan(np.exp(10.0)) - b
  t = np.linspace(0, 1, 101)
  ref = -2 * np.log(np.tan(a * t + b))
  assert abs(ref[0] - 20) < 1e-9 and abs(ref[-1] + 20) < 1e-6
  np.testing.assert_allclose(_np(proc.logsnr(t)), ref, atol=2e-3)
  al, si = proc.alpha_sigma(t)
  np.testing.assert_allclose(_np(al) ** 2, 1 / (1 + np.exp(-ref)), atol=1e-6)
  np.testing.assert_allclose(_np(al) ** 2 + _np(si) ** 2, 1.0, atol=1e-6)


@pytest.mark.parametrize("name,formula,ends", [
    ("edm", lambda t: (np.ones_like(t), t), ((0.002, 1.0, 0.002), (80.0, 1.0, 80.0))),
    ("rectified_flow", lambda t: (1 - t, t), ((0.0, 1.0, 0.0), (1.0, 0.0, 1.0))),
    ("trigflow", lambda t: (np.cos(t), 0.5 * np.sin(t)), ((0.0, 1.0, 0.0),
                                                          (np.pi / 2, 0.0, 0.5))),
])
def test_continuous_closed_forms_and_boundaries(name, formula, ends):
  """alpha_sigma equals its formula on a grid and at both ends of [t_min, t_max] (atol 1e-6)."""
  proc = procs.make_process(name)
  t = np.linspace(proc.t_min, proc.t_max, 33)
  a, s = proc.alpha_sigma(t)
  ra, rs = formula(t)
  np.testing.assert_allclose(_np(a), ra, atol=1e-6)
  np.testing.assert_allclose(_np(s), rs, atol=2e-6 * max(1.0, proc.t_max))
  for t_ref, a_ref, s_ref in ends:
    a, s = proc.alpha_sigma(t_ref)
    assert abs(float(a) - a_ref) < 1e-6 and abs(float(s) - s_ref) < 1e-5
  assert proc.t_min == pytest.approx(ends[0][0]) and proc.t_max == pytest.approx(ends[1][0])
  a, s = proc.alpha_sigma(proc.t_end)
  assert float(s) == 0.0 and float(a) == 1.0


def test_trigflow_time_inputs():
  """c_noise "flow" maps t to the rectified-flow time of the same SNR (for sigma_d = 1)."""
  tf = procs.make_process("trigflow", sigma_data=1.0, c_noise="flow")
  rf = procs.make_process("rectified_flow")
  t = jnp.linspace(0.1, 1.4, 9)
  np.testing.assert_allclose(rf.snr(tf.timestep(t)), tf.snr(t), rtol=1e-4)
  np.testing.assert_allclose(procs.make_process("trigflow").timestep(t), t, rtol=0)
  edm_t = procs.make_process("trigflow", c_noise="edm").timestep(t)
  np.testing.assert_allclose(edm_t, 0.25 * np.log(0.5 * np.tan(_np(t))), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Conversions and weightings
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_every_pair(name):
  """For x_t = alpha x0 + sigma eps at random t (alpha, sigma from the process): convert(target_src,
  src -> dst) equals target_dst (built from the definitions) and src -> dst -> src is the identity.
  Run in float64 (jax.enable_x64) so the check is on the algebra: rtol 1e-9 of the output scale
  (|logSNR| <= 8 keeps the 2x2 solves well conditioned)."""
  proc = procs.make_process(name)
  t = _interior_t(proc, 16, 0)
  rs = np.random.RandomState(1)
  x0, eps = rs.randn(16, 5), rs.randn(16, 5)
  a, s = (_np(u)[:, None] for u in proc.alpha_sigma(t))
  x_t = a * x0 + s * eps
  with jax.enable_x64(True):
    for src, dst in itertools.product(KINDS, KINDS):
      pred = _build(src, x0, eps, a, s)
      ref = _build(dst, x0, eps, a, s)
      out = procs.convert(pred, src, dst, x_t, a, s)
      assert out.dtype == jnp.float64
      scale = 1e-9 * (1 + np.abs(ref).max() + np.abs(pred).max())
      np.testing.assert_allclose(out, ref, rtol=0, atol=scale, err_msg=f"{src}->{dst}")
      back = procs.convert(out, dst, src, x_t, a, s)
      np.testing.assert_allclose(back, pred, rtol=0, atol=scale, err_msg=f"{src}->{dst}->{src}")
  with pytest.raises(KeyError, match="prediction kind"):
    procs.convert(jnp.asarray(x0), "score", "x0", x_t, a, s)


@pytest.mark.parametrize("name", ["vp_discrete", "vp_cosine"])
def test_v_loss_is_snr_plus_one_x0_loss(name):
  """||v - v_hat||^2 = (1 + SNR) ||x0 - x0_hat||^2 at fixed x_t for VP processes, v_hat from
  convert(x0_hat). float64 (rtol 1e-9) except alpha, sigma, SNR (float32 from the process; the
  identity holds for them up to alpha^2 + sigma^2 = 1 in float32, hence rtol 1e-6)."""
  proc = procs.make_process(name)
  t = _interior_t(proc, 8, 2)
  rs = np.random.RandomState(3)
  x0, eps, x0_hat = rs.randn(8, 6), rs.randn(8, 6), rs.randn(8, 6)
  a, s = (_np(u)[:, None] for u in proc.alpha_sigma(t))
  x_t = a * x0 + s * eps
  with jax.enable_x64(True):
    v_hat = np.asarray(procs.convert(x0_hat, "x0", "v", x_t, a, s))
  lhs = np.sum((_build("v", x0, eps, a, s) - v_hat) ** 2, axis=1)
  rhs = (1 + _np(proc.snr(t))) * np.sum((x0 - x0_hat) ** 2, axis=1)
  np.testing.assert_allclose(lhs, rhs, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_loss_factor_translates_x0_error(name):
  """||pred - pred_hat||^2 = loss_factor(kind) ||x0 - x0_hat||^2 for every kind, with both
  predictions from convert at the same x_t (float64, rtol 1e-9)."""
  proc = procs.make_process(name)
  t = _interior_t(proc, 8, 4)
  rs = np.random.RandomState(5)
  x0, eps, x0_hat = rs.randn(8, 6), rs.randn(8, 6), rs.randn(8, 6)
  a, s = (_np(u)[:, None] for u in proc.alpha_sigma(t))
  x_t = a * x0 + s * eps
  err_x0 = np.sum((x0 - x0_hat) ** 2, axis=1)
  with jax.enable_x64(True):
    for kind in KINDS:
      true = procs.convert(x0, "x0", kind, x_t, a, s)
      hat = procs.convert(x0_hat, "x0", kind, x_t, a, s)
      factor = np.asarray(procs.loss_factor(kind, a[:, 0], s[:, 0]))
      np.testing.assert_allclose(np.sum(np.asarray(true - hat) ** 2, axis=1), factor * err_x0,
                                 rtol=1e-9, err_msg=kind)


def test_weightings():
  """Each weighting against its formula in alpha, sigma (float64; rtol 1e-5)."""
  edm = procs.make_process("edm")
  vp = procs.make_process("vp_discrete")
  for proc in (edm, vp):
    t = _interior_t(proc, 32, 6)
    a, s = (_np(u) for u in proc.alpha_sigma(t))
    snr = a ** 2 / s ** 2
    expect = {"uniform": np.ones_like(snr), "snr": snr, "snr_plus_one": snr + 1,
              "min_snr": np.minimum(snr, 5.0), "truncated_snr": np.maximum(snr, 1.0),
              "max_snr_one": np.maximum(snr, 1.0), "edm": snr + 4.0}
    for name, ref in expect.items():
      np.testing.assert_allclose(_np(procs.WEIGHTINGS.get(name)(proc, t)), ref, rtol=1e-5,
                                 err_msg=name)
    w = procs.get_weighting("min_snr", gamma=2.0)(proc, t)
    np.testing.assert_allclose(_np(w), np.minimum(snr, 2.0), rtol=1e-5)
  sigma = np.array([0.01, 0.5, 3.0, 40.0], np.float32)
  np.testing.assert_allclose(_np(procs.WEIGHTINGS.get("edm")(edm, sigma)),
                             (_np(sigma) ** 2 + 0.25) / (_np(sigma) * 0.5) ** 2, rtol=1e-5)


def test_edm_and_consistency_scalings():
  """c_skip is the Gaussian posterior factor, c_out^2 the posterior variance, c_in normalises;
  the consistency scalings are exact at sigma_min and the LCM ones at timestep 0 (rtol 1e-6)."""
  sigma = np.array([0.002, 0.1, 0.5, 2.0, 80.0])
  sd = 0.5
  c_skip, c_out, c_in, c_noise = (_np(u) for u in procs.edm_scalings(sigma, sd))
  np.testing.assert_allclose(c_skip, sd ** 2 / (sd ** 2 + sigma ** 2), rtol=1e-6)
  np.testing.assert_allclose(c_out ** 2, sd ** 2 * sigma ** 2 / (sd ** 2 + sigma ** 2), rtol=1e-5)
  np.testing.assert_allclose(c_in * np.sqrt(sigma ** 2 + sd ** 2), 1.0, rtol=1e-6)
  np.testing.assert_allclose(c_noise, 0.25 * np.log(sigma), rtol=1e-6)
  np.testing.assert_allclose(procs.make_process("edm").timestep(sigma), c_noise, rtol=1e-6)
  c_skip, c_out, _ = procs.consistency_scalings(np.float32(0.002), sd, 0.002)
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  c_skip, c_out, _ = (_np(u) for u in procs.make_process("edm").consistency_scalings(sigma))
  np.testing.assert_allclose(c_skip, sd ** 2 / ((sigma - 0.002) ** 2 + sd ** 2), rtol=1e-5)
  np.testing.assert_allclose(c_out, (sigma - 0.002) * sd / np.sqrt(sigma ** 2 + sd ** 2),
                             rtol=1e-5, atol=1e-9)
  c_skip, c_out = procs.lcm_boundary_scalings(np.float32(0.0))
  assert float(c_skip) == 1.0 and float(c_out) == 0.0
  c_skip, c_out = (_np(u) for u in procs.lcm_boundary_scalings(np.float32(999.0)))
  assert c_skip == pytest.approx(0.25 / (9990.0 ** 2 + 0.25)) and c_out == pytest.approx(1, 1e-6)


def test_trigflow_denoise_and_target():
  """x_t = cos t x0 + sin t z: trigflow_denoise with F = v_t / sigma_d recovers x0, and the
  target v_t is the ODE velocity of the true path (atol 2e-6)."""
  proc = procs.make_process("trigflow", sigma_data=0.5)
  rs = np.random.RandomState(7)
  x0 = rs.randn(6, 4).astype(np.float32)
  z = 0.5 * rs.randn(6, 4).astype(np.float32)
  t = rs.uniform(0.05, 1.5, 6).astype(np.float32)
  x_t = np.cos(t)[:, None] * x0 + np.sin(t)[:, None] * z
  v = procs.trigflow_target(x0, z, t)
  np.testing.assert_allclose(procs.trigflow_denoise(x_t, t, v / 0.5, 0.5), x0, atol=2e-6)
  np.testing.assert_allclose(procs.ode_velocity(proc, x_t, x0, t), v, atol=2e-6)


# --------------------------------------------------------------------------------------------
# ODE velocity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_ode_velocity_matches_finite_difference(name):
  """(1) One data point: the exact denoiser is x0 itself and the PF-ODE path is
  alpha(t) x0 + sigma(t) eps with fixed eps; ode_velocity must equal its central difference.
  (2) Gaussian data: with the exact denoiser the velocity is x_t d log std(t) / dt.
  Central differences of float32 alpha_sigma with step h: rtol 2e-3 (truncation O(h^2) plus
  float32 rounding / h). vp_discrete: t = k + 1/2, h = 1/4 (one linear segment)."""
  proc = procs.make_process(name)
  if name == "vp_discrete":
    t = np.array([3.5, 120.5, 500.5, 900.5], np.float32)
    h = 0.25
  else:
    lo, hi = proc.t_min, proc.t_max
    t = np.array([0.1, 0.3, 0.6, 0.9], np.float32) * (hi - lo) + lo
    h = 1e-3 * (hi - lo)
    if name == "edm":
      t, h = np.array([0.05, 0.5, 3.0, 20.0], np.float32), None
  rs = np.random.RandomState(8)
  x0 = rs.randn(4, 3).astype(np.float32)
  eps = rs.randn(4, 3).astype(np.float32)
  hh = (1e-3 * t if h is None else np.full_like(t, h))

  def path(tt):
    a, s = proc.alpha_sigma(tt)
    return _np(a)[:, None] * x0 + _np(s)[:, None] * eps
  fd = (path(t + hh) - path(t - hh)) / (2 * hh[:, None])
  x_t = path(t).astype(np.float32)
  vel = _np(procs.ode_velocity(proc, jnp.asarray(x_t), jnp.asarray(x0), t))
  np.testing.assert_allclose(vel, fd, rtol=2e-3, atol=2e-3 * np.abs(fd).max())

  den = gaussian_denoiser(proc, 0.7)
  vel = _np(procs.ode_velocity(proc, jnp.asarray(x_t), den(jnp.asarray(x_t), t), t))
  dlog = (np.log(marginal_std(proc, t + hh, 0.7)) - np.log(marginal_std(proc, t - hh, 0.7)))
  np.testing.assert_allclose(vel, x_t * (dlog / (2 * hh))[:, None], rtol=2e-3,
                             atol=2e-3 * np.abs(vel).max())


# --------------------------------------------------------------------------------------------
# Proposals, priors and grids
# --------------------------------------------------------------------------------------------


def _stats(proc, n=20000, seed=0):
  return _np(proc.sample_t(jax.random.PRNGKey(seed), (n,)))


def test_training_proposals():
  """Moments of 20000 draws; tolerances ~5 standard errors."""
  t = _stats(procs.make_process("vp_discrete"))
  assert np.all(t == np.round(t)) and t.min() == 0 and t.max() == 999
  assert abs(t.mean() - 499.5) < 12
  ls = np.log(_stats(procs.make_process("edm")))
  assert abs(ls.mean() + 1.2) < 0.05 and abs(ls.std() - 1.2) < 0.04
  tf = _stats(procs.make_process("trigflow"))
  assert tf.min() > 0 and tf.max() < np.pi / 2
  ls = np.log(0.5 * np.tan(tf))
  assert abs(ls.mean() + 1.0) < 0.05 and abs(ls.std() - 1.4) < 0.05
  u = _stats(procs.make_process("rectified_flow", proposal="logit_normal"))
  lg = np.log(u / (1 - u))
  assert abs(lg.mean()) < 0.04 and abs(lg.std() - 1.0) < 0.03
  u = _stats(procs.make_process("rectified_flow", shift=3.0))
  assert abs(np.median(u) - 0.75) < 0.01  # shift(1/2) = 3/4
  u = _stats(procs.make_process("vp_cosine"))
  assert u.min() >= 0 and u.max() <= 1 and abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize("name", NAMES)
def test_prior_and_grid(name):
  """prior std = prior_std (20000 draws, 3%); timesteps(n): n + 1 strictly descending times
  from t_max to t_end."""
  proc = procs.make_process(name)
  x = _np(proc.prior(jax.random.PRNGKey(1), (20000,)))
  assert abs(x.std() / proc.prior_std - 1) < 0.03
  for n in (1, 4, 7):
    g = proc.timesteps(n)
    assert g.shape == (n + 1,) and g.dtype == np.float32
    assert g[0] == pytest.approx(proc.t_max) and g[-1] == proc.t_end
    assert np.all(np.diff(g) < 0)


def test_grid_formulas():
  """Karras rho = 7 grid (EDM eq. 5), shifted rectified-flow grid and TrigFlow linspace."""
  g = _np(procs.make_process("edm").timesteps(5))
  i = np.arange(5) / 4
  ref = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  np.testing.assert_allclose(g[:-1], ref, rtol=1e-6)
  g = _np(procs.make_process("rectified_flow", shift=3.0).timesteps(4))
  u = np.array([1, 0.75, 0.5, 0.25, 0])
  np.testing.assert_allclose(g, 3 * u / (1 + 2 * u), rtol=1e-6)
  g = _np(procs.make_process("trigflow").timesteps(3))
  np.testing.assert_allclose(g, [np.pi / 2, np.pi / 3, np.pi / 6, 0], rtol=1e-6)
