"""Sampling from a run's networks and the eval.json report of DESIGN.md.

Every entry of one report uses the same metrics, sample count, noise seed and (for classes) the
same labels: the teacher at 1 step (one Euler step of its ODE from pure noise) and at its
reference step count, and the student at each of `eval.steps` with the objective's sampler.
`nfe` counts network evaluations, as the literature does: a classifier-free-guided step counts
its conditional and null passes (2), though they run as one call on a doubled batch.

Metrics are registered by name in `METRICS`: `swd` (toy data), `fd` (digits) and the image
metrics of `distill.metrics.suite` (`fid`, `sfid`, `is`, `pr`, `clip`). A metric is
`fn(samples, reference)` returning its value or a dict holding it (under its own name) and
extras; one that also takes a keyword `setup` receives the evaluation's `MetricSetup` (Inception
weights, reference statistics, VAE, CLIP; the `eval.*` keys). An evaluation may ask for several
metrics (`eval.metrics`): the first is eval.json's `metric` (and `data_floor`'s), every row
holds the values of all of them.

Conditioning. `generate` takes the conditioning of its n samples as batch keys with n rows
(`conds`: class labels `label`, or a prompt: `text_embeds`, `text_mask`, `pooled_text_embeds`,
`time_ids`), mapped to the model keywords by `context.cond_from_batch`; classifier-free guidance
drops them with `context.null_condition` (the network's null prompt `NetInfo.null_inputs`, else
zeros / the null class) in one doubled-batch call (`objectives.matching.guided`). The evaluation
samples text-to-image data with `Source.conditions(num_samples, seed)` (the same prompts for
every row; their CLIP token ids, when the data has them, pair sample i with prompt i in the CLIP
score).

Generation (`generate`) is data-parallel: each chunk of noise is placed with its batch axis
split over the mesh's data-parallel axes (data, fsdp) of the context, padded to a multiple of
their size. The noise of a chunk depends only on the seed and the chunk (`batch`, fixed), not
on the device count, and with JAX's partitionable threefry (the default) a stochastic sampler's
per-step noise of the padded batch begins with that of the unpadded one, so 1 and 8 devices give
the same samples up to float rounding.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill import context as ctx_lib
from distill import processes as procs
from distill import runlog
from distill import sharding as shd
from distill import solvers
from distill.metrics import suite
from distill.metrics import swd as swd_lib
from distill.metrics.suite import MetricSetup  # noqa: F401  (re-exported for callers)
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


for _name, _fn in suite.METRIC_FUNCTIONS.items():
  METRICS.add(_name, _fn)

# What the data must be for a metric with a fixed input (the image metrics check theirs in
# MetricSetup.check; swd flattens any shape): checked before anything is sampled.
DATA_OF_METRIC = {
    "fd": (lambda shape: len(shape) == 3 and shape[-1] == 1,
           "grayscale images (H, W, 1) in the digit classifier's features"),
}


def check_metric_data(names: Sequence[str], shape: Sequence[int]) -> None:
  """One line when a metric cannot score data of `shape` (e.g. `fd` on 2-D toy points)."""
  for m in names:
    fits, what = DATA_OF_METRIC.get(m, (lambda _: True, ""))
    if not fits(tuple(shape)):
      raise suite.MetricError(f"config key 'eval.metric(s)': metric {m!r} scores {what}; the "
                              f"data are {tuple(shape)} (swd scores any data; images: fid and "
                              "the other image metrics)")


def takes_setup(metric: str) -> bool:
  """Whether metric `metric` takes the evaluation's `MetricSetup` (keyword `setup`)."""
  return "setup" in inspect.signature(METRICS.get(metric)).parameters


def scores(metric: str, samples: np.ndarray, reference: np.ndarray,
           setup: Optional[MetricSetup] = None) -> dict:
  """`{metric: value, ...}`: a metric returns its value, or a dict holding it and extras.
  Metrics that take a `setup` get `setup`."""
  fn = METRICS.get(metric)
  out = fn(samples, reference, setup=setup) if takes_setup(metric) else fn(samples, reference)
  out = dict(out) if isinstance(out, dict) else {metric: out}
  return {k: float(v) for k, v in out.items()}


