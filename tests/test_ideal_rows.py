"""The evaluation's "ideal" rows and the refinement grid of consistency samplers.

An ideal row samples the student's process with the student's sampler but denoises every step
by the teacher's own ODE (`evaluation.ode_denoiser`): the score an exact consistency student
would get. Checked here on Gaussian data, where the ODE map is known in closed form; the rows
in a real run (ideal 1 step = the teacher's reference row; the cache write-back) are checked by
tests/test_demo.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import evaluation
from distill import processes as procs
from distill import solvers
from tests._solver_utils import exact_ode_map, gaussian_denoiser

S_DATA = 0.6
PROCESSES = ["rectified_flow", "trigflow", "vp_discrete", "vp_cosine", "edm"]


def _ratio(process, t):
  alpha, sigma = process.alpha_sigma(t)
  return np.asarray(sigma / (alpha + sigma))


@pytest.mark.parametrize("name", PROCESSES)
def test_matching_time_inverts_the_noise_ratio(name):
  """sigma / (alpha + sigma) at the returned time equals the asked ratio (to 2e-5: float32
  bisection), from nearly clean to nearly pure noise; a ratio beyond the process's noisiest
  time (SD's discrete schedule ends at 0.936) gives t_max; on rectified flow the time is the
  ratio."""
  process = procs.make_process(name)
  want = np.array([1e-3, 0.05, 0.3, 0.5, 0.8, 0.9, 0.97, 0.999], np.float32)
  t = np.asarray(evaluation.matching_time(process, jnp.asarray(want)))
  top = float(_ratio(process, process.t_max))
  inside = want < top
  assert inside[:6].all()
  np.testing.assert_allclose(_ratio(process, t[inside]), want[inside], atol=2e-5)
  np.testing.assert_allclose(t[~inside], process.t_max, rtol=1e-6)
  if name == "rectified_flow":
    np.testing.assert_allclose(t, want, atol=1e-6)


@pytest.mark.parametrize("teacher_name,student_name", [("rectified_flow", "trigflow"),
                                                       ("vp_cosine", "edm"),
                                                       ("edm", "rectified_flow")])
def test_ode_denoiser_is_the_exact_ode_map_of_gaussian_data(teacher_name, student_name):
  """With the exact denoiser of N(0, s^2) data as the teacher, the ODE denoiser maps a state of
  the *student's* process at time t to x * s / std(t), the exact PF-ODE end point (the ODE of
  Gaussian data is linear), up to the teacher solver's error, which is first order: at 256
  steps below 1% and half that at 128 (a wrong time or input scale leaves an error that does
  not shrink with steps)."""
  teacher = procs.make_process(teacher_name)
  student = procs.make_process(student_name)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (64, 3)))
  for frac in (0.2, 0.6, 0.95):
    t = student.t_end + frac * (student.t_max - student.t_end)
    std_t = float(np.sqrt(np.sum(np.square(np.asarray(student.alpha_sigma(t)) *
                                           np.array([S_DATA, 1.0])))))
    x_t = x * std_t
    exact = exact_ode_map(student, x_t, t, student.t_end, S_DATA)
    errs = []
    for steps in (128, 256):
      den = evaluation.ode_denoiser(gaussian_denoiser(teacher, S_DATA), teacher, student, steps)
      out = jax.jit(den)(jnp.asarray(x_t), jnp.full((64,), t, jnp.float32))
      errs.append(np.abs(np.asarray(out) - exact).max() / np.abs(exact).max())
    assert errs[1] < 1e-2, (t, errs)
    assert 1.5 < errs[0] / errs[1] < 2.5 or errs[0] < 1e-4, (t, errs)


@pytest.mark.parametrize("solver,kwargs", [("consistency", {}), ("tcd", {"gamma": 1.0})])
def test_ideal_chain_keeps_gaussian_data(solver, kwargs):
  """With fresh noise in every re-noising, an exact consistency function keeps the data
  distribution through any number of denoise / re-noise rounds: the ideal 4-step chain
  (teacher on rectified flow solved in 256 Euler steps, sampler on TrigFlow) gives std s within
  3% (8192 samples: the std's standard error is 0.8%), and it really re-noised (differs from the
  1-step sample).
  (TCD with gamma < 1 re-noises with the noise the state implies, which is tied to x0, so
  even an exact consistency function drifts there: that is what an ideal row measures.)"""
  teacher = procs.make_process("rectified_flow")
  student = procs.make_process("trigflow")
  den = evaluation.ode_denoiser(gaussian_denoiser(teacher, S_DATA), teacher, student, 256)
  noise = student.prior(jax.random.PRNGKey(1), (8192, 1))
  run = lambda steps: np.asarray(jax.jit(lambda z: solvers.sample(
      den, student, z, solver=solver, steps=steps, rng=jax.random.PRNGKey(2), **kwargs))(noise))
  one, four = run(1), run(4)
  assert abs(four.std() / S_DATA - 1) < 0.03, four.std()
  assert abs(one.std() / S_DATA - 1) < 0.03, one.std()
  assert np.abs(four - one).max() > 0.05


def test_refine_grid():
  """refine_from = r: one step from t_max to r, then even steps to the clean end; without it
  the process's own grid; a time outside (t_end, t_max) is one clear error; tcd and
  consistency take it through grid_kwargs."""
  trig = procs.make_process("trigflow")
  np.testing.assert_allclose(solvers.refine_grid(trig, 4, refine_from=0.6),
                             [np.pi / 2, 0.6, 0.4, 0.2, 0.0], atol=1e-6)
  np.testing.assert_allclose(solvers.refine_grid(trig, 2, refine_from=0.6),
                             [np.pi / 2, 0.6, 0.0], atol=1e-6)
  np.testing.assert_allclose(solvers.refine_grid(trig, 1, refine_from=0.6), [np.pi / 2, 0.0],
                             atol=1e-6)
  np.testing.assert_array_equal(solvers.refine_grid(trig, 4), trig.timesteps(4))
  vp = procs.make_process("vp_discrete")
  np.testing.assert_array_equal(solvers.refine_grid(vp, 3, spacing="leading"),
                                vp.timesteps(3, spacing="leading"))
  with pytest.raises(ValueError, match="refine_from=2.0"):
    solvers.refine_grid(trig, 4, refine_from=2.0)
  den = gaussian_denoiser(trig, S_DATA)
  noise = trig.prior(jax.random.PRNGKey(3), (16, 2))
  for solver in ("tcd", "consistency"):
    a = solvers.sample(den, trig, noise, solver=solver, steps=4, rng=jax.random.PRNGKey(4),
                       grid_kwargs={"refine_from": 0.6})
    b = solvers.sample(den, trig, noise, solver=solver, rng=jax.random.PRNGKey(4),
                       timesteps=[np.pi / 2, 0.6, 0.4, 0.2, 0.0])
    np.testing.assert_allclose(a, b, rtol=1e-6)
