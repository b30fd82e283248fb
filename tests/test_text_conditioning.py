"""Text-to-image networks in the engine: the SD UNet (with SDXL's added conditioning) and SANA
train from batches carrying prompt embeddings, and the embeddings really reach the network.

The synthetic source gives `text_embeds` (encoder_hidden_states), and with `pooled_dim` SDXL's
`pooled_text_embeds` + `time_ids` (gathered into the UNet's `added_cond`); the engine initialises
each network from one example of every conditioning input the data carries.
"""
from __future__ import annotations

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


def test_dmd2_distils_a_text_conditioned_sana():
  """DMD2's fake-score and generator phases with a SANA teacher, every network reading the
  prompt embeddings of the batch (SANA: the fastest text model to compile on CPU)."""
  from distill import teacher as teacher_lib
  probe = Engine(_config("denoise", SANA, "rectified_flow"))
  state, _ = probe.init_state()
  info = probe.nets["model"]
  teacher = teacher_lib.Teacher(
      module=info.module, params=jax.device_get(state.params["model"]),
      model_config=dict(probe.plans["model"].model_config), process=info.process,
      prediction="flow", num_classes=0,
      reference={"path": "memory", "step": 0, "hash": "", "params": "raw"})
  engine = Engine(_config("dmd2", SANA, "rectified_flow", fake_updates=1), teacher=teacher)
  state, frozen = engine.init_state()
  phases = set()
  for step in range(2):
    state, frozen, m = engine.train_step(state, frozen, step)
    m = jax.device_get(m)
    phases |= {k.split("/")[0] for k in m if k.endswith("/loss")}
    assert all(np.isfinite(float(v)) for v in m.values())
  assert len(phases) == 2, phases


class _TextToy(nn.Module):
  """x * (1 + mean prompt) + mean pooled: a denoiser whose output depends on the prompt."""

  @nn.compact
  def __call__(self, x, timestep, encoder_hidden_states=None, added_cond=None):
    w = self.param("w", nn.initializers.ones, ())
    out = x * (1.0 + w * encoder_hidden_states.mean(axis=(1, 2))[:, None])
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