def check_eval_config(eval_cfg, files: bool = True) -> None:
  """Raises ValueError (one line naming the key) for unknown `eval.metrics` names and (`files`)
  files the image metrics need that do not exist (data-dependent checks run at evaluation)."""
  names = tuple(m for m in eval_cfg.get("metrics", ()) if str(m).strip())
  if eval_cfg.get("metric", ""):
    names = names or (eval_cfg.metric,)
  for m in names:
    if m not in METRICS:
      raise suite.MetricError(f"config key 'eval.metrics': unknown metric {m!r} (known: "
                       f"{', '.join(METRICS.names())})")
  if eval_cfg.get("sampler", ""):
    solvers.check_sampler(eval_cfg.sampler, "config key 'eval.sampler'")
  for key in ("steps", "ideal_steps"):
    bad = [s for s in eval_cfg.get(key, ()) if int(s) < 1]
    if bad:
      raise ValueError(f"config key 'eval.{key}': every entry must be >= 1, got {bad[0]}")
  if files:
    MetricSetup.from_config(eval_cfg, names).check_files()


def resolve_metrics(source, metric: str = "", metrics: Sequence[str] = ()) -> tuple[str, ...]:
  """The evaluation's metric names: `metrics` if given, else (`metric` or the data's default).
  Unknown names raise one line naming `eval.metrics`."""
  names = tuple(m.strip() for m in metrics if m.strip()) or (metric or default_metric(source),)
  for m in names:
    if m not in METRICS:
      raise suite.MetricError(f"config key 'eval.metrics': unknown metric {m!r} (known: "
                       f"{', '.join(METRICS.names())})")
  if len(set(names)) != len(names):
    raise suite.MetricError(f"config key 'eval.metrics': {names} names a metric twice")
  return names


def default_metric(source) -> str:
  """The dataset's own metric (`Source.metric`: the digits' `fd`), else 2-D toy data -> swd and
  images or latents -> fid (Inception features of the decoded samples: `eval.vae`,
  `eval.inception_weights`)."""
  metric = getattr(source, "metric", None)
  if metric:
    return metric
  return "swd" if len(source.shape) == 1 else "fid"


def nfe_of(solver: str, steps: int) -> int:
  """Network calls of a sampler run (Heun: two per step but the last)."""
  if parse_spec(solver, "sampler")[0] == "heun":
    return max(1, 2 * steps - 1)
  return steps


def guidance_passes(ctx: ctx_lib.Context, net: str, guidance: float, *,
                    class_conditional: bool = False,
                    conds: Optional[Mapping] = None) -> int:
  """Network evaluations per denoiser call of `net` sampled at `guidance`: 2 where classifier-
  free guidance runs a conditional and a null pass (one call on a doubled batch, which the
  literature's NFE counts twice), else 1 (w = 1 or 0, a network that takes w as its input, or
  nothing to condition on)."""
  if float(guidance) in (0.0, 1.0) or embeds_guidance(ctx, net):
    return 1
  keys = dict.fromkeys(conds or {})
  if class_conditional:
    keys.setdefault("label")
  return 2 if ctx_lib.conditional(ctx.nets[net], ctx_lib.cond_from_batch(keys)) else 1


def check_steps(process, steps, what: str) -> None:
  """Raises one line naming `what` (a config key, a flag) when a step count is more than the
  network's time grid has
  (a 1000-timestep VP network sampled with 2000 DDIM steps would repeat, then skip past, its
  timesteps: NaN samples)."""
  limit = process.max_steps if process is not None else None
  bad = [int(n) for n in steps if limit is not None and int(n) > limit]
  if bad:
    raise ValueError(f"{what}: {bad[0]} steps, but the network's process has "
                     f"{limit} timesteps (at most {limit} steps)")


