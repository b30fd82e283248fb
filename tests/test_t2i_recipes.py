"""The text-to-image recipes (configs/t2i: SD1.5, SDXL, SANA-Sprint) are runnable: every recipe's
config resolves, its size-dependent keys fit the full-size network it names, and every phase step
of its objective traces end to end (losses, CFG against the null prompt, guidance inputs, LoRA,
GAN / LADD heads, stages) on a narrow network of the same family with the recipe's own settings.

Tracing (jax.eval_shape of the jitted phase steps) instead of compiling keeps this to about a
minute on 2 CPU cores: a UNet train step takes ~60 s to compile on CPU per phase, and the same
families train for real in tests/test_text_conditioning.py.
"""
from __future__ import annotations

import jax
import pytest

from distill import config as config_lib
from distill import trainer
from distill.engine import Engine, module_from_config
from distill.objective import make_time
from launch.bench import random_teacher

# Narrow networks of each family (and the prompt shapes they take).
TINY = {
    "sd15": dict(name="unet", prediction="eps", sample_size=8, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                 norm_num_groups=8, cross_attention_dim=24, num_attention_heads=2),
    "sdxl": dict(name="unet", prediction="eps", sample_size=8, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 transformer_layers_per_block=(1, 2), num_attention_heads=(2, 2),
                 norm_num_groups=8, cross_attention_dim=24, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=12 + 6 * 8),
    "sana_sprint": dict(name="sana", prediction="flow", sample_size=4, in_channels=4,
                        out_channels=4, num_attention_heads=2, attention_head_dim=16,
                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16,
                        cross_attention_dim=32, caption_channels=24, mlp_ratio=2.0,
                        qk_norm="rms_norm_across_heads"),
}
PROMPTS = {"sd15": dict(text_tokens=5, text_dim=24), "sdxl": dict(text_tokens=5, text_dim=24,
                                                                   pooled_dim=12),
           "sana_sprint": dict(text_tokens=5, text_dim=24)}
RECIPES = [("sd15", r) for r in ("dmd2", "sid_lsg", "swiftbrush", "lcm_lora", "lcm", "hyper_sd",
                                 "agd")]
RECIPES += [("sdxl", r) for r in ("dmd2", "dmd2_1step", "lcm_lora")]
RECIPES += [("sana_sprint", r) for r in ("scm_ladd", "scm")]


def _config(family: str, recipe: str):
  return trainer.load_config(f"configs/t2i/{family}.py:{recipe}", [])


def _full_module(c):
  return module_from_config({k: v for k, v in c.model.to_dict().items()})


@pytest.mark.parametrize("family,recipe", RECIPES)
def test_recipe_keys_fit_the_full_size_network(family, recipe):
  """Feature indices and widths name what the full-size network has: DMD2's GAN head reads the
  UNet's mid block (1280 wide); SANA-Sprint's LADD heads read blocks that exist, 2240 wide."""
  c = _config(family, recipe)
  module = _full_module(c)
  o = c.objective
  if o.name == "dmd2":
    assert module.feature_names[o.gan_feature_block] == "mid"
    assert o.gan_feature_dim == module.block_out_channels[-1]
  if o.name == "scm_ladd":
    assert all(0 <= b < module.num_layers for b in o.feature_blocks)
    assert o.feature_dim == module.hidden_size
  if family == "sana_sprint":
    assert module.qk_norm and c.process.timestep_scale == 1.0   # the dense-time teacher
  if o.name in ("lcm", "segmented_cm") and o.get("lora_rank", 0):
    assert c.objective.target == "online"


