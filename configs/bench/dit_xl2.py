"""Benchmark: DiT-XL/2 (675M parameters) train steps on synthetic ImageNet-shaped latents.

    python -m launch.bench --config configs/bench/dit_xl2.py:scm --random_teacher
    python -m launch.bench --config configs/bench/dit_xl2.py:denoise,512 --random_teacher \
        --compare model.attention=xla,cudnn

arg: "<objective>[,<resolution>]". objective: `denoise` (the plain train step a DiT is trained
with), `scm` (sCD: teacher forward, one jax.jvp of the student giving its output and tangent,
and the backward of that output; `--config.objective.shared_primal=False` runs the tangent pass
and a second student forward instead, as SANA-Sprint and rCM do),
`dmd2`, `sid`. resolution: 256 (32x32x4 latents, 256 tokens, per-device batch 128, the batch of
the PyTorch and plain-JAX anchors in ../shared/reference/README.md) or 512 (64x64x4 latents,
1024 tokens, per-device batch 32). DMD2 and SiD run three networks (student, fake score,
teacher) and take a quarter of that batch (32 at 256 px); DMD2 rematerialises its blocks
(`model.remat=full`): without it its generator step asks for 88 GiB at batch 32, with it
both phases peak at 31 GiB on an H100 (docs/performance.md).

The network is DiT-XL/2 (28 blocks, 16 heads of 72, patch 2, 1000 classes + null) as a
rectified-flow model with a dense time input (process.timestep_scale = 1, as sCM needs), no
learned variance; parameters are float32 and the matmuls run in bfloat16 (model.dtype), with
EMA. `--random_teacher` gives the distillation objectives a random teacher of the same
architecture (speed does not depend on the weights). Blocks are unrolled: on an H200 the plain
step runs at 560 img/s unrolled against 435 scanned, in 57 instead of 94 GiB, but compiles in
71 s instead of 12 (docs/performance.md); `--config.model.scan_blocks=True` scans them, and
`--config.model.scan_blocks=True --config.model.scan_unroll=28` unrolls the stacked layout (on
CPU as fast as unrolled blocks at a quarter of their compile time; `RUNS=plain256_stacked` in
launch/gpu_bench.sh measures it on a GPU).

Attention: `model.attention` runs the gradient passes (xla | cudnn | pallas), and
`model.jvp_attention` the sCM tangent pass (xla | pallas_jvp: cuDNN has no JVP rule). The
defaults (cudnn, xla) are the fastest measured on an H200 (docs/performance.md); the fused
`pallas_jvp` tangent keeps no L x L matrices, for long sequences. On CPU the GPU kernels do
not run: pass `--config.model.attention=xla --config.model.jvp_attention=xla` (launch/gpu_bench.sh
shows the GPU runs; the CPU bench test shrinks the network).

Expected result: one JSON row per phase with step_ms, img_per_s, mfu (3 x forward FLOPs of the
trained networks per image against the device's dense bf16 peak) and peak memory; numbers
measured on GPUs are in docs/performance.md.
"""
from configs.common import distill_config

RESOLUTIONS = {256: (32, 128), 512: (64, 32)}   # resolution -> (latent size, per-device batch)
OBJECTIVES = ("denoise", "scm", "dmd2", "sid")
MATCHING = ("dmd2", "sid")   # three networks: a quarter of the per-device batch


def parse_arg(arg: str) -> tuple[str, int]:
  name, _, res = (arg or "denoise").partition(",")
  res = int(res or 256)
  if name not in OBJECTIVES or res not in RESOLUTIONS:
    raise ValueError(f"configs/bench/dit_xl2.py: expected '<objective>[,<resolution>]' with "
                     f"objective in {OBJECTIVES} and resolution in {tuple(RESOLUTIONS)}, "
                     f"got {arg!r}")
  return name, res


def dit_xl2(c, latent: int):
  c.model.name = "dit"
  c.model.prediction = "flow"
  c.model.in_channels = 4
  c.model.sample_size = latent
  c.model.patch_size = 2
  c.model.num_attention_heads = 16
  c.model.attention_head_dim = 72
  c.model.num_layers = 28
  c.model.num_embeds_ada_norm = 1000
  c.model.dtype = "bfloat16"
  c.model.scan_blocks = False
  c.model.attention = "cudnn"
  c.model.jvp_attention = "xla"
  c.process.name = "rectified_flow"
  c.process.timestep_scale = 1.0
  return c


def objective_settings(c, name: str):
  """The DiT-XL/2 settings of each objective (shared with configs/imagenet/dit_xl2.py)."""
  if name == "denoise":
    c.objective.ema_decay = 0.9999
  elif name == "scm":
    c.objective.mode = "scd"
    c.objective.init = "teacher"
    c.objective.sigma_data = 0.5
    c.objective.guidance_scales = (1.0,)
    c.objective.ema_decay = 0.9999
  elif name == "dmd2":
    c.model.remat = "full"   # measured: 31 GiB at per-device batch 32, 88 GiB without
    c.objective.fake_updates = 5
    c.objective.gan_weight = 3e-3
    # The head reads the middle block's output (13 of DiT-XL/2's 28 blocks, width 1152); both are
    # references, so a shrunk network's `--config.model.*` moves them too.
    c.objective.gan_feature_block = c.model.get_ref("num_layers") // 2 - 1
    c.objective.gan_feature_dim = (c.model.get_ref("num_attention_heads")
                                   * c.model.get_ref("attention_head_dim"))   # 1152
  elif name == "sid":
    c.objective.alpha = 1.2
    c.objective.fake_updates = 1
  return c


def get_config(arg: str = ""):
  name, res = parse_arg(arg)
  latent, batch = RESOLUTIONS[res]
  if name in MATCHING:
    batch //= 4
  c = distill_config(name, teacher="", steps=1000, batch_size=batch, lr=1e-4, b1=0.9,
                     grad_clip=1.0)
  c.teacher.params = "raw"
  dit_xl2(c, latent)
  c.data.name = "synthetic"
  c.data.height = c.data.width = latent
  c.data.channels = 4
  c.data.num_classes = 1000
  objective_settings(c, name)
  return c