def teacher_solver(process) -> str:
  """The teacher's reference ODE solver: Euler in the process's own time for flow and EDM
  processes; for VP processes DDIM, which is Euler in the (sigma/alpha, x/alpha) coordinates
  (Euler in raw VP time is a poor one-step baseline)."""
  return "ddim" if process.name.startswith("vp_") else "euler"


def sample_labels(num_classes: int, n: int, seed: int) -> Optional[np.ndarray]:
  if not num_classes:
    return None
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(np.int32)


# The key of CLIP token ids in `Source.conditions` (for the CLIP score, not a network input).
CLIP_TOKENS = "clip_tokens"


def source_conditions(source, n: int, seed: int) -> dict[str, np.ndarray]:
  """The prompt conditioning of `n` samples (`Source.conditions`, batch keys with n rows, with
  any `clip_tokens`); {} for data without prompts."""
  fn = getattr(source, "conditions", None)
  return {} if fn is None else {k: np.asarray(v) for k, v in fn(n, seed).items()}


def network_conditions(conds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`conds` without the keys that are no network input (`clip_tokens`)."""
  return {k: v for k, v in conds.items() if k != CLIP_TOKENS}


def conditions_hash(conds: Mapping[str, Any],
                    null_inputs: Optional[Mapping[str, Any]] = None) -> str:
  """sha256 (16 hex) of conditioning arrays (keys, dtypes, shapes, bytes) and, when given, the
  null prompt CFG uses; "" without conditions."""
  if not conds:
    return ""
  h = hashlib.sha256()
  for tag, group in (("cond", conds), ("null", null_inputs or {})):
    for k in sorted(group):
      v = np.ascontiguousarray(np.asarray(group[k]))
      h.update(f"{tag}:{k}:{v.dtype.str}:{v.shape}".encode())
      h.update(v.tobytes())
  return h.hexdigest()[:16]


def embeds_guidance(ctx: ctx_lib.Context, net: str) -> bool:
  """Whether network `net` takes the guidance scale as an input (`context.embeds_guidance`)."""
  return ctx_lib.embeds_guidance(ctx.nets[net].module)


def net_denoiser(ctx: ctx_lib.Context, net: str, params, cond, guidance: float) -> Callable:
  """denoiser(x_t, t) -> x0 of network `net`: with the guidance scale as its input where it
  embeds one, else classifier-free guidance against `context.null_condition`."""
  from distill.objectives import matching  # pylint: disable=import-outside-toplevel
  guidance = float(guidance)
  if embeds_guidance(ctx, net):
    def embedded(x_t, t):
      w = jnp.full((x_t.shape[0],), guidance, jnp.float32)
      return ctx.x0(net, x_t, t, cond, params=params, **ctx.guidance_inputs(net, w))
    return embedded
  return lambda x_t, t: matching.guided(ctx, net, x_t, t, cond, guidance, "x0", params=params)


def matching_time(process, ratio: jax.Array) -> jax.Array:
  """The time of `process` at which sigma / (alpha + sigma) equals `ratio` (in [0, 1]), i.e.
  the time with another process's signal-to-noise ratio: bisection (40 halvings) over
  [t_end, t_max], where that ratio increases."""
  ratio = jnp.clip(jnp.asarray(ratio, jnp.float32), 0.0, 1.0)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    alpha, sigma = process.alpha_sigma(mid)
    below = sigma / (alpha + sigma) < ratio
    return jnp.where(below, mid, lo), jnp.where(below, hi, mid)
  lo, hi = jax.lax.fori_loop(0, 40, halve, (jnp.full_like(ratio, process.t_end),
                                            jnp.full_like(ratio, process.t_max)))
  return 0.5 * (lo + hi)


def ode_denoiser(teacher_denoiser: Callable, teacher_process, process, steps: int) -> Callable:
  """denoiser(x_t, t) -> x0 for states of `process`, by solving the teacher's own ODE: x_t moved
  to the teacher's time u with the same signal-to-noise ratio (x scaled by (alpha' + sigma') /
  (alpha + sigma)), then `steps` steps of the teacher's reference solver to its clean end, on
  the teacher's own `steps`-step grid scaled from [t_max, t_end] onto [u, t_end] (from t_max:
  exactly the teacher's reference sample).

  Used as a consistency sampler's denoiser it is an exact consistency function of the teacher
  (up to the solver's error): the "ideal" evaluation rows. The sampler's times are shared by
  the batch (every solver here), so the grid follows the first sample's time."""
  solver = teacher_solver(teacher_process)
  t_end, t_max = teacher_process.t_end, teacher_process.t_max
  shape = (jnp.asarray(teacher_process.timesteps(steps), jnp.float32) - t_end) / (t_max - t_end)

  def denoiser(x_t, t):
    alpha, sigma = process.alpha_sigma(t[0])
    u = matching_time(teacher_process, sigma / (alpha + sigma))
    alpha_u, sigma_u = teacher_process.alpha_sigma(u)
    x_u = x_t * ((alpha_u + sigma_u) / (alpha + sigma)).astype(x_t.dtype)
    grid = t_end + (u - t_end) * shape
    return solvers.sample(teacher_denoiser, teacher_process, x_u, solver=solver,
                          timesteps=grid)
  return denoiser


def make_sampler(ctx: ctx_lib.Context, net: str, *, solver: str, steps: int,
                 guidance: float = 1.0, ode_teacher: str = "", ode_steps: int = 0,
                 **solver_kwargs) -> Callable:
  """jit(fn(params, noise, conds, rng) -> samples) for network `net` of `ctx`.

  `conds`: the conditioning as batch keys with the noise's rows ({"label": (B,)}, prompt
  embeddings {"text_embeds": (B, L, D), ...}; {} or None: unconditional; an array: labels).
  `solver` is a solver name or a spec with solver options, e.g. "tcd(gamma=0.0)". `guidance`
  is the network's input where it embeds the scale, else classifier-free guidance against
  `context.null_condition` (one call on the doubled batch).

  `ode_teacher`: sample `net`'s process with `solver`, but denoise each step by that network's
  ODE (`ode_denoiser`, `ode_steps` steps; `params` are then its parameters).
  """
  process = ctx.nets[net].process
  solver, spec_kwargs = parse_spec(solver, "sampler")
  solver_kwargs = {**spec_kwargs, **solver_kwargs}

  def run(params, noise, conds, rng):
    if conds is not None and not isinstance(conds, Mapping):
      conds = {"label": conds}
    cond = ctx_lib.cond_from_batch(conds or {})
    if ode_teacher:
      denoiser = ode_denoiser(net_denoiser(ctx, ode_teacher, params, cond, guidance),
                              ctx.nets[ode_teacher].process, process, int(ode_steps))
    else:
      denoiser = net_denoiser(ctx, net, params, cond, guidance)
    return solvers.sample(denoiser, process, noise, solver=solver, steps=steps, rng=rng,
                          **solver_kwargs)
  return jax.jit(run)


def _place(x: np.ndarray, mesh, rows: int):
  """Host array -> a global array of `rows` rows (zero padded), batch axis split over the
  mesh's data-parallel axes; on the default device when there is no mesh."""
  if len(x) < rows:
    x = np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)])
  if mesh is None:
    return jnp.asarray(x)
  sharding = shd.batch_sharding(mesh, x.ndim)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _to_host(x) -> np.ndarray:
  """A (possibly multi-process) global array -> host numpy on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def check_conditions(conds: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
  """`conds` as host arrays (labels int32), each with at least `n` rows, else one line naming
  the key."""
  out = {}
  for k, v in conds.items():
    v = np.asarray(v, np.int32) if k == "label" else np.asarray(v)
    if v.ndim == 0 or len(v) < n:
      raise ValueError(f"conditioning {k!r}: expected {n} rows, got shape {v.shape}")
    out[k] = v
  return out


def generate(ctx: ctx_lib.Context, net: str, params: Any, *, n: int, seed: int, solver: str,
             steps: int, shape: tuple, batch: int = 4096, guidance: float = 1.0,
             labels: Optional[np.ndarray] = None,
             conds: Optional[Mapping[str, np.ndarray]] = None, class_conditional: bool = False,
             desc: str = "", ode_teacher: str = "", ode_steps: int = 0
             ) -> tuple[np.ndarray, float]:
  """n samples (host numpy) and seconds per sample, from fixed noise of `seed`.

  `conds`: the conditioning, batch keys with (at least) n rows, row i for sample i (class
  labels `label`, prompt embeddings `text_embeds`, ...; see `make_sampler`); `labels` is
  shorthand for {"label": labels}. Unconditional (the null class) unless labels are given or
  `class_conditional` asks for labels drawn uniformly with `seed`. Chunks of `batch` samples
  (chunk i's noise from `fold_in(PRNGKey(seed), i)`, independent of the device count) run
  data-parallel over the context's mesh (module docstring), each padded to one compiled size,
  their conditioning rows placed the same way. `desc`: show a progress bar with this title
  (off with DISTILL_NO_PROGRESS=1). `ode_teacher`, `ode_steps`: as `make_sampler`.
  """
  process = ctx.nets[net].process
  num_classes = ctx.nets[net].num_classes
  conds = dict(conds or {})
  if labels is not None:
    conds["label"] = labels
  if "label" not in conds and class_conditional:
    drawn = sample_labels(num_classes, n, seed)
    if drawn is not None:
      conds["label"] = drawn
  conds = check_conditions(conds, n)
  fn = make_sampler(ctx, net, solver=solver, steps=steps, guidance=guidance,
                    ode_teacher=ode_teacher, ode_steps=ode_steps)
  mesh = ctx.mesh
  dp = shd.data_parallel_size(mesh) if mesh is not None else 1
  rows = -(-min(batch, max(n, 1)) // dp) * dp  # the one compiled batch size
  key = jax.random.PRNGKey(seed)
  out = []
  t0 = None
  with runlog.progress_bar(n, desc) if desc else _NoBar() as bar:
    for i in range(0, n, batch):
      m = min(batch, n - i)
      k_noise, k_run = jax.random.split(jax.random.fold_in(key, i))
      noise = np.asarray(process.prior(k_noise, (m,) + tuple(shape)))
      x = _place(noise, mesh, rows)
      c = {k: _place(np.ascontiguousarray(v[i:i + m]), mesh, rows) for k, v in conds.items()}
      if t0 is None:  # compile outside the timing
        jax.block_until_ready(fn(params, x, c, k_run))
        t0 = time.perf_counter()
      out.append(_to_host(jax.block_until_ready(fn(params, x, c, k_run)))[:m])
      bar.update(m)
  dt = time.perf_counter() - t0 if t0 is not None else 0.0
  return np.concatenate(out)[:n], dt / max(n, 1)


class _NoBar:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, k: int) -> None:
    del k


def ideal_solver_id(solver: str, process, teacher_process, teacher_steps: int) -> str:
  """The cache identity of an ideal row's sampler: the student's sampler spec on the student's
  process, denoised by the teacher's solver at `teacher_steps` steps."""
  return json.dumps({"ideal": solver, "process": procs.process_config(process),
                     "teacher_solver": teacher_solver(teacher_process),
                     "teacher_steps": int(teacher_steps)}, sort_keys=True)


def teacher_row_key(*, teacher_hash: str, data_hash: str, metric: str, num_samples: int,
                    seed: int, solver: str, steps: int, class_conditional: bool,
                    guidance: float = 1.0, metric_setup: str = "",
                    conditions: str = "", batch: int = 0) -> str:
  """The key of one teacher row in a teacher's row cache (everything the row depends on; the
  guidance scale only when it is not 1, the metric setup (`MetricSetup.identity`: weights,
  decoder, published statistics) and the prompts (`conditions_hash`) only when there are any,
  and the generation chunk `batch` only when it splits the samples (each chunk draws its own
  noise, so the chunk size changes the samples), so caches written before them keep their
  keys). `metric`: the metric names joined by commas."""
  key = {"teacher": teacher_hash, "data": data_hash, "metric": metric,
         "num_samples": int(num_samples), "seed": int(seed), "solver": solver,
         "steps": int(steps), "class_conditional": bool(class_conditional)}
  if float(guidance) != 1.0:
    key["guidance"] = float(guidance)
  if metric_setup:
    key["metric_setup"] = metric_setup
  if conditions:
    key["conditions"] = conditions
  if 0 < int(batch) < int(num_samples):
    key["batch"] = int(batch)
  return json.dumps(key, sort_keys=True)


def evaluate(*, ctx: ctx_lib.Context, source, params: dict, step: int, student: Optional[str],
             student_role: str, student_solver: str, student_steps, teacher: Optional[str],
             teacher_steps: int, num_samples: int, seed: int, metric: str = "",
             class_conditional: bool = False, teacher_cache: Optional[dict] = None,
             teacher_hash: str = "", guidance: float = 1.0, metrics: Sequence[str] = (),
             setup: Optional[MetricSetup] = None, batch: int = 4096,
             ideal_steps: Sequence[int] = ()) -> dict:
  """The eval.json dict: teacher (1 step, reference steps) and student rows.

  `ideal_steps`: rows `ideal_steps_<n>`, the student's sampler at n steps with the teacher's own
  ODE (`teacher_steps` steps of its reference solver) as the denoiser of every step: what an
  exact consistency student would score with that sampler, so a student's multi-step gap can
  be told apart from the sampler's (NFE: n * teacher_steps). They are teacher rows for the
  cache (they depend on the teacher, the sampler and the student's process only).

  `metrics` (else `metric`, else the data's default): every row holds the values of all of
  them; the first is the report's `metric` and `data_floor`. `setup` carries what the image
  metrics need (`MetricSetup`; default: one without files, enough for swd / fd); it is checked
  before any sampling. `batch`: samples per generation chunk (global).

  `guidance` != 1: the teacher's rows sample with CFG at that scale; a student that embeds the
  scale gets it as its input, any other student samples as it is.

  Text-to-image data (`source.conditions(num_samples, seed)` gives prompts): every row samples
  sample i with prompt i; their `clip_tokens`, if any, become `setup.prompt_tokens` (unless
  `eval.clip_tokens` is set) so the CLIP score pairs sample i with prompt i.

  `teacher_cache` ({`teacher_row_key(...)`: row}, with `teacher_hash` the teacher weights'
  hash) supplies teacher rows computed before with identical settings (a frozen teacher's
  numbers never change); rows computed here are added to it.
  """
  if not source.real_data:
    raise suite.MetricError(f"the evaluation's data ({type(source).__name__}) has no reference "
                            "images: evaluate against a data set that has them, e.g. "
                            "--config.data.name=latents --config.data.path=DIR")
  names = resolve_metrics(source, metric, metrics)
  metric = names[0]
  setup = setup if setup is not None else MetricSetup()
  setup.metrics = names
  setup._last = None  # pylint: disable=protected-access
  conds = source_conditions(source, num_samples, seed)
  if CLIP_TOKENS in conds and setup.prompt_tokens is None and not setup.clip_tokens:
    setup.prompt_tokens = conds[CLIP_TOKENS]
  conds = network_conditions(conds)
  check_metric_data(names, source.shape)
  setup.check(tuple(source.shape), num_samples)
  uses_setup = [m for m in names if takes_setup(m)]
  use_cache = teacher_cache is not None and bool(teacher_hash)
  data_hash = source.content_hash() if (use_cache or uses_setup) else ""
  if uses_setup:
    setup.bind(data_hash=data_hash, num_samples=num_samples, seed=seed)
  reference = source.reference(num_samples, seed)
  if uses_setup and any(m in suite.INCEPTION_NAMES for m in names):
    setup.reference_statistics(reference)  # fails early on a stale statistics file
  setup_id = setup.identity()

  def row_scores(samples) -> dict:
    out = {}
    for m in names:
      out.update(scores(m, samples, reference, setup))
    return out

  # The floor compares the evaluation reference with an independent real set of the same size
  # (metrics with a setup score the independent set against the reference; their floor is
  # computed once per process).
  if takes_setup(metric):
    floor_key = json.dumps([metric, setup_id, setup.reference_meta], sort_keys=True)
    cache = suite.floor_cache()
    if floor_key not in cache:
      cache[floor_key] = scores(metric, source.floor_reference(num_samples, seed), reference,
                                setup)
    floor = cache[floor_key][metric]
  else:
    floor = scores(metric, reference, source.floor_reference(num_samples, seed))[metric]
  results = {}

  def row_guidance(net, ode_teacher):
    return guidance if (net == teacher or ode_teacher or embeds_guidance(ctx, net)) else 1.0

  def row_nfe(net, solver, steps, ode_teacher):
    """Network evaluations per sample (CFG's two passes counted; the ODE teacher's per step)."""
    inner = (nfe_of(teacher_solver(ctx.nets[ode_teacher].process), int(teacher_steps))
             if ode_teacher else 1)
    return nfe_of(solver, steps) * inner * guidance_passes(
        ctx, ode_teacher or net, row_guidance(net, ode_teacher),
        class_conditional=class_conditional, conds=conds)

  def row(net, p, solver, steps, name, ode_teacher=""):
    samples, sec = generate(ctx, net, p, n=num_samples, seed=seed + 1, solver=solver,
                            steps=steps, shape=source.shape,
                            guidance=row_guidance(net, ode_teacher), conds=conds,
                            class_conditional=class_conditional, batch=batch,
                            desc=f"sample {name}", ode_teacher=ode_teacher,
                            ode_steps=int(teacher_steps) if ode_teacher else 0)
    return {**row_scores(samples), "nfe": row_nfe(net, solver, steps, ode_teacher),
            "num_samples": int(num_samples), "sec_per_sample": float(sec), "solver": solver}

  # (key, network, solver, steps, teacher row?, ODE teacher) of every row, in eval.json's order.
  specs = []
  if teacher is not None:
    solver = teacher_solver(ctx.nets[teacher].process)
    specs += [(f"teacher_steps_{n}", teacher, solver, n, True, "")
              for n in sorted({1, int(teacher_steps)})]
  if student is not None:
    specs += [(f"{student_role}_steps_{int(n)}", student, student_solver, int(n), False, "")
              for n in student_steps]
    if teacher is not None:
      specs += [(f"ideal_steps_{int(n)}", student, student_solver, int(n), True, teacher)
                for n in ideal_steps]
  with runlog.progress_bar(len(specs), "eval") as bar:
    for name, net, solver, steps, is_teacher, ode_teacher in specs:
      key = None
      if is_teacher and use_cache:
        solver_id = solver if not ode_teacher else ideal_solver_id(
            solver, ctx.nets[net].process, ctx.nets[ode_teacher].process, int(teacher_steps))
        key = teacher_row_key(teacher_hash=teacher_hash, data_hash=data_hash,
                              metric=",".join(names), num_samples=num_samples, seed=seed,
                              solver=solver_id, steps=steps, class_conditional=class_conditional,
                              guidance=guidance, metric_setup=setup_id,
                              conditions=conditions_hash(
                                  conds, ctx.nets[ode_teacher or net].null_inputs
                                  if guidance != 1 else None),
                              batch=batch)
      if key is not None and key in teacher_cache:   # (rows cached before CFG counted 2)
        results[name] = {**teacher_cache[key], "nfe": row_nfe(net, solver, steps, ode_teacher)}
      else:
        results[name] = row(net, params[ode_teacher or net], solver, steps, name, ode_teacher)
        if key is not None:
          teacher_cache[key] = dict(results[name])
      bar.update(1)
  out = {"step": int(step), "metric": metric, "teacher_reference_steps": int(teacher_steps),
         "data_floor": float(floor), "class_conditional": bool(class_conditional),
         "results": results}
  if float(guidance) != 1.0:
    out["guidance"] = float(guidance)
  return out
