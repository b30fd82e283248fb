"""Sampling from a run's networks and the eval.json report of DESIGN.md.

Every entry of one report uses the same metric, sample count, noise seed and (for classes) the
same labels: the teacher at 1 step (one Euler step of its ODE from pure noise) and at its
reference step count, and the student at each of `eval.steps` with the objective's sampler.
`nfe` counts network calls.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from distill import context as ctx_lib
from distill import runlog
from distill import solvers
from distill.metrics import swd as swd_lib
from distill.registry import Registry, parse_spec

METRICS: Registry = Registry("metric")


@METRICS.register("swd")
def _swd_metric(samples: np.ndarray, reference: np.ndarray) -> float:
  return swd_lib.swd(samples, reference)


@METRICS.register("fd")
def _fd_metric(samples: np.ndarray, reference: np.ndarray) -> dict:
  """Frechet distance in the digit classifier's features, plus class coverage and entropy."""
  from distill.metrics import digits_classifier  # pylint: disable=import-outside-toplevel
  return digits_classifier.fd_and_coverage(samples, reference)


def scores(metric: str, samples: np.ndarray, reference: np.ndarray) -> dict:
  """`{metric: value, ...}`: a metric returns its value, or a dict holding it and extras."""
  out = METRICS.get(metric)(samples, reference)
  out = dict(out) if isinstance(out, dict) else {metric: out}
  return {k: float(v) for k, v in out.items()}


def default_metric(source) -> str:
  """2-D toy data -> swd; image data -> the dataset's own feature metric (`fd`)."""
  metric = getattr(source, "metric", None)
  if metric:
    return metric
  return "swd" if len(source.shape) == 1 else "fd"


def nfe_of(solver: str, steps: int) -> int:
  """Network calls of a sampler run (Heun: two per step but the last)."""
  if parse_spec(solver, "sampler")[0] == "heun":
    return max(1, 2 * steps - 1)
  return steps


def teacher_solver(process) -> str:
  """The teacher's reference ODE solver: Euler in the process's own time for flow and EDM
  processes; for VP processes DDIM, which is Euler in the (sigma/alpha, x/alpha) coordinates
  (Euler in raw VP time is a poor one-step baseline)."""
  return "ddim" if process.name.startswith("vp_") else "euler"


def sample_labels(num_classes: int, n: int, seed: int) -> Optional[np.ndarray]:
  if not num_classes:
    return None
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


def embeds_guidance(ctx: ctx_lib.Context, net: str) -> bool:
  """Whether network `net` takes the guidance scale as an input (`guidance_embed`)."""
  return bool(getattr(ctx.nets[net].module, "guidance_embed", False))


def make_sampler(ctx: ctx_lib.Context, net: str, *, solver: str, steps: int,
                 guidance: float = 1.0, **solver_kwargs) -> Callable:
  """jit(fn(params, noise, labels, rng) -> samples) for network `net` of `ctx`.

  `solver` is a solver name or a spec with solver options, e.g. "tcd(gamma=0.0)". `guidance`
  is the network's input where it embeds the scale, else classifier-free guidance.
  """
  info = ctx.nets[net]
  process = info.process
  solver, spec_kwargs = parse_spec(solver, "sampler")
  solver_kwargs = {**spec_kwargs, **solver_kwargs}
  embed = embeds_guidance(ctx, net)

  def run(params, noise, labels, rng):
    def denoiser(x_t, t):
      cond = {} if labels is None else {"class_labels": labels}
      if embed:
        w = jnp.full((x_t.shape[0],), guidance, jnp.float32)
        return ctx.x0(net, x_t, t, cond, params=params, guidance=w)
      x0 = ctx.x0(net, x_t, t, cond, params=params)
      if guidance != 1.0 and labels is not None:
        uncond = ctx.x0(net, x_t, t, {"class_labels": jnp.full_like(labels, info.num_classes)},
                        params=params)
        x0 = uncond + guidance * (x0 - uncond)
      return x0
    return solvers.sample(denoiser, process, noise, solver=solver, steps=steps, rng=rng,
                          **solver_kwargs)
  return jax.jit(run)


