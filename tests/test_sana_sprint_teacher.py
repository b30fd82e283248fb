"""SANA-Sprint (configs/t2i/sana_sprint.py) from converted diffusers SANA teachers, as its
docstring's commands run it, for both public teacher layouts:

- no guidance embeddings (SANA 1.5; the layout SANA-Sprint's teacher is fine-tuned in): the
  student adds `guidance_embeds`, its timestep MLP moves from `time_embed.emb.timestep_embedder`
  (AdaLayerNormSingle) to `time_embed.timestep_embedder` (diffusers'
  SanaCombinedTimestepGuidanceEmbeddings), and the new guidance MLP's last layer starts at zero,
  so the student starts as the teacher's function at every CFG scale w;
- guidance embeddings (`guidance_embeds=True`): the CFG scale is the teacher's input; the
  student is the teacher's copy, and the teacher is called with the w the recipe's CFG draws.

Each teacher is a tiny diffusers SanaTransformer2DModel written as the audit's
build_sana_teacher.py writes it (weights redrawn so that no layer is trivially zero), converted
with `launch.convert --diffusers ... --process`; training runs 2 steps of `scm_ladd` through
`launch.train` on synthetic prompt-conditioned latents, then `launch.sample` and
`launch.convert --workdir` run on the run.
"""
from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from distill import teacher as teacher_lib
from distill import trainer
from distill.engine import Engine
from distill.objectives import scm
from tests._torch_random import randomize_torch
from tests.test_train_e2e import ROOT, env

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.torch

RECIPE = "configs/t2i/sana_sprint.py:scm_ladd"
PROCESS = "rectified_flow(timestep_scale=1.0, prediction='flow')"
# The audit's build_sana_teacher.py: SANA with QK-norm, patch 1, 8 x 8 x 4 latents, Gemma-24.
SANA = dict(sample_size=8, in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
            cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
            mlp_ratio=2.0, qk_norm="rms_norm_across_heads", patch_size=1)
TOKENS = 5
# The recipe at the tiny teacher's size: synthetic prompt-conditioned latents of its shape, LADD
# heads on its two blocks (width 32), no evaluation.
TINY = ["data.name=synthetic", "data.height=8", "data.width=8", "data.channels=4",
        "data.num_classes=0", f"data.text_tokens={TOKENS}", "data.text_dim=24",
        "train.steps=2", "train.batch_size=2", "objective.feature_blocks=(0,1)",
        "objective.feature_dim=32", "checkpoint.every_steps=0"]
LAYOUTS = {"no_guidance_embeds": False, "guidance_embeds": True}


def write_teacher_dir(root, guidance_embeds: bool):
  """A diffusers SANA pipeline directory (transformer + scheduler) as build_sana_teacher.py
  writes it, with `guidance_embeds` set and every weight redrawn (std 0.1)."""
  torch.manual_seed(3)
  model = diffusers.SanaTransformer2DModel(**SANA, guidance_embeds=guidance_embeds).eval()
  randomize_torch(model, 3, 0.1).save_pretrained(root / "transformer", safe_serialization=True)
  diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
  return root


def launch(*args, timeout: int = 600):
  """`python -m launch.<args>` from the repository root; asserts it succeeded."""
  p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=timeout, env=env())
  assert p.returncode == 0, p.stderr[-3000:]
  return p


@pytest.fixture(scope="module", params=list(LAYOUTS))
def converted(request, tmp_path_factory):
  """(layout, converted teacher directory) of each teacher layout, as the docstring's step 3."""
  root = tmp_path_factory.mktemp(request.param)
  pipeline = write_teacher_dir(root / "diffusers", LAYOUTS[request.param])
  launch("launch.convert", "--diffusers", str(pipeline), "--out", str(root / "teacher"),
         "--process", PROCESS)
  return request.param, root / "teacher"


