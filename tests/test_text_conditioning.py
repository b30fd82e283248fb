"""Text-to-image networks in the engine: the SD UNet (with SDXL's added conditioning) and SANA
train from batches carrying prompt embeddings, and the embeddings really reach the network.

The synthetic source gives `text_embeds` (encoder_hidden_states), and with `pooled_dim` SDXL's
`pooled_text_embeds` + `time_ids` (gathered into the UNet's `added_cond`); the engine initialises
each network from one example of every conditioning input the data carries.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import config as config_lib
from distill.context import cond_from_batch
from distill.engine import Engine
from tests._matching_utils import tiny_config
import distill.objectives  # noqa: F401
import models.all  # noqa: F401

# One resolution level (the fewest layers: XLA's CPU compile time grows with the layer count).
UNET = dict(name="unet", prediction="eps", block_out_channels=(16,), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=24, num_attention_heads=2,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
SDXL = dict(UNET, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)
SANA = dict(name="sana", prediction="flow", num_attention_heads=2, attention_head_dim=16,
            num_layers=2, cross_attention_dim=32, caption_channels=24, patch_size=1,
            mlp_ratio=2.0, out_channels=4)


def _config(objective: str, model: dict, process: str, *, pooled: int = 0, **objective_keys):
  c = tiny_config(objective, batch=4, **objective_keys)
  c.data = config_lib.ConfigDict(dict(name="synthetic", height=8, width=8, channels=4,
                                      num_classes=0, text_tokens=5, text_dim=24,
                                      pooled_dim=pooled))
  with c.model.ignore_type():
    for k, v in model.items():
      c.model[k] = v
  c.process.name = process
  c.train.steps = 3
  return c


@pytest.mark.parametrize("model,process,pooled", [
    (SDXL, "vp_discrete", 12), (SANA, "rectified_flow", 0)], ids=["sdxl_unet", "sana"])
def test_text_conditioned_denoiser_trains_and_sees_the_prompt(model, process, pooled):
  engine = Engine(_config("denoise", model, process, pooled=pooled))
  state, frozen = engine.init_state()
  batch = engine.global_batch(0)
  assert batch["text_embeds"].shape == (4, 5, 24)
  cond = cond_from_batch(batch)
  if pooled:
    assert set(cond["added_cond"]) == {"text_embeds", "time_ids"}
  before = jax.device_get(state.params["model"])
  losses = []
  for step in range(3):
    state, frozen, m = engine.train_step(state, frozen, step)
    losses.append(float(m["denoise/loss"]))
  assert np.all(np.isfinite(losses))
  changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), before,
                                   jax.device_get(state.params["model"]))
  assert any(jax.tree_util.tree_leaves(changed))
  # The prompt reaches the output: other text embeddings, another prediction.
  info = engine.nets["model"]
  params = state.params["model"]
  x, t = batch["x"], jnp.full((4,), 0.5)
  ts = info.process.timestep(t)
  variables = {"params": params}
  apply = jax.jit(lambda c: info.module.apply(variables, x, ts, **c))
  a = apply(cond)
  b = apply(dict(cond, encoder_hidden_states=cond["encoder_hidden_states"] + 1.0))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def sana_teacher():
  """An in-memory text-conditioned SANA teacher (rectified flow) at its random init."""
  from distill import teacher as teacher_lib
  probe = Engine(_config("denoise", SANA, "rectified_flow"))
  state, _ = probe.init_state()
  info = probe.nets["model"]
  return teacher_lib.Teacher(
      module=info.module, params=jax.device_get(state.params["model"]),
      model_config=dict(probe.plans["model"].model_config), process=info.process,
      prediction="flow", num_classes=0,
      reference={"path": "memory", "step": 0, "hash": "", "params": "raw"})


def test_dmd2_distils_a_text_conditioned_sana():
  """DMD2's fake-score and generator phases with a SANA teacher, every network reading the
  prompt embeddings of the batch (SANA: the fastest text model to compile on CPU)."""
  engine = Engine(_config("dmd2", SANA, "rectified_flow", fake_updates=1),
                  teacher=sana_teacher())
  state, frozen = engine.init_state()
  phases = set()
  for step in range(2):
    state, frozen, m = engine.train_step(state, frozen, step)
    m = jax.device_get(m)
    phases |= {k.split("/")[0] for k in m if k.endswith("/loss")}
    assert all(np.isfinite(float(v)) for v in m.values())
  assert len(phases) == 2, phases


class _TextToy(nn.Module):
  """x * (1 + mean prompt (unmasked tokens)) + mean pooled: a denoiser that sees the prompt."""

  @nn.compact
  def __call__(self, x, timestep, encoder_hidden_states=None, added_cond=None,
               encoder_attention_mask=None):
    w = self.param("w", nn.initializers.ones, ())
    if encoder_attention_mask is not None:  # the mean over the prompt's unmasked tokens
      m = encoder_attention_mask[..., None]
      prompt = ((encoder_hidden_states * m).sum(axis=(1, 2))
                / (m.sum(axis=(1, 2)) * encoder_hidden_states.shape[-1]))
    else:
      prompt = encoder_hidden_states.mean(axis=(1, 2))
    out = x * (1.0 + w * prompt[:, None])
    if added_cond is not None:
      out = out + added_cond["text_embeds"].mean(axis=1)[:, None] + 0 * timestep[:, None]
    return out


def test_classifier_free_guidance_with_prompts_uses_the_zero_null_prompt():
  """The null condition of a prompt is all-zero prompt and pooled embeddings (DMD2-SDXL's),
  the size ids stay; CFG u + w (c - u) with it, and per-sample dropping with a mask."""
  from distill import context as ctx_lib
  from distill import processes as procs
  from distill.objectives import matching
  module = _TextToy()
  info = ctx_lib.NetInfo(name="n", module=module, prediction="x0",
                         process=procs.make_process("rectified_flow"))
  ctx = ctx_lib.Context(params={"n": {"w": jnp.float32(2.0)}}, ema={}, model_state={},
                        nets={"n": info})
  rng = np.random.default_rng(0)
  cond = {"encoder_hidden_states": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
          "added_cond": {"text_embeds": jnp.asarray(rng.standard_normal((3, 6)), jnp.float32),
                         "time_ids": jnp.ones((3, 6))}}
  assert ctx_lib.conditional(info, cond) and not ctx_lib.conditional(info, {})
  null = ctx_lib.null_condition(info, cond)
  assert float(jnp.abs(null["encoder_hidden_states"]).max()) == 0.0
  assert float(jnp.abs(null["added_cond"]["text_embeds"]).max()) == 0.0
  np.testing.assert_array_equal(null["added_cond"]["time_ids"], cond["added_cond"]["time_ids"])
  some = ctx_lib.null_condition(info, cond, where=jnp.array([True, False, True]))
  np.testing.assert_array_equal(some["encoder_hidden_states"][1], cond["encoder_hidden_states"][1])
  assert float(jnp.abs(some["encoder_hidden_states"][np.array([0, 2])]).max()) == 0.0
  x, t = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), jnp.full((3,), 0.5)
  ts = info.process.timestep(t)
  c = module.apply({"params": {"w": 2.0}}, x, ts, **cond)
  u = module.apply({"params": {"w": 2.0}}, x, ts, **null)
  got = matching.guided(ctx, "n", x, t, cond, 3.0, "raw")
  np.testing.assert_allclose(got, u + 3.0 * (c - u), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(matching.guided(ctx, "n", x, t, cond, 0.0, "raw"), u, rtol=1e-6)


def test_sdxl_bench_config_resolves():
  """configs/bench/sdxl.py: per-block UNet fields (tuples) pass config validation and the
  SDXL-size UNet's init inputs come from the synthetic prompt batches."""
  from distill import trainer
  from distill.data import sources
  from distill.engine import init_inputs, module_from_config, resolve_model_config
  for arg in ("denoise", "dmd2"):
    c = trainer.prepare_config(trainer.load_config(f"configs/bench/sdxl.py:{arg}", []))
    assert c.model.transformer_layers_per_block == (1, 2, 10)
  source = sources.make_source(c.data, 0)
  module = module_from_config(resolve_model_config(c.model.to_dict(), source))
  (x, _), kw = init_inputs(module, source)
  assert x.shape == (1, 128, 128, 4) and kw["encoder_hidden_states"].shape == (1, 77, 2048)
  assert set(kw["added_cond"]) == {"text_embeds", "time_ids"}
  assert module.feature_names[c.objective.gan_feature_block] == "mid"


def _null_prompt_setup(*, wrapper=None, prediction="x0"):
  """A _TextToy network whose data has a non-zero null prompt (the encoded empty prompt)."""
  from distill import context as ctx_lib
  from distill import processes as procs
  rng = np.random.default_rng(1)
  null = {"text_embeds": rng.standard_normal((4, 5)).astype(np.float32),
          "text_mask": np.array([1, 1, 0, 0], np.float32),
          "pooled_text_embeds": rng.standard_normal((6,)).astype(np.float32)}
  info = ctx_lib.NetInfo(name="n", module=_TextToy(), prediction=prediction,
                         process=procs.make_process("rectified_flow"), wrapper=wrapper,
                         null_inputs=null)
  batch = {"x": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
           "text_embeds": jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.float32),
           "text_mask": jnp.ones((3, 4), jnp.float32),
           "pooled_text_embeds": jnp.asarray(rng.standard_normal((3, 6)), jnp.float32),
           "time_ids": jnp.ones((3, 6), jnp.float32)}
  null_batch = dict(batch, **{k: jnp.broadcast_to(v, batch[k].shape) for k, v in null.items()})
  return info, batch, null_batch


