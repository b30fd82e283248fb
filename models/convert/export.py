"""What a distilled student ships with besides its weights: the diffusers scheduler config of
its few-step sampler, and (LoRA students) the adapter in PEFT's format.

    config = scheduler_config(info, sampler, grid)   # {"_class_name": "LCMScheduler", ...}
    tensors, adapter_config = peft_lora(module, lora_params, rank=r, alpha=a)

Schedulers, by (our sampler, the process of the network's raw output), each equal to our solver
on the scheduler's own grid (`scheduler.timesteps` / `sigmas`, which is what a diffusers pipeline
walks); `SCHEDULERS` is the registry:

| sampler                  | process           | diffusers scheduler                                   |
|--------------------------|-------------------|-------------------------------------------------------|
| ddim                     | vp_discrete       | DDIMScheduler (same spacing, set_alpha_to_one)         |
| lcm                      | vp_discrete       | LCMScheduler (LCM spacing over `lcm_original_steps`)   |
| consistency              | vp_discrete       | LCMScheduler (the DDPM grid, no boundary scalings)     |
| euler                    | rectified_flow    | FlowMatchEulerDiscreteScheduler (shift; time x 1000)   |
| consistency / trigflow   | rectified_flow    | FlowMatchEulerDiscreteScheduler(stochastic_sampling)   |
| trigflow                 | rectified_flow,   | SCMScheduler (SanaSprintPipeline's: the transformer    |
|                          | dense time (s x 1)| sees s = sin t' / (sin t' + cos t'))                    |

A TrigFlow student presented by `flow_to_trigflow` is a rectified-flow network underneath: its
sCM sampler's step (x0 = f(x_t, t), re-noise to the next time) is the stochastic flow-matching
step in the network's own coordinates (same x0, same unit noise; the TrigFlow prior sigma_d eps
is the flow prior eps scaled), so one step is identical and K steps differ only in the grid
(diffusers' linspace instead of sCM's mid times). Students presented by `edm_consistency` (CD,
CT, ECT) have no diffusers scheduler over their raw network (the boundary scalings are part of
the student): `scheduler_config` says so in one line.

Grids. The discrete schedulers' own grids are our samplers' grids.
FlowMatchEulerDiscreteScheduler's default grid (a linspace down to its smallest training sigma)
is not: `flow_sigmas` gives, per step count, the `sigmas=` to pass
(`scheduler.set_timesteps(sigmas=...)`, or a pipeline's `sigmas` argument: SanaPipeline,
StableDiffusion3Pipeline) so it walks our sampler's grid, in the scheduler's pre-shift units;
`launch.convert` writes them to export.json. SCMScheduler's default grid (pi/2, 1.3, 0 at 2
steps, in SanaSprintPipeline's angles) is not ours in general either: `scm_timesteps` gives our
grid in its angles and `scm_pipeline_kwargs` the SanaSprintPipeline arguments that walk it
(export.json "timesteps" and "pipeline_kwargs").

PEFT: every LoRA-adapted kernel becomes `base_model.model.<torch module>.lora_A.weight` (r, in)
and `.lora_B.weight` (out, r) (Conv: (r, in, kh, kw) and (out, r, 1, 1)), with an
adapter_config.json (`r`, `lora_alpha`, `target_modules`), so
`peft.PeftModel.from_pretrained(exported_base, dir)` applies it to the teacher.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import numpy as np

from distill.registry import Registry, parse_spec
from models.convert.common import TRANSFORMS, flatten_tree

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

SCHEDULERS: Registry = Registry("diffusers scheduler")
# FlowMatchEulerDiscreteScheduler hands the transformer timestep = sigma x this.
FLOW_MATCH_TIMESTEPS = 1000


def _vp_betas(process) -> dict:
  """The diffusers beta keys of a vp_discrete process (its schedule's own endpoints when the
  process leaves them unset)."""
  from distill.processes import BETA_SCHEDULES  # pylint: disable=import-outside-toplevel
  ends = BETA_SCHEDULES.get(process.beta_schedule)(2, process.beta_start, process.beta_end)
  return {"num_train_timesteps": int(process.num_train_timesteps),
          "beta_schedule": process.beta_schedule,
          "beta_start": round(float(ends[0]), 12), "beta_end": round(float(ends[-1]), 12)}


def _prediction_type(prediction: str, sampler: str) -> str:
  if prediction not in PREDICTION_TYPES:
    raise ValueError(f"export: a {prediction!r}-predicting network has no diffusers "
                     f"prediction_type for sampler {sampler!r} (eps, v or x0)")
  return PREDICTION_TYPES[prediction]


@SCHEDULERS.register("ddim/vp_discrete")
def _ddim(process, prediction, grid) -> dict:
  return {"_class_name": "DDIMScheduler", **_vp_betas(process),
          "prediction_type": _prediction_type(prediction, "ddim"),
          "timestep_spacing": process.spacing, "steps_offset": int(process.steps_offset),
          "set_alpha_to_one": True, "clip_sample": False}


@SCHEDULERS.register("lcm/vp_discrete")
def _lcm(process, prediction, grid) -> dict:
  return {"_class_name": "LCMScheduler", **_vp_betas(process),
          "prediction_type": _prediction_type(prediction, "lcm"),
          "original_inference_steps": int(grid.get("original_steps", 50)),
          "timestep_scaling": float(grid.get("timestep_scaling", 10.0)),
          "set_alpha_to_one": True, "clip_sample": False}


# LCMScheduler's boundary scalings at this timestep_scaling: c_skip = 0.25 / ((1e8 t)^2 + 0.25)
# < 1e-16 and c_out = 1 (float64) at every timestep t >= 1, so its step is the plain
# consistency step x0 = f(x_t, t), re-noised to the next time.
PLAIN_CONSISTENCY_SCALING = 1e8


@SCHEDULERS.register("consistency/vp_discrete")
def _consistency_vp(process, prediction, grid) -> dict:
  """A consistency student over a VP network (DMD2's multistep sampler): LCMScheduler on the
  full DDPM grid (original_inference_steps = the process's steps: K steps at 999, 999 - 1000/K,
  ... as our trailing grid) with its boundary scalings switched off."""
  del grid
  return {"_class_name": "LCMScheduler", **_vp_betas(process),
          "prediction_type": _prediction_type(prediction, "consistency"),
          "original_inference_steps": int(process.num_train_timesteps),
          "timestep_scaling": PLAIN_CONSISTENCY_SCALING,
          "set_alpha_to_one": True, "clip_sample": False}


def _flow_match(stochastic: bool) -> Callable:
  def make(process, prediction, grid) -> dict:
    if prediction != "flow":
      raise ValueError(f"export: FlowMatchEulerDiscreteScheduler needs a flow-predicting "
                       f"network, this one predicts {prediction!r}")
    scale = float(getattr(process, "timestep_scale", FLOW_MATCH_TIMESTEPS))
    if scale != FLOW_MATCH_TIMESTEPS:
      raise ValueError(f"export: this network takes flow time s scaled by {scale:g} "
                       f"(process.timestep_scale) but FlowMatchEulerDiscreteScheduler feeds it "
                       f"s x {FLOW_MATCH_TIMESTEPS}; no scheduler is written (export.json "
                       f"records the network's process)")
    return {"_class_name": "FlowMatchEulerDiscreteScheduler",
            "num_train_timesteps": FLOW_MATCH_TIMESTEPS, "shift": float(process.shift),
            "stochastic_sampling": stochastic}
  return make


# SCMScheduler's sigma_data: SANA-Sprint's. It cancels out of the pipeline's loop (the latents
# are drawn x sigma_data, divided by it before the transformer, and the result is the denoised
# sample / sigma_data; the step noise is sigma_data z), so any value walks the same flow states.
SCM_SIGMA_DATA = 0.5


def _trigflow(process, prediction, grid) -> dict:
  """sCM's sampler over a rectified-flow network presented as TrigFlow: SCMScheduler where the
  network takes dense flow time s (SanaSprintPipeline's transformer input, timestep_scale 1),
  the stochastic flow-matching Euler scheduler where it takes s x 1000."""
  if prediction == "flow" and float(getattr(process, "timestep_scale", 0.0)) == 1.0:
    return {"_class_name": "SCMScheduler", "num_train_timesteps": FLOW_MATCH_TIMESTEPS,
            "prediction_type": "trigflow", "sigma_data": SCM_SIGMA_DATA}
  return _flow_match(True)(process, prediction, grid)


SCHEDULERS.add("euler/rectified_flow", _flow_match(False))
SCHEDULERS.add("consistency/rectified_flow", _flow_match(True))
SCHEDULERS.add("trigflow/rectified_flow", _trigflow)


# Sampler options a scheduler config reproduces, by sampler: LCM's boundary scaling and the
# DDIM lattice its grid walks (`grid_kwargs={"original_steps": N}`; see _lcm); sCM's grid.
SCHEDULER_OPTIONS = {"lcm": ("timestep_scaling", "grid_kwargs"),
                     # sCM's grid (mid_t, intermediate): walked through export.json's timesteps
                     "trigflow": ("grid_kwargs",)}


def scheduler_config(info, sampler: str, grid: Mapping[str, Any] = ()) -> dict:
  """The diffusers scheduler config reproducing `sampler` (a solver name, or a spec such as
  "tcd(gamma=0.3)") over network `info`'s raw output (its own process and prediction; a
  wrapper's presented view is not what diffusers runs). Raises ValueError (one line) where no
  scheduler reproduces it: a sampler with options, a time input the scheduler does not feed."""
  spec = sampler
  sampler, options = parse_spec(spec, "sampler")
  wrapper = type(info.wrapper).__name__ if info.wrapper is not None else None
  process, prediction = info.own_process, info.own_prediction
  if wrapper == "EDMConsistency":
    raise ValueError("export: a consistency-model student (edm_consistency wrapper: cd, ct, "
                     "ect) has no diffusers scheduler over its raw network; the transformer is "
                     "exported without one")
  if wrapper not in (None, "FlowToTrigFlow"):
    raise ValueError(f"export: no diffusers scheduler for a student behind wrapper {wrapper}")
  key = f"{sampler}/{getattr(process, 'name', '')}"
  if key not in SCHEDULERS:
    raise ValueError(f"export: no diffusers scheduler reproduces sampler {sampler!r} on a "
                     f"{getattr(process, 'name', '')} network (known: "
                     f"{', '.join(SCHEDULERS.names())})")
  grid = dict(grid or {})
  reproduced = SCHEDULER_OPTIONS.get(sampler, ())
  grid.update(options.pop("grid_kwargs", {}) if "grid_kwargs" in reproduced else {})
  grid.update({k: options.pop(k) for k in reproduced if k in options})
  if options:
    raise ValueError(f"export: sampler {spec!r} has options no diffusers scheduler reproduces "
                     f"({', '.join(sorted(options))}); --sampler {sampler} writes the plain one")
  return SCHEDULERS.get(key)(process, prediction, grid)


def _grid_levels(info, sampler: str, steps) -> tuple[np.ndarray, np.ndarray]:
  """(alpha, sigma), float64, at each time of `sampler`'s `steps`-step grid over network
  `info`'s presented process (its noise levels, whatever the time coordinate)."""
  from distill import solvers  # pylint: disable=import-outside-toplevel
  name, options = parse_spec(sampler, "sampler")
  grid_of = solvers.SOLVERS.get(name).grid or solvers.process_grid
  t = np.asarray(grid_of(info.process, int(steps), **options.get("grid_kwargs", {})), np.float64)
  alpha, sigma = info.process.alpha_sigma(t)
  return np.asarray(alpha, np.float64), np.asarray(sigma, np.float64)


def flow_sigmas(sched: Mapping[str, Any], info, sampler: str, steps) -> Optional[dict]:
  """{str(n): sigmas} for n in `steps`: the `sigmas=` that make FlowMatchEulerDiscreteScheduler
  config `sched` walk `sampler`'s n-step grid on network `info` (the grid over its presented
  process, e.g. sCM's TrigFlow angles, as flow sigmas sigma / (alpha + sigma) of the same
  noise level, before the scheduler's shift, which set_timesteps applies; without the final 0,
  which the scheduler appends). None for other schedulers (their own grid is ours)."""
  if sched.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
    return None
  shift = float(sched.get("shift", 1.0))
  out = {}
  for n in steps:
    alpha, sigma = _grid_levels(info, sampler, n)
    flow = (sigma / (alpha + sigma))[:-1]
    out[str(int(n))] = [round(float(v), 8) for v in flow / (shift - (shift - 1.0) * flow)]
  return out


def scm_timesteps(sched: Mapping[str, Any], info, sampler: str, steps) -> Optional[dict]:
  """{str(n): timesteps} for n in `steps`: SCMScheduler's n + 1 TrigFlow angles (ending at 0)
  walking `sampler`'s n-step grid on network `info`, or None for other schedulers.

  SanaSprintPipeline's angle t' is the flow time s = sin t' / (sin t' + cos t') (its TrigFlow
  clean sample is the flow latent x sigma_data, so its angles are those of sigma_d = 1); our
  grid's noise levels (alpha, sigma) are s = sigma / (alpha + sigma), i.e. t' = atan2(sigma,
  alpha): sCM's 1.1 at sigma_d 0.5 is t' = 0.7765, not the pipeline's default 1.3."""
  if sched.get("_class_name") != "SCMScheduler":
    return None
  out = {}
  for n in steps:
    alpha, sigma = _grid_levels(info, sampler, n)
    out[str(int(n))] = [round(float(v), 8) for v in np.arctan2(sigma, alpha)]
  return out


def scm_pipeline_kwargs(timesteps: Mapping[str, list]) -> dict:
  """{str(n): SanaSprintPipeline call keywords} walking `timesteps` (scm_timesteps): its own
  grid's `max_timesteps` / `intermediate_timesteps` where they give it (1 and 2 steps; n steps
  evenly spaced down to 0), else `timesteps=` (which diffusers' SanaSprintPipeline passes to
  SCMScheduler.set_timesteps without num_inference_steps, a TypeError: bind it first with
  `pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, n)`)."""
  out = {}
  for key, ts in timesteps.items():
    n = int(key)
    kw = {"num_inference_steps": n, "max_timesteps": ts[0],
          "intermediate_timesteps": ts[1] if n == 2 else None}
    if n != 2 and not np.allclose(ts, np.linspace(ts[0], 0.0, n + 1), atol=1e-7, rtol=0):
      kw.update(timesteps=list(ts), max_timesteps=None)
    out[key] = kw
  return out


# --------------------------------------------------------------------------------------------
# PEFT LoRA
# --------------------------------------------------------------------------------------------


def peft_lora(rules, lora_params: Mapping, *, rank: int, alpha: float) -> tuple[dict, dict]:
  """(tensors, adapter_config) of a LoRA tree (unscanned layout) in PEFT's format.

  `rules`: the converter's Rule table of the full model (flax kernel path -> torch key, kind).
  """
  by_path = {tuple(r.flax_path): r for r in rules}
  flat = flatten_tree(lora_params)
  tensors, targets = {}, []
  for path, a in sorted(flat.items()):
    if path[-1] != "lora_A":
      continue
    kernel = path[:-1]
    rule = by_path.get(kernel)
    if rule is None or not rule.torch_key.endswith(".weight"):
      raise ValueError(f"export: no torch module for the LoRA kernel {'/'.join(kernel)}")
    module = rule.torch_key[: -len(".weight")]
    a = np.asarray(a, np.float32)
    b = np.asarray(flat[kernel + ("lora_B",)], np.float32)
    if rule.kind == "linear":
      ta, tb = a.T, b.T                                        # (r, in), (out, r)
    elif rule.kind == "conv2d":
      ta = TRANSFORMS.get("conv2d").to_torch(a)               # (r, in, kh, kw)
      tb = b.T[:, :, None, None]                              # (out, r, 1, 1)
    else:
      raise ValueError(f"export: LoRA on a {rule.kind} tensor ({rule.torch_key})")
    tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(ta)
    tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(tb)
    targets.append(module)
  if not targets:
    raise ValueError("export: the LoRA tree adapts no kernel")
  config = {"peft_type": "LORA", "task_type": None, "r": int(rank),
            "lora_alpha": float(alpha), "target_modules": sorted(targets),
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "inference_mode": True, "base_model_name_or_path": None}
  return tensors, config


# --------------------------------------------------------------------------------------------
# Pipeline index
# --------------------------------------------------------------------------------------------

# What an export ships of a pipeline besides the network's folder: the VAE (--vae) and the
# scheduler. Every other component (text encoders, tokenizers, ...) is the teacher pipeline's.
SHIPPED = ("vae", "scheduler")

# The schedulers a pipeline's denoising loop runs, where it does not run every one: SANA-Sprint's
# loop converts the flow transformer's output to TrigFlow for SCMScheduler; SanaPipeline hands
# the raw flow output to its scheduler; DiTPipeline runs the VP schedulers we export.
PIPELINE_SCHEDULERS = {"SanaSprintPipeline": ("SCMScheduler",),
                       "SanaPipeline": ("FlowMatchEulerDiscreteScheduler",),
                       # DiTPipeline calls scheduler.scale_model_input, which the flow-matching
                       # schedulers lack
                       "DiTPipeline": ("DDIMScheduler", "LCMScheduler")}


def pipeline_index(pipeline: Optional[str], shipped: Mapping[str, str],
                   network: str) -> tuple[Optional[dict], str]:
  """(model_index.json or None, a note for export.json) of an export directory holding
  `shipped` ({folder: diffusers class}) whose network is in folder `network`.

  The index is written only where `pipeline`'s from_pretrained loads the directory: the
  network, vae/ and scheduler/ are there; components the export cannot hold (text encoders,
  tokenizers) are null entries the caller passes to from_pretrained, as the note says."""
  if pipeline is None:
    return None, (f"no model_index.json: no diffusers pipeline runs this {shipped[network]}; "
                  f"load {network}/ with {shipped[network]}.from_pretrained")
  lacking = [k for k in (network,) + SHIPPED if k not in shipped]
  if lacking:
    why = {"vae": "vae/ (--vae)",
           "scheduler": "scheduler/ (none was exported: see \"scheduler\")"}
    return None, (f"no model_index.json: {pipeline} needs "
                  f"{' and '.join(why.get(k, k + '/') for k in lacking)}; load {network}/ with "
                  f"{shipped[network]}.from_pretrained")
  runs = PIPELINE_SCHEDULERS.get(pipeline)
  if runs is not None and shipped["scheduler"] not in runs:
    return None, (f"no model_index.json: {pipeline}'s loop runs {' or '.join(runs)}, not the "
                  f"exported {shipped['scheduler']}; load {network}/ with "
                  f"{shipped[network]}.from_pretrained and step scheduler/ in your own loop")
  import diffusers  # pylint: disable=import-outside-toplevel
  cls = getattr(diffusers, pipeline)
  # pylint: disable=protected-access
  modules, options = cls._get_signature_keys(cls)
  optional = set(cls._optional_components)
  # pylint: enable=protected-access
  index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
  index.update({k: ["diffusers", shipped[k]] if k in shipped else [None, None]
                for k in sorted(modules)})
  if "requires_safety_checker" in options:
    index["requires_safety_checker"] = False
  required = [k for k in sorted(modules) if k not in shipped and k not in optional]
  note = pipeline
  if required:
    note += (f" (from_pretrained needs {', '.join(f'{k}=' for k in required)} "
             f"passed: the teacher pipeline's; this export holds no {', '.join(required)})")
  return index, note
