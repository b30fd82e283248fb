"""Stable Diffusion 1.5 (512 px, 64x64x4 latents) distilled into a 1-4 step student.

arg: `dmd2` | `sid_lsg` | `swiftbrush` | `lcm_lora` | `lcm` | `hyper_sd` | `agd` (default dmd2),
optionally `,prompts` for the data-free ones (below).

    # 1. Prompts (once): CLIP-L embeddings of the captions + the encoded empty prompt (null.npy)
    #    + CLIP token ids (for the CLIP score), straight from the pipeline's text encoder.
    python -m launch.encode_prompts --kind sd15 --pipeline $SD15 --captions captions.jsonl \
        --out $PROMPTS
    # 2. Latents (once; the matching family's GAN, LCM and Hyper-SD train on them; SiD-LSG,
    #    SwiftBrush and DMD2 without GAN read only the prompts: `<recipe>,prompts` trains them
    #    from $PROMPTS alone, without this step): 512 px center crops, SD VAE.
    python -m launch.precompute --input jsonl:captions.jsonl --vae $SD15/vae --size 512 \
        --out $LATENTS --batch 64
    # 3. Distil (the teacher is the pipeline directory itself: unet/ + scheduler/).
    python -m launch.train --config configs/t2i/sd15.py:dmd2 --workdir runs/sd15_dmd2 \
        --config.teacher.checkpoint=$SD15 --config.data.path=$LATENTS \
        --config.data.text_embeds=$PROMPTS
    # 4. Evaluate: zero-shot COCO-2014 30k FID and CLIP score (COCO captions encoded in step 1
    #    as the evaluation's prompts), samples decoded with the SD VAE.
    python -m launch.evaluate --workdir runs/sd15_dmd2 --config.eval.vae=$SD15/vae \
        --config.eval.inception_weights=$PT_INCEPTION --config.eval.clip=$CLIP_VIT_B32 \
        --config.eval.reference_stats=coco2014_30k.npz
    # 5. Export for diffusers (unet/ + the few-step scheduler; LoRA students also as PEFT LoRA).
    python -m launch.convert --workdir runs/sd15_dmd2 --out export/sd15_dmd2 --vae $SD15/vae

Data-free, from the caption embeddings alone (the `prompts` source; evaluation still needs
reference images or statistics: launch.evaluate with --config.data.name=latents ...):

    python -m launch.train --config configs/t2i/sd15.py:sid_lsg,prompts --workdir runs/sid_lsg \
        --config.teacher.checkpoint=$SD15 --config.data.text_embeds=$PROMPTS

The caption JSONL has one {"image": path, "caption_id": int, "caption": str} per line (both tools
read it). Teacher runtime: bf16 matmuls and full remat of every resnet / transformer block
(`teacher.runtime`, also for the networks initialised from it); parameters stay float32. Null
condition: the encoded empty prompt (`null.npy`), as SD1.5 was trained.

Recipes (settings from the official code, ../shared/reference/methods_*.md; global batches):
- dmd2: DMD2's SD1.5 run from scratch: 1-step generator at t = 999, real score CFG 1.75, TTUR 10
  critic updates per generator update, AdamW (wd 0.01) lr 1e-5 for both, 500 warm-up steps,
  grad clip 10, batch 2048 (32 x 64 GPUs), no GAN (DMD2's "+GAN" stage resumes from this one at
  lr 5e-7 with `gan_weight` 1e-3 / `gan_d_weight` 1e-2 on the fake UNet's mid block: set them
  with --config.objective.gan_weight=1e-3). Published: COCO-30k FID 9.28 (8.35 with the GAN
  stage).
- sid_lsg: SiD-LSG: alpha 1, LSG guidance 1.5 on the teacher and the fake score (evaluated and
  trained), Adam b1 0, lr 1e-6 for both networks, batch 512, 10M images (~19.5k steps), time
  window t in [20, 979], data-free (prompts only). Published: FID 8.15, CLIP 0.304.
- swiftbrush: SwiftBrush v1 VSD: student at t = 999, the LoRA teacher (rank 64, alpha 108, on
  to_q / to_v) and the teacher both at CFG 4.5, sigma_t^2 weighting, t in [20, 980], 1:1
  updates, lr 1e-6 (student) / 1e-3 (LoRA), grad clip 1, batch 128 (16 per device on 8).
  Published (SD2.1 base): FID 16.67, CLIP 0.29.
- lcm_lora: LCM-LoRA: rank 64 adapter on diffusers' LCM-LoRA modules, online target, DDIM skip 20
  (50-step grid), CFG w ~ U[6, 16] in our u + w (c - u) convention (LCM's [5, 15]), Huber c =
  1e-3, lr 1e-4, batch 96 (12 x 8), 4000 steps; sampled with the LCM multistep sampler.
- lcm: full LCM: the student embeds w (LCM's 256-d time_cond_proj, exported as diffusers'
  LatentConsistencyModelPipeline input; its projection starts at zero, so the student starts
  as the teacher, where diffusers' script leaves it random), EMA target 0.95, lr 1e-6,
  otherwise as lcm_lora.
- hyper_sd: Hyper-SD's trajectory-segmented consistency distillation (TSCD) on PCM's segment
  loss: LoRA rank 64, 8 -> 4 -> 2 -> 1 segments, each stage's merged model the next stage's
  teacher while the adapter keeps the original UNet as its base (one LoRA at the end), 2000
  steps per stage, a 40-step DDIM grid (equal segments), otherwise as lcm_lora. Hyper-SD's adversarial and human-feedback terms and
  its 1-step score distillation are not part of this recipe (no public training code).
- agd: adapter guidance distillation (Jensen & Sadat): the UNet frozen, LCM's w input
  (`time_cond_proj_dim`, zero-initialised) and an adapter of hidden width 256 on every resnet
  trained to reproduce the CFG teacher's eps on the states of its own 25-step guided DDIM
  trajectories, w ~ U[1, 6] (the official DiT range; our notes have no SD range), 5000 steps,
  batch 64, lr 1e-4 (the official defaults); data-free (`agd,prompts`). The student samples
  like the teacher (25 DDIM steps) with one pass per step instead of CFG's two; the adapters
  do not export to diffusers (no equivalent module).

Expected results: none measured here (no SD weights, COCO or accelerator on the CI machine);
every recipe builds its networks on a tiny SD-layout UNet and trains (tests/test_t2i_recipes.py).
"""
import ml_collections

