"""What the text-to-image recipes (configs/t2i/*) share: the data (precomputed latents with
caption embeddings, launch.precompute + launch.encode_prompts), the teacher's runtime options, the
evaluation (FID + CLIP on the data's prompts through launch.evaluate) and a recipe registry.

A real run takes its architecture and noise process from `teacher.checkpoint` (a diffusers
pipeline directory or a converted teacher); the `model` / `process` sections set here describe
the same networks for what runs without weights (launch.aot's abstract teacher, launch.bench's
random teacher) and must match the published configs.
"""
from __future__ import annotations

from typing import Callable

import ml_collections

from configs.common import distill_config

# SD1.5 / SD2 / SDXL: scaled-linear DDPM, 1000 steps (diffusers' scheduler config of the pipeline).
SD_PROCESS = {"name": "vp_discrete", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012}

# diffusers' LCM-LoRA / DMD2-LoRA target modules in our UNet's parameter names (to_out.0 ->
# to_out_0, ff.net.0.proj -> ff/net_0/proj, ...): every attention projection, the transformer's
# proj_in/out and feed-forward, the resnets' convs and time projections, the resamplers.
UNET_LORA_PATTERN = (r"/(to_q|to_k|to_v|to_out_0|proj_in|proj_out|ff/net_0/proj|ff/net_2|conv1|"
                     r"conv2|conv_shortcut|downsamplers_0/conv|upsamplers_0/conv|time_emb_proj)"
                     r"/kernel$")


def sd15_unet(c, latent: int = 64):
  """diffusers' SD1.5 UNet2DConditionModel (860M): the UNet defaults of models/unet.py."""
  c.model.name = "unet"
  c.model.prediction = "eps"
  c.model.sample_size = latent
  c.model.block_out_channels = (320, 640, 1280, 1280)
  c.model.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
  c.model.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
  c.model.num_attention_heads = 8
  c.model.cross_attention_dim = 768
  c.model.dtype = "bfloat16"
  c.process.update(SD_PROCESS)
  return c


def sdxl_unet(c, latent: int = 128):
  """diffusers' SDXL base UNet (2.6B): down Down, CrossAttnDown x 2 with transformer depths
  1, 2, 10, heads 5, 10, 20 of 64, cross attention to 77 x 2048 prompt embeddings, `text_time`
  added conditioning (1280-d pooled embedding + 6 size ids), bf16 matmuls."""
  c.model.name = "unet"
  c.model.prediction = "eps"
  c.model.sample_size = latent
  c.model.in_channels = 4
  c.model.out_channels = 4
  c.model.block_out_channels = (320, 640, 1280)
  c.model.layers_per_block = 2
  c.model.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
  c.model.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
  c.model.transformer_layers_per_block = (1, 2, 10)
  c.model.num_attention_heads = (5, 10, 20)
  c.model.cross_attention_dim = 2048
  c.model.use_linear_projection = True
  c.model.addition_embed_type = "text_time"
  c.model.addition_time_embed_dim = 256
  c.model.projection_class_embeddings_input_dim = 2816
  c.model.dtype = "bfloat16"
  c.model.attention = "xla"
  c.process.update(SD_PROCESS)
  return c


def caption_latents(c, *, time_ids: bool = False, null_prompt: str = "file"):
  """Training data: `launch.precompute` latents whose records carry caption ids, and the
  caption-embedding directory of `launch.encode_prompts` (embeds, null prompt, CLIP tokens)."""
  c.data.name = "latents"
  c.data.path = ""              # --config.data.path=$LATENTS
  c.data.text_embeds = ""       # --config.data.text_embeds=$PROMPTS
  c.data.null_prompt = null_prompt
  c.data.time_ids = time_ids
  c.data.flip = False           # text-to-image: a caption may say "left" or "right"
  return c


# Objectives whose GAN term reads real images from a stream of its own (`objective.real_stream`).
REAL_STREAM_OBJECTIVES = ("dmd2", "sid")


def prompts_only(c):
  """Recipes trained from a caption set: the caption embeddings alone (the `prompts` source,
  distill/data/prompts.py) instead of latents, with the sample shape of the recipe's UNet
  latent (4 channels) and the same null prompt and SDXL ids (at 8 pixels per latent).
  Data-free recipes (SiD-LSG, SwiftBrush, DMD2 without its GAN) need nothing else; a DMD2 or
  SiD recipe with a GAN term reads its real images, with their own captions, from the latents
  as data stream "real" (DMD2's SDXL run: generator prompts from one set, GAN images from
  another): --config.data_streams.real.path=$LATENTS
  --config.data_streams.real.text_embeds=$CAPTIONS (the latents' caption directory)."""
  side = int(c.model.sample_size)
  if c.objective.name in REAL_STREAM_OBJECTIVES and float(c.objective.get("gan_weight", 0.0)):
    c.data_streams.real = ml_collections.ConfigDict(c.data.to_dict())
    c.objective.real_stream = "real"
  c.data = ml_collections.ConfigDict({
      "name": "prompts", "text_embeds": "",   # --config.data.text_embeds=$PROMPTS
      "shape": (side, side, 4), "null_prompt": c.data.null_prompt,
      "time_ids": 8 * side if c.data.time_ids else 0})
  return c


def teacher_runtime(c, **runtime):
  """How the loaded teacher (and the networks initialised from it) compute (teacher.runtime)."""
  for k, v in runtime.items():
    c.teacher.runtime[k] = v
  return c


def t2i_eval(c, *, guidance: float, steps=(1,), teacher_steps: int = 25):
  """Evaluation through `launch.evaluate` (not during training): FID and CLIP score of samples
  from the data's prompts (`Source.conditions`: the prompts of the reference images, CLIP
  tokens from the caption directory); the teacher's rows use CFG at `guidance`."""
  c.eval.at_end = False
  c.sample.num = 0              # grids: --config.sample.num=16 --config.eval.vae=$VAE (decoded)
  c.eval.metrics = ("fid", "clip")
  c.eval.num_samples = 30_000   # COCO-30k protocol; override for quick looks
  c.eval.guidance = guidance
  c.eval.steps = tuple(steps)
  c.eval.teacher_steps = teacher_steps
  return c


def recipe_config(path: str, recipes: dict[str, Callable], arg: str, default: str, *,
                  objective: dict[str, str], schedule: dict[str, tuple]):
  """The config of recipe `arg` (default `default`): `schedule[arg]` = (steps, global batch,
  lr, warmup, grad clip), `objective[arg]` its objective name, `recipes[arg](c)` the rest.
  `arg` = "<recipe>,prompts": the recipe trained from caption embeddings only (`prompts_only`:
  data-free recipes; DMD2 / SiD with a GAN read its real images from stream "real"; the engine
  refuses other recipes that read images)."""
  name, _, variant = (arg or default).partition(",")
  name = name or default
  if name not in recipes or variant not in ("", "prompts"):
    raise ValueError(f"{path}: expected one of {tuple(recipes)}, optionally followed by "
                     f"',prompts', got {arg!r}")
  steps, batch, lr, warmup, clip = schedule[name]
  c = distill_config(objective[name], teacher="", steps=steps, batch_size=batch, lr=lr,
                     warmup_steps=warmup, grad_clip=clip, log_every=50,
                     checkpoint_every=1000)
  c.teacher.params = "raw"      # a diffusers teacher has only its weights
  c = recipes[name](c)
  return prompts_only(c) if variant == "prompts" else c
