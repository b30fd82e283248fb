"""DiT-XL/2 on ImageNet 256x256 from precomputed SD-VAE latents: fine-tune the public DiT teacher to
a dense-time flow model, then distil it into a 1-4 step student with sCD, DMD2 or SiD.

arg: `teacher` | `scm` | `dmd2` | `sid` | `sida` | `guided`.

    # 1. Latents (once): center crop 256, SD-VAE (ft-EMA) posterior mean/std + the flipped twin.
    python -m launch.precompute --input folder:$IMAGENET/train --vae $SD_VAE_FT_EMA \
        --out $LATENTS --size 256 --flip --batch 256        # or --input tfds:imagenet2012:train
    # 2. Teacher: the diffusers DiT-XL-2-256 (VP, eps + learned variance), converted once, then
    #    fine-tuned to rectified flow with a dense time input (what sCM's jvp needs).
    python -m launch.convert --diffusers $DIT_XL_2_256 --out teachers/dit_xl2_vp
    python -m launch.train --config configs/imagenet/dit_xl2.py:teacher --workdir runs/in256_fm \
        --config.data.path=$LATENTS --config.teacher.checkpoint=teachers/dit_xl2_vp
    # 3. A student from the fine-tuned teacher.
    python -m launch.train --config configs/imagenet/dit_xl2.py:scm --workdir runs/in256_scd \
        --config.data.path=$LATENTS --config.teacher.checkpoint=runs/in256_fm
    # Guided distillation (Meng et al.) needs no fine-tune: it distils the converted VP teacher.
    python -m launch.train --config configs/imagenet/dit_xl2.py:guided --workdir runs/in256_gd \
        --config.data.path=$LATENTS --config.teacher.checkpoint=teachers/dit_xl2_vp
    # multi-host (TPU pods, SLURM): launch/tpu_pod.sh, launch/slurm_gpu.sh; each process reads
    # only its rows of every global batch (distill/data/latents.py).

Data: `latents` (distill/data/latents.py): every record once per epoch in a seeded order, a fresh
posterior draw per step, the flipped twin half the time; the data position is the step, so a
killed run resumes exactly, on any number of hosts. Model: DiT-XL/2 (28 blocks, 16 x 72, patch
2, 1000 classes + null), bf16 matmuls, float32 parameters; `model.attention` cudnn on GPUs
(`splash` on TPU, `xla` on CPU), the sCD tangent in `model.jvp_attention` (xla, or pallas_jvp
on GPUs, mosaic_jvp on TPUs: the fused tangent kernels, no L x L matrices). The sCD step runs the
student once (`objective.shared_primal`, docs/performance.md).

Settings per objective (batch sizes are global; learning rates for those batches):
- teacher: denoise (flow matching), init from the converted teacher (its learned-variance
  channels are dropped, as the converted checkpoint records), label dropout 0.1, lr 1e-4,
  batch 256, 100k steps, EMA 0.9999.
- scm: sCD, TrigFlow sigma_d 0.5, CFG w = 1.5 distilled into the student (DiT's best-FID scale),
  tangent warm-up and normalisation, adaptive weighting, lr 1e-4 (b1 0.9, b2 0.99), batch 256,
  EMA 0.9999 for evaluation.
- dmd2: 5 critic updates per generator update, GAN head on block 13 (weight 3e-3), lr 2e-6 (the
  DMD2 ImageNet-64 recipe), batch 256, blocks rematerialised (`model.remat=full`: per-device
  batch 32 then peaks at 31 GiB on an H100, 88 GiB without; docs/performance.md).
- sid: alpha 1.2, one critic update per generator update, lr 1e-5, batch 256.
- sida: sid with SiDA's adversarial term (Zhou et al. ICLR'25): the fake network's block-13
  features (channel mean per token) as the discriminator on real latents, D weight 1, the
  generator's 0.5 / 0.5 mix with GAN weight 0.01 after 200k images (782 steps), no generator
  update in the first 100k (391 steps), the fake network's gradients clipped by value at 1,
  alpha 1. SiD2A is this recipe started from a trained SiD run's student (its EMA weights):
  add `--config.init.student=runs/in256_sid` (`init.<network>`, distill/config.py).
- guided: Meng et al. on the VP teacher as converted (eps, DDIM): stage 1 distils CFG over
  w ~ U[1, 5] (Meng's w in [0, 4]) into a zero-initialised guidance embedding of the student
  (20k steps, v-loss weighting), then three progressive stages 16 -> 8 -> 4 -> 2 DDIM steps
  with w kept (20k steps each, lr 5e-5 annealed linearly to 0 within every stage, optimizer
  restarted), batch 256; evaluated at w = 1.5, the student taking w as its input (which
  diffusers' DiTTransformer2DModel has no place for: launch.convert refuses to export it).

Every recipe is evaluated class-conditionally (labels drawn uniformly, as ImageNet FID is):
FID in Inception features of the decoded samples, so `launch.evaluate` needs the VAE and the
Inception weights; the scm recipe's teacher rows use CFG at its distilled w = 1.5.

Expected results: none measured here (no ImageNet and no accelerator on the CI machine). The
full-size sCD and DMD2 steps compile for TPU v5p 4x4x4 and v6e 8x8 and fit
(tests/test_aot.py); published anchors for comparison: sCM 2-step FID 1.88 on ImageNet-512
(1.5B EDM2 teacher), DMD2 1-step FID 1.28 on ImageNet-64. Evaluate with
`python -m launch.evaluate --workdir W --config.eval.vae=$SD_VAE_FT_EMA
--config.eval.inception_weights=$PT_INCEPTION` (FID-50k: `--num 50000`).
"""
import ml_collections