def _narrow(c, family: str):
  """The recipe on a narrow network of its family: the model section and the keys that name
  widths or block indices follow the narrow network; everything else is the recipe's."""
  c.model = config_lib.ConfigDict(dict(TINY[family], dtype=c.model.dtype))
  module = _full_module(c)
  c.data = config_lib.ConfigDict(dict(name="synthetic", height=c.model.sample_size,
                                      width=c.model.sample_size,
                                      channels=getattr(module, "in_channels", 4), num_classes=0,
                                      **{"pooled_dim": 0, **PROMPTS[family]}))
  o = c.objective
  if o.name == "dmd2":
    o.gan_feature_block = module.feature_names.index("mid")
    o.gan_feature_dim = o.gan_hidden = module.block_out_channels[-1]
  if o.name == "scm_ladd":
    o.feature_blocks = (0, 1)
    o.feature_dim = module.hidden_size
  c.train.batch_size = 2
  return c


# Every distinct code path once (suite time): sdxl dmd2_1step is dmd2 with one generator step
# (sd15's dmd2 traces that path), the LCM-LoRAs are hyper_sd's LoRA over a UNet without
# stages, sana_sprint's scm is scm_ladd without the heads.
TRACED = [fr for fr in RECIPES if fr not in (("sdxl", "dmd2_1step"), ("sd15", "lcm_lora"),
                                               ("sdxl", "lcm_lora"), ("sana_sprint", "scm"))]


def test_prompt_embeddings_must_fit_the_network():
  """Embeddings of another width, or none (class-labelled latents), are one line before work."""
  c = trainer.prepare_config(_narrow(_config("sd15", "dmd2"), "sd15"), num_devices=1)
  engine = Engine(c, teacher=random_teacher(c, abstract=True))
  trainer._check_text_inputs(engine)   # pylint: disable=protected-access
  width = engine.nets["student"].module.text_width
  wide = {**engine.abstract_batch()}
  wide["text_embeds"] = jax.ShapeDtypeStruct(wide["text_embeds"].shape[:-1] + (width + 8,),
                                             wide["text_embeds"].dtype)
  none = {k: v for k, v in wide.items() if k != "text_embeds"}
  for batch, match in ((wide, f"width {width + 8}, but network '\\w+' reads width {width}"),
                       (none, "reads prompt embeddings of width")):
    engine.abstract_batch = lambda stream="train", b=batch: b
    with pytest.raises(ValueError, match=f"data.text_embeds': .*{match}"):
      trainer._check_text_inputs(engine)   # pylint: disable=protected-access


@pytest.mark.parametrize("family,recipe", TRACED)
def test_recipe_phase_steps_trace(family, recipe):
  c = trainer.prepare_config(_narrow(_config(family, recipe), family), num_devices=1)
  engine = Engine(c, teacher=random_teacher(c, abstract=True))
  o = c.objective
  student = engine.nets[engine.objective.student]
  if o.name in ("lcm", "segmented_cm") and o.get("lora_rank", 0):
    assert student.base is not None
  if o.get("guidance_embed"):   # LCM's time_cond_proj / SANA-Sprint's guidance embedding
    from distill.context import embeds_guidance
    assert embeds_guidance(student.module)
  if family == "sdxl":
    assert engine.nets["teacher"].module.scan_blocks   # teacher.runtime reached the network
  state, frozen = engine.abstract_state()
  last = len(engine.stage_objectives) - 1
  for stage in sorted({0, last}):   # stages differ only in overridden keys (segments)
    for i, phase in enumerate(engine.stage_objectives[stage].phases):
      out_state, metrics = jax.eval_shape(engine.phase_step(stage, i), state, frozen,
                                          engine.abstract_phase_batch(phase),
                                          make_time(phase.start, 0, stage, 0))
      assert jax.tree_util.tree_structure(out_state.params) == jax.tree_util.tree_structure(
          state.params)
      assert metrics, (recipe, phase.name)