def _engine(teacher_dir):
  """The recipe's engine at the tiny size on float32 (student and teacher compute alike)."""
  c = trainer.load_config(RECIPE, TINY + [f"teacher.checkpoint={teacher_dir}",
                                          "teacher.runtime.dtype=float32",
                                          "model.dtype=float32"])
  c = trainer.prepare_config(c, num_devices=1)
  return Engine(c, teacher=teacher_lib.from_config(c))


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  t = jnp.array([0.3, 0.8], jnp.float32)       # dense flow time (timestep_scale 1)
  text = jnp.asarray(rng.standard_normal((2, TOKENS, 24)), jnp.float32)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  return x, t, text, mask


def test_the_student_starts_as_the_teacher(converted):
  """At step 0 the guidance-embedded student computes the teacher's function at every w of the
  recipe's {4, 4.5, 5} (float32, atol 1e-6): for a teacher without guidance embeddings its
  conditional output (the fresh guidance MLP adds exactly 0), for one with them its output at
  the same w. Both as raw networks and as sCD sees them: the student's TrigFlow F against the
  teacher velocity the loss computes (for the guidance-embedded teacher at w, one pass)."""
  layout, teacher_dir = converted
  engine = _engine(teacher_dir)
  state, frozen = engine.init_state()
  ctx = trainer.context_for(engine, state, frozen)
  student, teacher = engine.nets["student"].module, engine.teacher.module
  assert student.guidance_embeds and teacher.guidance_embeds == LAYOUTS[layout]
  x, t, text, mask = _inputs()
  cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask}
  sd = float(engine.config.objective.sigma_data)
  for w in engine.config.objective.guidance_scales:
    w = jnp.full((2,), w, jnp.float32)
    got = student.apply({"params": state.params["student"]}, x, t, text,
                        encoder_attention_mask=mask, **student.guidance_inputs(w))
    extras = teacher.guidance_inputs(w) if teacher.guidance_embeds else {}
    want = teacher.apply({"params": engine.teacher.params}, x, t, text,
                         encoder_attention_mask=mask, **extras)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    trig = jnp.array([0.4, 1.2], jnp.float32)   # TrigFlow times
    F = ctx.apply("student", x, trig, cond, **ctx.guidance_inputs("student", w))
    velocity = scm.teacher_velocity(ctx, "teacher", x, trig, cond, w, sd,
                                    guided=teacher.guidance_embeds)
    np.testing.assert_allclose(sd * F, velocity, rtol=0, atol=1e-6)
  if not teacher.guidance_embeds:   # the new guidance MLP learns from w (its input layer is
    new = state.params["student"]["time_embed"]["guidance_embedder"]   # not zero)
    assert not np.any(np.asarray(new["linear_2"]["kernel"]))
    assert np.any(np.asarray(new["linear_1"]["kernel"]))


@pytest.mark.slow
def test_the_recipe_trains_samples_and_exports(converted, tmp_path):
  """The docstring's step 4 at the tiny size (2 steps, finite losses), then `launch.sample`
  (prompt embeddings from a file) and `launch.convert --workdir` on the run: the exported
  transformer is SANA-Sprint's layout (guidance embeddings, diffusers loads it)."""
  layout, teacher_dir = converted
  run = tmp_path / "run"
  launch("launch.train", "--config", RECIPE, "--workdir", str(run),
         *[f"--config.{o}" for o in TINY], f"--config.teacher.checkpoint={teacher_dir}")
  rows = [json.loads(line) for line in open(run / "metrics.jsonl") if line.strip()]
  losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
  assert rows[-1]["step"] == 2 and losses and np.all(np.isfinite(losses)), rows
  embeds = tmp_path / "prompts.npy"
  np.save(embeds, np.random.default_rng(1).standard_normal((2, TOKENS, 24)).astype(np.float32))
  for network in ("student", "teacher"):
    out = tmp_path / f"{network}.png"
    launch("launch.sample", "--workdir", str(run), "--network", network, "--prompt_embeds",
           str(embeds), "--num", "2", "--steps", "2", "--out", str(out))
    assert out.exists()
  launch("launch.convert", "--workdir", str(run), "--out", str(tmp_path / "export"))
  exported = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "export" / "transformer")
  assert exported.config.guidance_embeds, layout