def test_the_data_null_prompt_replaces_prompt_mask_and_pooled_embedding():
  """With the data's null prompt on the network (`NetInfo.null_inputs`, e.g. SD1.5's encoded
  empty prompt) the null condition is that prompt, its mask and pooled embedding, broadcast
  (everywhere or where `where` is True); SDXL's size ids stay."""
  from distill import context as ctx_lib
  info, batch, null_batch = _null_prompt_setup()
  cond = cond_from_batch(batch)
  want = cond_from_batch(null_batch)
  got = ctx_lib.null_condition(info, cond)
  for k in ("encoder_hidden_states", "encoder_attention_mask"):
    np.testing.assert_array_equal(got[k], want[k])
  np.testing.assert_array_equal(got["added_cond"]["text_embeds"], want["added_cond"]["text_embeds"])
  np.testing.assert_array_equal(got["added_cond"]["time_ids"], cond["added_cond"]["time_ids"])
  some = ctx_lib.null_condition(info, cond, where=jnp.array([False, True, False]))
  np.testing.assert_array_equal(some["encoder_hidden_states"][1], want["encoder_hidden_states"][1])
  np.testing.assert_array_equal(some["encoder_attention_mask"][0], cond["encoder_attention_mask"][0])
  bad = ctx_lib.NetInfo(name="n", module=None, null_inputs={"text_embeds": np.zeros((7, 5))})
  with pytest.raises(ValueError, match="null prompt has shape"):
    ctx_lib.null_condition(bad, cond)