@pytest.mark.parametrize("recipe", ["teacher", "scm", "dmd2", "sid", "sida", "guided"])
def test_imagenet_recipes_resolve_and_build_their_objectives(recipe):
  """configs/imagenet/dit_xl2.py: every recipe validates and builds its objective (guided: stage
  1 then three progressive stages 16 -> 8 -> 4 -> 2 steps, 80k steps in all)."""
  from distill.objective import OBJECTIVES
  c = trainer.prepare_config(trainer.load_config(f"configs/imagenet/dit_xl2.py:{recipe}", []))
  objective = OBJECTIVES.get(c.objective.name).build(c.objective)
  assert c.eval.class_conditional and tuple(c.eval.metrics) == ("fid",)   # ImageNet FID
  assert c.eval.guidance == {"scm": 1.5, "guided": 1.5}.get(recipe, 1.0)
  if recipe == "guided":
    assert len(objective.stages) == 4 and sum(s.steps for s in objective.stages) == 80_000
    assert c.eval.class_conditional and c.eval.guidance == 1.5
  if recipe == "sida":   # 100k / 200k images at batch 256; no head: the fake network is D
    from distill import optim
    assert [p.start for p in objective.phases] == [0, 391]
    assert c.objective.gan_start_step == 782
    assert [n.name for n in objective.networks] == ["teacher", "student", "fake_score"]
    assert optim.network_settings(c.optim, "fake_score")["grad_clip_value"] == 1.0
    assert optim.network_settings(c.optim, "student")["grad_clip_value"] == 0.0
    assert c.objective.gan_feature_block == 13
    # The image-count gates and the middle block follow the batch and the network's depth.
    small = trainer.load_config("configs/imagenet/dit_xl2.py:sida",
                                ["train.batch_size=64", "model.num_layers=4"])
    assert (small.objective.gan_start_step, small.objective.generator_start_step,
            small.objective.gan_feature_block) == (3126, 1563, 1)


def test_data_free_recipes_train_from_prompts_alone(tmp_path):
  """`<recipe>,prompts`: SD1.5's SiD-LSG, SwiftBrush, DMD2 (no GAN) and AGD take the caption
  embeddings alone (the `prompts` source, samples of the UNet's latent shape) and their phase
  steps trace; a recipe that reads images (LCM) is refused with one line naming data.name."""
  import numpy as np
  d = tmp_path / "prompts"
  d.mkdir()
  np.save(d / "embeds.npy", np.ones((3, 5, 24), np.float32))
  np.save(d / "null.npy", np.zeros((5, 24), np.float32))
  for recipe in ("sid_lsg", "swiftbrush", "dmd2", "agd"):
    full = _config("sd15", f"{recipe},prompts")
    assert full.data.name == "prompts" and tuple(full.data.shape) == (64, 64, 4)
    c = _narrow(_config("sd15", f"{recipe},prompts"), "sd15")
    c.data = config_lib.ConfigDict(dict(full.data.to_dict(), text_embeds=str(d),
                                        shape=(c.model.sample_size,) * 2 + (4,)))
    c = trainer.prepare_config(c, num_devices=1)
    engine = Engine(c, teacher=random_teacher(c, abstract=True))
    state, frozen = engine.abstract_state()
    batch = engine.abstract_batch()
    assert set(batch) == {"x", "text_embeds"}
    for i, phase in enumerate(engine.objective.phases):
      _, metrics = jax.eval_shape(engine.phase_step(0, i), state, frozen, batch,
                                  make_time(phase.start, 0, 0, 0))
      assert metrics, (recipe, phase.name)
  c = _narrow(_config("sd15", "lcm,prompts"), "sd15")
  c.data = config_lib.ConfigDict(dict(_config("sd15", "lcm,prompts").data.to_dict(),
                                      text_embeds=str(d), shape=(8, 8, 4)))
  with pytest.raises(ValueError, match="'data.name': 'prompts' serves prompts without images"):
    Engine(trainer.prepare_config(c, num_devices=1), teacher=random_teacher(c, abstract=True))
  with pytest.raises(ValueError, match="optionally followed by ',prompts'"):
    _config("sd15", "dmd2,images")