from configs.t2i import common

# recipe -> (steps, global batch, lr, warm-up, grad clip)
SCHEDULE = {"dmd2": (20_000, 2048, 1e-5, 500, 10.0), "sid_lsg": (19_500, 512, 1e-6, 0, 0.0),
            "swiftbrush": (30_000, 128, 1e-6, 0, 1.0), "lcm_lora": (4000, 96, 1e-4, 0, 1.0),
            "lcm": (4000, 96, 1e-6, 0, 1.0), "hyper_sd": (8000, 96, 1e-4, 0, 1.0),
            "agd": (5000, 64, 1e-4, 0, 0.0)}
OBJECTIVE = {"dmd2": "dmd2", "sid_lsg": "sid", "swiftbrush": "vsd", "lcm_lora": "lcm",
             "lcm": "lcm", "hyper_sd": "segmented_cm", "agd": "agd"}


def _common(c, guidance: float, steps=(1,)):
  common.sd15_unet(c)
  common.caption_latents(c)
  common.teacher_runtime(c, dtype="bfloat16", remat="full")
  common.t2i_eval(c, guidance=guidance, steps=steps)
  return c


def dmd2(c):
  _common(c, guidance=1.75)
  c.optim.name = "adamw"
  c.optim.weight_decay = 0.01
  c.objective.fake_updates = 10
  c.objective.real_guidance = 1.75
  c.objective.null_label_prob = 0.0     # every sample keeps its prompt (text-to-image)
  c.objective.num_steps = 1
  c.objective.gan_weight = 0.0
  c.objective.gan_feature_block = len(c.model.down_block_types)   # "mid" (for a GAN stage)
  c.objective.gan_feature_dim = 1280
  c.objective.gan_hidden = 1280
  return c


def sid_lsg(c):
  _common(c, guidance=1.5)
  c.optim.b1 = 0.0
  c.objective.alpha = 1.0
  c.objective.guidance_mode = "lsg"
  c.objective.guidance = 1.5
  c.objective.fake_updates = 1
  c.objective.null_label_prob = 0.0
  c.objective.fake_label_dropout = 0.1   # the fake score's null output for its guidance
  return c


def swiftbrush(c):
  _common(c, guidance=4.5)
  c.objective.guidance = 4.5
  c.objective.fake_updates = 1
  c.objective.null_label_prob = 0.0
  c.objective.fake_lora = True
  c.objective.lora_rank = 64
  c.objective.lora_alpha = 108.0
  c.objective.lora_pattern = r"/(to_q|to_v)/kernel$"
  c.objective.fake_label_dropout = 0.1
  c.objective.weighting = "sigma2"
  c.optim.networks.fake_score = ml_collections.ConfigDict({"lr": 1e-3})
  return c


def _lcm(c, **objective):
  _common(c, guidance=7.5, steps=(1, 2, 4))
  c.objective.num_ddim_steps = 50
  c.objective.guidance_range = (6.0, 16.0)
  c.objective.loss = "huber"
  c.objective.huber_c = 1e-3
  c.objective.label_dropout = 0.0
  for k, v in objective.items():
    c.objective[k] = v
  return c


def lcm_lora(c):
  return _lcm(c, lora_rank=64, lora_alpha=64.0, lora_pattern=common.UNET_LORA_PATTERN,
              target="online")


def lcm(c):
  return _lcm(c, guidance_embed=True, target="ema", target_decay=0.95)


def hyper_sd(c):
  # 40 DDIM steps (skip 25) split into 8, 4, 2 and 1 equal segments (PCM's 50-step grid has
  # uneven edges for 8 phases).
  _lcm(c, lora_rank=64, lora_alpha=64.0, lora_pattern=common.UNET_LORA_PATTERN,
       target="online", segment_stages=(8, 4, 2, 1), stage_steps=2000, num_ddim_steps=40)
  return c


def agd(c):
  _common(c, guidance=7.5, steps=(25,))
  c.objective.adapter_hidden = 256
  c.objective.adapter_params = "cond_proj|guidance_adapter"   # LCM's w input + the adapters
  c.objective.guidance_range = (1.0, 6.0)
  c.objective.states = "teacher"
  c.objective.trajectory_steps = 25
  c.eval.sampler = "ddim"                # the student replaces the CFG teacher at its NFE / 2
  return c


RECIPES = {"dmd2": dmd2, "sid_lsg": sid_lsg, "swiftbrush": swiftbrush, "lcm_lora": lcm_lora,
           "lcm": lcm, "hyper_sd": hyper_sd, "agd": agd}


def get_config(arg: str = "dmd2"):
  return common.recipe_config("configs/t2i/sd15.py", RECIPES, arg, "dmd2", objective=OBJECTIVE,
                              schedule=SCHEDULE)