def test_scm_and_denoise_drop_prompts_to_the_data_null_prompt():
  """sCD's CFG teacher velocity is u + w (c - u) with u from the data's null prompt; dropping
  every sample's condition (sCM's `drop`, denoise's label_dropout = 1) gives the loss of the
  same batch whose prompts are the null prompt."""
  from distill import context as ctx_lib
  from distill import wrappers
  from distill.objectives import denoise, scm
  info, batch, null_batch = _null_prompt_setup(prediction="flow")
  wrap = wrappers.WRAPPERS.get(wrappers.wrapper_spec("flow_to_trigflow", sigma_data=1.0))
  student = _null_prompt_setup(wrapper=wrap, prediction="flow")[0]
  nets = {"teacher": info, "student": dataclasses.replace(student, name="student")}
  params = {"w": jnp.float32(0.7)}
  ctx = ctx_lib.Context(params={"teacher": params}, ema={}, model_state={}, nets=nets)
  x_t, t, w = batch["x"], jnp.array([0.3, 0.8, 1.2]), jnp.array([1.0, 2.5, 4.0])
  cond, null = cond_from_batch(batch), cond_from_batch(null_batch)
  got = scm.teacher_velocity(ctx, "teacher", x_t, t, cond, w, 1.0, guided=True)
  c = scm.teacher_velocity(ctx, "teacher", x_t, t, cond, w, 1.0, guided=False)
  u = scm.teacher_velocity(ctx, "teacher", x_t, t, null, w, 1.0, guided=False)
  np.testing.assert_allclose(got, u + w[:, None] * (c - u), rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(c - u).max()) > 1e-2  # the prompt matters

  draws = scm.draw_inputs(jax.random.PRNGKey(0), batch["x"], sigma_data=1.0, p_mean=-1.0,
                          p_std=1.0, guidance_scales=(3.0,), label_dropout=0.0)
  kw = dict(student="student", teacher="teacher", weight=None, mode="scd", tangent_norm=0.1,
            guided=True, guidance_embed=False)
  trainable = {"student": {"w": jnp.float32(1.3)}}
  dropped = scm.scm_loss_given(trainable, ctx, batch, dict(draws, drop=jnp.ones(3, bool)), 1.0,
                               **kw)[1]["g_norm"]
  nulled = scm.scm_loss_given(trainable, ctx, null_batch, draws, 1.0, **kw)[1]["g_norm"]
  kept = scm.scm_loss_given(trainable, ctx, batch, draws, 1.0, **kw)[1]["g_norm"]
  np.testing.assert_allclose(dropped, nulled, rtol=1e-6)
  assert abs(float(dropped) - float(kept)) > 1e-3

  dctx = ctx_lib.Context(params={}, ema={}, model_state={}, nets={"model": info})
  loss = lambda b, p: denoise.denoise_loss({"model": params}, dctx, b, jax.random.PRNGKey(1),
                                           None, net="model", weighting="none",
                                           label_dropout=p)[0]
  np.testing.assert_allclose(loss(batch, 1.0), loss(null_batch, 0.0), rtol=1e-6)
  assert abs(float(loss(batch, 1.0)) - float(loss(batch, 0.0))) > 1e-4
