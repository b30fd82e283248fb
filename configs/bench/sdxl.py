"""Benchmark / compile check: the SDXL UNet (2.6B) at 1024 px (128x128x4 latents) on synthetic
prompt embeddings, as DMD2 distils it, or its plain denoising step.

    python -m launch.aot --config configs/bench/sdxl.py:dmd2 --topology v5p:4x4x4 \
        --config.mesh.fsdp=8
    python -m launch.bench --config configs/bench/sdxl.py:denoise --random_teacher

arg: `denoise` (the plain eps-prediction train step) or `dmd2` (generator + fake score + GAN head
on the fake UNet's mid block, teacher with CFG; DMD2's SDXL settings: TTUR 5, real CFG 8, GAN
weights 5e-3 / 1e-2, lr 5e-7 for both networks, grad clip 10, global batch 128 = 2 per GPU x 64
in the paper).

The network is diffusers' SDXL UNet (down: Down, CrossAttnDown x 2; transformer depths 1, 2, 10;
heads 5, 10, 20 of 64; cross attention to 77 x 2048 prompt embeddings; `text_time` added
conditioning: 1280-d pooled embedding + 6 size ids) with bf16 matmuls, float32 parameters, each
Transformer2D's blocks scanned (`model.scan_blocks`: the 10-deep stacks compile once) and full
remat per ResnetBlock / Transformer2D. The noise process is SDXL's (scaled-linear DDPM,
eps prediction). `--random_teacher` (bench) or launch.aot's abstract teacher stand in for the
weights; real runs set `--config.teacher.checkpoint` to a diffusers SDXL `unet/` directory and
`data.name=latents` with caption embeddings (distill/data/latents.py).

Status: measured on 2-core CPU hosts through libtpu (docs/performance.md), v5p 4x4x4 with
fsdp 8 at global batch 64: the denoise step compiles in 776 s and needs 11.6 GiB per chip
(2.567B parameters); the DMD2 steps (three UNets, two phases) compile in 503 s (critic) and
565 s (generator) and need 28.9 and 20.3 GiB per chip, with about 16.5 GB of host memory: too
long for CI, which compiles the DiT-XL/2 recipes instead.
"""
from configs.common import distill_config
from configs.t2i import common

OBJECTIVES = ("denoise", "dmd2")


def sdxl_unet(c, latent: int = 128):
  """The SDXL UNet (configs/t2i/common.py) on synthetic SDXL-shaped prompt batches."""
  common.sdxl_unet(c, latent)
  c.model.scan_blocks = True
  c.model.remat = "full"
  c.data.name = "synthetic"
  c.data.height = c.data.width = latent
  c.data.channels = 4
  c.data.num_classes = 0
  c.data.text_tokens = 77
  c.data.text_dim = 2048
  c.data.pooled_dim = 1280
  return c


def get_config(arg: str = "dmd2"):
  name = arg or "dmd2"
  if name not in OBJECTIVES:
    raise ValueError(f"configs/bench/sdxl.py: expected one of {OBJECTIVES}, got {arg!r}")
  c = distill_config(name, teacher="", steps=1000, batch_size=128, lr=5e-7, grad_clip=10.0,
                     warmup_steps=500)
  c.teacher.params = "raw"
  sdxl_unet(c)
  c.eval.at_end = False
  c.sample.num = 0
  if name == "dmd2":
    c.objective.fake_updates = 5
    c.objective.real_guidance = 8.0
    c.objective.gan_weight = 5e-3
    c.objective.gan_d_weight = 1e-2
    c.objective.gan_feature_block = 3      # the UNet's feature_names[3]: the mid block
    c.objective.gan_feature_dim = 1280
    c.objective.gan_hidden = 1280
  return c
