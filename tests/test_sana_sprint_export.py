"""The SANA-Sprint export, end to end: a run of configs/t2i/sana_sprint.py:scm_ladd from a tiny
converted SANA teacher (no guidance embeddings: the student adds them), exported by
`launch.convert --workdir ... --vae <AutoencoderDC>`, loads as diffusers' SanaSprintPipeline
(SCMScheduler, the DC-AE) and reproduces our trigflow sampler through the export.json
`pipeline_kwargs` at 1, 2 and 4 steps for the same noise, prompt embeddings and CFG scale.

The run is a real run directory written with the train step replaced by a random update of
every trained network and its EMA (tests/test_unet_export.py `make_run`): what the export reads
is the checkpoint, and the update moves the student's new guidance MLP off its zero init, so the
guidance input changes the samples.
"""
from __future__ import annotations

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import evaluation
from distill import teacher as teacher_lib
from distill import trainer
from tests.test_dcae import random_dcae
from tests.test_sana_sprint_teacher import PROCESS, RECIPE, TINY, TOKENS, write_teacher_dir
from tests.test_unet_export import _random_update_and_ema, export, make_run

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.torch

DATA = dict(name="synthetic", height=8, width=8, channels=4, num_classes=0, text_tokens=TOKENS,
            text_dim=24)
# TINY without its data keys (make_run sets the data) and length (make_run runs 1 step).
OVERRIDES = [o for o in TINY if not o.startswith(("data.", "train."))] + [
    "model.dtype=float32", "teacher.runtime.dtype=float32"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(run directory, export directory) of the recipe's student with the tiny DC-AE."""
  root = tmp_path_factory.mktemp("sana_sprint_export")
  pipeline = write_teacher_dir(root / "diffusers", guidance_embeds=False)
  teacher = teacher_lib.write_converted(
      teacher_lib.load_teacher(str(pipeline), "raw", process=PROCESS), str(root / "teacher"))
  run = make_run(root / "run", RECIPE, str(teacher), DATA, OVERRIDES,
                 update=_random_update_and_ema)
  random_dcae("sana_like").save_pretrained(root / "vae")
  rc, lines = export(run, root / "export", "--vae", root / "vae")
  assert rc == 0, lines
  return run, root / "export"


def _ours(run, steps: int, noise: np.ndarray, step_noise: list, text, mask, w: float):
  """Our student sampler of the run (its eval weights) at `steps`, from unit `noise`."""
  engine, state, frozen, _ = trainer.open_run(str(run))
  net = trainer.network_for_role(engine, "student")
  params = trainer.eval_params(engine, state, frozen)
  ctx = ctx_lib.Context(params=params, ema={}, model_state={}, nets=engine.nets)
  info = engine.nets[net]
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
  fn = evaluation.make_sampler(ctx, net, solver=trainer.student_sampler(engine), steps=steps,
                               guidance=w, step_noise=jnp.stack([nhwc(a) for a in step_noise]))
  # The TrigFlow prior is sigma_d x the unit noise (the pipeline scales it by its sigma_data).
  out = fn(params[net], info.process.prior_std * nhwc(noise),
           {"text_embeds": jnp.asarray(text), "text_mask": jnp.asarray(mask)}, None)
  return np.asarray(out).transpose(0, 3, 1, 2)


def test_export_is_a_sana_sprint_pipeline(exported):
  """export.json and model_index.json name SanaSprintPipeline with SCMScheduler and the DC-AE,
  the CFG scale as its guidance_scale, and our grid in the scheduler's angles."""
  _, out = exported
  notes = json.load(open(out / "export.json"))
  index = json.load(open(out / "model_index.json"))
  assert index["_class_name"] == "SanaSprintPipeline", index
  assert index["scheduler"] == ["diffusers", "SCMScheduler"], index
  assert index["vae"] == ["diffusers", "AutoencoderDC"], index
  assert notes["scheduler"] == "SCMScheduler" and "sigmas" not in notes, notes
  assert notes["guidance"]["pipeline"] == "SanaSprintPipeline"
  assert notes["guidance"]["guidance_scale"] == notes["guidance"]["w"] == 4.5
  assert sorted(notes["pipeline_kwargs"]) == ["1", "2", "4"]   # eval.steps
  # The recipe's TrigFlow is SANA-Sprint's (sigma_d 1 on unit latents = theirs on latents x
  # 0.5): its 2-step grid through 1.3 is SanaSprintPipeline's default one, in the same angles.
  np.testing.assert_allclose(notes["timesteps"]["2"], [np.pi / 2, 1.3, 0.0], atol=1e-6)
  assert notes["pipeline_kwargs"]["2"]["intermediate_timesteps"] == pytest.approx(1.3)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sana_sprint_pipeline_reproduces_our_sampler(exported, steps):
  """SanaSprintPipeline.from_pretrained(export, text_encoder=None, tokenizer=None) with
  export.json's pipeline_kwargs and guidance_scale, the same unit noise as latents and the step
  noise from torch's global generator (the scheduler draws it there when no generator is
  passed; its last draw is multiplied by sin 0): its latents equal our sampler's, and its
  decoded images the DC-AE decode of ours. Tolerance atol 1e-5 on latents of scale ~3 and on
  images in [0, 1]: float32, up to 4 transformer calls in another framework's op order
  (observed <= 7.2e-7 and 4.8e-7). The guidance input matters: guidance_scale 1 differs."""
  run, out = exported
  notes = json.load(open(out / "export.json"))
  pipe = diffusers.SanaSprintPipeline.from_pretrained(str(out), text_encoder=None,
                                                      tokenizer=None)
  pipe.set_progress_bar_config(disable=True)
  kwargs = dict(notes["pipeline_kwargs"][str(steps)])
  if "timesteps" in kwargs:   # diffusers' pipeline leaves num_inference_steps out (export.json)
    pipe.scheduler.set_timesteps = functools.partial(pipe.scheduler.set_timesteps, steps)
  rng = np.random.default_rng(0)
  text = rng.standard_normal((2, TOKENS, 24)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
  w = notes["guidance"]["guidance_scale"]

  def run_pipe(output_type, guidance_scale=w):
    torch.manual_seed(123)
    # height / width only pass the pipeline's multiple-of-32 check: the latents are given.
    return pipe(prompt_embeds=torch.from_numpy(text), prompt_attention_mask=torch.from_numpy(mask),
                latents=noise.clone(), guidance_scale=guidance_scale, height=32, width=32,
                use_resolution_binning=False, output_type=output_type, **kwargs).images

  got = run_pipe("latent").numpy()
  torch.manual_seed(123)
  step_noise = [torch.randn((2, 4, 8, 8)).numpy() for _ in range(steps)]
  ours = _ours(run, steps, noise.numpy(), step_noise, text, mask, notes["guidance"]["w"])
  assert np.std(ours) > 0.1
  np.testing.assert_allclose(got, ours, atol=1e-5, rtol=0)
  assert np.max(np.abs(run_pipe("latent", guidance_scale=1.0).numpy() - ours)) > 1e-3
  images = run_pipe("np")
  with torch.no_grad():
    z = torch.from_numpy(ours.copy()) / pipe.vae.config.scaling_factor
    want = (pipe.vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(images, want, atol=1e-5, rtol=0)