from configs.bench.dit_xl2 import dit_xl2, objective_settings
from configs.common import distill_config

OBJECTIVES = {"teacher": "denoise", "scm": "scm", "dmd2": "dmd2", "sid": "sid", "sida": "sid",
              "guided": "guided"}
# objective -> (steps, global batch, lr, b2)
SCHEDULE = {"teacher": (100_000, 256, 1e-4, 0.999), "scm": (100_000, 256, 1e-4, 0.99),
            "dmd2": (200_000, 256, 2e-6, 0.999), "sid": (100_000, 256, 1e-5, 0.999),
            "sida": (100_000, 256, 1e-5, 0.999),
            "guided": (80_000, 256, 5e-5, 0.999)}


def get_config(arg: str = "scm"):
  recipe = arg or "scm"
  if recipe not in OBJECTIVES:
    raise ValueError(f"configs/imagenet/dit_xl2.py: expected one of {tuple(OBJECTIVES)}, "
                     f"got {arg!r}")
  steps, batch, lr, b2 = SCHEDULE[recipe]
  name = OBJECTIVES[recipe]
  c = distill_config(name, teacher="", steps=steps, batch_size=batch, lr=lr, grad_clip=1.0,
                     log_every=100, checkpoint_every=5000)
  c.optim.b2 = b2
  dit_xl2(c, latent=32)
  objective_settings(c, name)
  c.data.name = "latents"
  c.data.path = ""            # --config.data.path=$LATENTS (launch.precompute output)
  c.data.flip = True
  c.eval.at_end = False       # FID runs through launch.evaluate on the run directory
  c.eval.class_conditional = True   # ImageNet FID: labels drawn uniformly, not the null class
  c.eval.metrics = ("fid",)   # with --config.eval.vae=$SD_VAE --config.eval.inception_weights=..
  c.sample.num = 0            # grids: --config.sample.num=16 --config.eval.vae=$SD_VAE
  if recipe == "teacher":
    c.objective.init = "teacher"
    c.objective.reparameterize = True   # VP eps weights -> rectified flow, dense time
    c.objective.label_dropout = 0.1
    c.teacher.params = "raw"
  elif recipe == "scm":
    c.objective.guidance_scales = (1.5,)
    c.eval.guidance = 1.5     # the teacher rows at the CFG scale the student distils
  elif recipe == "sida":
    c.objective.alpha = 1.0
    c.objective.discriminator = "encoder"
    c.objective.gan_weight = 0.01
    c.objective.gan_d_weight = 1.0
    # The middle block (13 of DiT-XL/2's 28) and the image counts follow --config.model.*
    # and --config.train.batch_size (references).
    c.objective.gan_feature_block = c.model.get_ref("num_layers") // 2 - 1
    c.objective.gan_start_step = 200_000 // c.train.get_ref("batch_size") + 1
    c.objective.generator_start_step = 100_000 // c.train.get_ref("batch_size") + 1
    c.optim.networks.fake_score = ml_collections.ConfigDict({"grad_clip_value": 1.0})
  elif recipe == "guided":
    c.optim.schedule = "linear"
    c.objective.part = "both"
    c.objective.guidance_range = (1.0, 5.0)
    c.objective.guidance_steps = 20_000
    c.objective.student_steps = 16
    c.objective.num_stages = 3
    c.objective.stage_steps = 20_000
    c.objective.label_dropout = 0.1
    c.eval.class_conditional = True
    c.eval.guidance = 1.5
  return c