def test_gan_recipe_from_a_caption_set_reads_real_images_from_its_stream(tmp_path):
  """`configs/t2i/sdxl.py:dmd2,prompts` is DMD2's SDXL data layout: the generator and the critic
  draw prompts from a caption set (the `prompts` source), the GAN's real images come with
  their own captions from the latents as stream "real"; every phase traces, the critic's batch
  carrying batch["real"]. A real stream without images is refused in one line."""
  import numpy as np
  full = _config("sdxl", "dmd2,prompts")
  assert full.data.name == "prompts" and full.data.time_ids == 1024
  assert full.data_streams.real.name == "latents" and full.data_streams.real.time_ids
  assert full.objective.real_stream == "real"
  assert "real" not in _config("sd15", "dmd2,prompts").data_streams   # no GAN: data-free
  d = tmp_path / "prompts"
  d.mkdir()
  np.save(d / "embeds.npy", np.ones((3, 5, 24), np.float32))
  np.save(d / "pooled.npy", np.ones((3, 12), np.float32))
  c = _narrow(_config("sdxl", "dmd2,prompts"), "sdxl")
  real = c.data   # the narrow synthetic latents with prompts stand in for the real stream
  c.data = config_lib.ConfigDict(dict(full.data.to_dict(), text_embeds=str(d),
                                      shape=(c.model.sample_size,) * 2 + (4,)))
  c.data_streams = config_lib.ConfigDict({"real": dict(real.to_dict(), batch_size=4)})
  c = trainer.prepare_config(c, num_devices=1)
  engine = Engine(c, teacher=random_teacher(c, abstract=True))
  critic, generator = engine.objective.phases
  assert critic.streams == ("train", "real") and generator.streams == ("train",)
  state, frozen = engine.abstract_state()
  for i, phase in enumerate(engine.objective.phases):
    batch = engine.abstract_phase_batch(phase)
    assert "time_ids" in batch and ("real" in batch) == (phase is critic)
    _, metrics = jax.eval_shape(engine.phase_step(0, i), state, frozen, batch,
                                make_time(phase.start, 0, 0, 0))
    assert ("p_real" in {k.split("/")[-1] for k in metrics}) == (phase is critic)
  assert engine.abstract_phase_batch(critic)["real"]["x"].shape[0] == 4
  trainer._check_text_inputs(engine)   # pylint: disable=protected-access
  # Real images without captions (class latents) cannot be read by the text-conditioned D.
  c.data_streams.real = config_lib.ConfigDict(dict(real.to_dict(), text_tokens=0, text_dim=0,
                                                   pooled_dim=0))
  engine = Engine(trainer.prepare_config(c, num_devices=1),
                  teacher=random_teacher(c, abstract=True))
  with pytest.raises(ValueError, match="config key 'data_streams.real.text_embeds': network "
                                       "'\\w+' reads prompt embeddings of width 24, but data "
                                       "'synthetic' gives none"):
    trainer._check_text_inputs(engine)   # pylint: disable=protected-access
  c.data_streams.real = config_lib.ConfigDict(dict(c.data.to_dict()))
  with pytest.raises(ValueError, match="config key 'data_streams.real.name': 'prompts' serves "
                                       "prompts without images, but objective 'dmd2'"):
    Engine(trainer.prepare_config(c, num_devices=1), teacher=random_teacher(c, abstract=True))


def test_sdxl_inputs_missing_from_the_data_are_named():
  """An SDXL UNet reads the pooled prompt and the size / crop ids: prompts without pooled.npy,
  or latents without time ids, stop in one line naming the data key (not the UNet's
  added_cond)."""
  c = trainer.prepare_config(_narrow(_config("sdxl", "dmd2"), "sdxl"), num_devices=1)
  engine = Engine(c, teacher=random_teacher(c, abstract=True))
  trainer._check_text_inputs(engine)   # pylint: disable=protected-access
  batch = {k: v for k, v in engine.abstract_batch().items()
           if k not in ("pooled_text_embeds", "time_ids")}
  engine.abstract_batch = lambda stream="train": batch
  with pytest.raises(ValueError, match=r"^config key 'data.text_embeds' \(its pooled.npy\): "
                                       r"network '\w+' is an SDXL-style UNet that reads "
                                       r"pooled_text_embeds, which data 'synthetic' does not give"):
    trainer._check_text_inputs(engine)   # pylint: disable=protected-access