def generate(ctx: ctx_lib.Context, net: str, params: Any, *, n: int, seed: int, solver: str,
             steps: int, shape: tuple, batch: int = 4096, guidance: float = 1.0,
             labels: Optional[np.ndarray] = None,
             class_conditional: bool = False) -> tuple[np.ndarray, float]:
  """n samples (host numpy) and seconds per sample, from fixed noise of `seed`.

  Unconditional (the null class) unless `labels` are given or `class_conditional` asks for
  labels drawn uniformly with `seed`.
  """
  process = ctx.nets[net].process
  num_classes = ctx.nets[net].num_classes
  if labels is None and class_conditional:
    labels = sample_labels(num_classes, n, seed)
  fn = make_sampler(ctx, net, solver=solver, steps=steps, guidance=guidance)
  key = jax.random.PRNGKey(seed)
  out = []
  t0 = None
  for i in range(0, n, batch):
    m = min(batch, n - i)
    k_noise, k_run = jax.random.split(jax.random.fold_in(key, i))
    noise = process.prior(k_noise, (m,) + tuple(shape))
    lab = None if labels is None else jnp.asarray(labels[i:i + m])
    if t0 is None:  # compile outside the timing
      jax.block_until_ready(fn(params, noise, lab, k_run))
      t0 = time.perf_counter()
    out.append(np.asarray(jax.block_until_ready(fn(params, noise, lab, k_run))))
  dt = time.perf_counter() - t0
  return np.concatenate(out)[:n], dt / max(n, 1)


def teacher_row_key(*, teacher_hash: str, data_hash: str, metric: str, num_samples: int,
                    seed: int, solver: str, steps: int, class_conditional: bool,
                    guidance: float = 1.0) -> str:
  """The key of one teacher row in a teacher's row cache (everything the row depends on; the
  guidance scale only when it is not 1, so caches written before it keep their keys)."""
  key = {"teacher": teacher_hash, "data": data_hash, "metric": metric,
         "num_samples": int(num_samples), "seed": int(seed), "solver": solver,
         "steps": int(steps), "class_conditional": bool(class_conditional)}
  if float(guidance) != 1.0:
    key["guidance"] = float(guidance)
  return json.dumps(key, sort_keys=True)


def evaluate(*, ctx: ctx_lib.Context, source, params: dict, step: int, student: Optional[str],
             student_role: str, student_solver: str, student_steps, teacher: Optional[str],
             teacher_steps: int, num_samples: int, seed: int, metric: str = "",
             class_conditional: bool = False, teacher_cache: Optional[dict] = None,
             teacher_hash: str = "", guidance: float = 1.0) -> dict:
  """The eval.json dict: teacher (1 step, reference steps) and student rows.

  `guidance` != 1: the teacher's rows sample with CFG at that scale; a student that embeds the
  scale gets it as its input, any other student samples as it is.

  `teacher_cache` ({`teacher_row_key(...)`: row}, with `teacher_hash` the teacher weights'
  hash) supplies teacher rows computed before with identical settings (a frozen teacher's
  numbers never change); rows computed here are added to it.
  """
  metric = metric or default_metric(source)
  reference = source.reference(num_samples, seed)
  # The floor compares the evaluation reference with an independent real set of the same size.
  floor = scores(metric, reference, source.floor_reference(num_samples, seed))[metric]
  use_cache = teacher_cache is not None and bool(teacher_hash)
  data_hash = source.content_hash() if use_cache else ""
  results = {}

  def row(net, p, solver, steps):
    w = guidance if (net == teacher or embeds_guidance(ctx, net)) else 1.0
    samples, sec = generate(ctx, net, p, n=num_samples, seed=seed + 1, solver=solver,
                            steps=steps, shape=source.shape, guidance=w,
                            class_conditional=class_conditional)
    return {**scores(metric, samples, reference), "nfe": nfe_of(solver, steps),
            "num_samples": int(num_samples), "sec_per_sample": float(sec), "solver": solver}

  # (key, network, solver, steps, teacher row?) of every row, in eval.json's order.
  specs = []
  if teacher is not None:
    solver = teacher_solver(ctx.nets[teacher].process)
    specs += [(f"teacher_steps_{n}", teacher, solver, n, True)
              for n in sorted({1, int(teacher_steps)})]
  if student is not None:
    specs += [(f"{student_role}_steps_{int(n)}", student, student_solver, int(n), False)
              for n in student_steps]
  with runlog.progress_bar(len(specs), "eval") as bar:
    for name, net, solver, steps, is_teacher in specs:
      key = None
      if is_teacher and use_cache:
        key = teacher_row_key(teacher_hash=teacher_hash, data_hash=data_hash, metric=metric,
                              num_samples=num_samples, seed=seed, solver=solver, steps=steps,
                              class_conditional=class_conditional, guidance=guidance)
      if key is not None and key in teacher_cache:
        results[name] = dict(teacher_cache[key])
      else:
        results[name] = row(net, params[net], solver, steps)
        if key is not None:
          teacher_cache[key] = dict(results[name])
      bar.update(1)
  out = {"step": int(step), "metric": metric, "teacher_reference_steps": int(teacher_steps),
         "data_floor": float(floor), "class_conditional": bool(class_conditional),
         "results": results}
  if float(guidance) != 1.0:
    out["guidance"] = float(guidance)
  return out
