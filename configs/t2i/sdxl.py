"""Stable Diffusion XL (1024 px, 128x128x4 latents) distilled into a 1-4 step student.

arg: `dmd2` (4-step, backward simulation) | `dmd2_1step` | `lcm_lora` (default dmd2), the DMD2
ones optionally `,prompts` (DMD2's own data layout, below).

    # 1. Prompts: both CLIP encoders (penultimate hidden states, concatenated: 77 x 2048) and
    #    CLIP-G's pooled projection; the encoded empty prompt is written too but DMD2's SDXL runs
    #    use the all-zero null prompt (data.null_prompt = "zeros", set below for dmd2).
    python -m launch.encode_prompts --kind sdxl --pipeline $SDXL --captions captions.jsonl \
        --out $PROMPTS
    # 2. Latents: 1024 px center crops with their original size and crop corner (SDXL's size /
    #    crop micro-conditioning, `time_ids`), SDXL VAE.
    python -m launch.precompute --input jsonl:captions.jsonl --vae $SDXL/vae --size 1024 \
        --out $LATENTS --batch 16
    # 3. Distil; 2.6B-parameter UNets need FSDP (DMD2 trained on 64 GPUs with FSDP).
    python -m launch.train --config configs/t2i/sdxl.py:dmd2 --workdir runs/sdxl_dmd2 \
        --config.teacher.checkpoint=$SDXL --config.data.path=$LATENTS \
        --config.data.text_embeds=$PROMPTS --config.mesh.fsdp=8
    # 4. Evaluate: COCO-2014 10k prompts (DMD2's protocol), 512 px FID, CLIP score.
    python -m launch.evaluate --workdir runs/sdxl_dmd2 --config.eval.num_samples=10000 \
        --config.eval.vae=$SDXL/vae --config.eval.inception_weights=$PT_INCEPTION \
        --config.eval.clip=$CLIP_VIT_B32

DMD2's own data layout (`dmd2,prompts`, `dmd2_1step,prompts`): the generator and the critic draw
prompts from a caption set of any size ($CAPTION_SET: launch.encode_prompts of e.g. LAION
captions, no images), and only the GAN reads real images, with their own captions, from the
latents as data stream "real" (`objective.real_stream`; DMD2 used ~500k LAION-aesthetic
images for it):

    python -m launch.train --config configs/t2i/sdxl.py:dmd2,prompts --workdir runs/sdxl_dmd2_cs \
        --config.teacher.checkpoint=$SDXL --config.data.text_embeds=$CAPTION_SET \
        --config.data_streams.real.path=$LATENTS --config.data_streams.real.text_embeds=$PROMPTS \
        --config.mesh.fsdp=8

Teacher runtime: bf16 matmuls, full remat of every resnet / transformer block and each
Transformer2D's 10-deep stack scanned (`teacher.runtime`; the converted weights are re-laid out),
which the generator and fake score inherit. The TPU compile of this network's DMD2 steps is the
open item of docs/performance.md (configs/bench/sdxl.py).

Recipes (global batches):
- dmd2: DMD2's SDXL 4-step run: generator steps at t = 999, 749, 499, 249 with backward
  simulation, real score CFG 8 against the all-zero null prompt, TTUR 5, GAN on the fake UNet's
  mid block (weights 5e-3 generator / 1e-2 discriminator), AdamW (wd 0.01) lr 5e-7, 500 warm-up
  steps, grad clip 10, batch 128 (2 x 64). Published: COCO-10k FID 19.32.
- dmd2_1step: as dmd2 with a single generator step. DMD2's 1-step SDXL also feeds the noise at
  t = 399 after an LPIPS regression warm-up (19.01); the regression stage and the t = 399
  conditioning are not part of this recipe.
- lcm_lora: LCM-LoRA for SDXL: rank 64 on diffusers' modules, w ~ U[4, 16] (LCM's [3, 15]),
  Huber c = 1e-3, lr 1e-4, batch 96, 4000 steps, the encoded empty prompt as null condition.

Expected results: none measured here (no SDXL weights or accelerator on the CI machine); the
recipes build and train on a tiny SDXL-layout UNet (tests/test_t2i_recipes.py).
"""
from configs.t2i import common

SCHEDULE = {"dmd2": (20_000, 128, 5e-7, 500, 10.0), "dmd2_1step": (20_000, 128, 5e-7, 500, 10.0),
            "lcm_lora": (4000, 96, 1e-4, 0, 1.0)}
OBJECTIVE = {"dmd2": "dmd2", "dmd2_1step": "dmd2", "lcm_lora": "lcm"}


def _common(c, *, guidance: float, null_prompt: str, steps):
  common.sdxl_unet(c)
  common.caption_latents(c, time_ids=True, null_prompt=null_prompt)
  common.teacher_runtime(c, dtype="bfloat16", remat="full", scan_blocks=True)
  common.t2i_eval(c, guidance=guidance, steps=steps)
  return c


def _dmd2(c, num_steps: int):
  _common(c, guidance=8.0, null_prompt="zeros", steps=(num_steps,))
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.objective.num_steps = num_steps
  c.objective.fake_updates = 5
  c.objective.real_guidance = 8.0
  c.objective.null_label_prob = 0.0
  c.objective.gan_weight = 5e-3
  c.objective.gan_d_weight = 1e-2
  c.objective.gan_feature_block = len(c.model.down_block_types)   # "mid"
  c.objective.gan_feature_dim = 1280
  c.objective.gan_hidden = 1280
  return c


def dmd2(c):
  return _dmd2(c, 4)


def dmd2_1step(c):
  return _dmd2(c, 1)


def lcm_lora(c):
  _common(c, guidance=7.5, null_prompt="file", steps=(1, 2, 4))
  c.objective.num_ddim_steps = 50
  c.objective.guidance_range = (4.0, 16.0)
  c.objective.loss = "huber"
  c.objective.huber_c = 1e-3
  c.objective.label_dropout = 0.0
  c.objective.lora_rank = 64
  c.objective.lora_alpha = 64.0
  c.objective.lora_pattern = common.UNET_LORA_PATTERN
  c.objective.target = "online"
  return c


RECIPES = {"dmd2": dmd2, "dmd2_1step": dmd2_1step, "lcm_lora": lcm_lora}


def get_config(arg: str = "dmd2"):
  return common.recipe_config("configs/t2i/sdxl.py", RECIPES, arg, "dmd2", objective=OBJECTIVE,
                              schedule=SCHEDULE)
