"""SANA-Sprint: SANA 1.6B (1024 px, DC-AE f32c32 latents 32x32x32) distilled into a 1-4 step
TrigFlow student by sCD + LADD (the hybrid of Chen et al. 2025).

arg: `scm_ladd` (default) | `scm` (sCD alone).

    # 1. Prompts: Gemma-2 embeddings (300 tokens + mask) and the encoded empty prompt.
    python -m launch.encode_prompts --kind sana --pipeline $SANA --captions captions.jsonl \
        --out $PROMPTS --clip_tokenizer $CLIP_VIT_B32
    # 2. Latents: 1024 px center crops through the DC-AE encoder.
    python -m launch.precompute --input jsonl:captions.jsonl --vae $SANA/vae --size 1024 \
        --out $LATENTS --batch 16
    # 3. The teacher: SANA-Sprint's teacher checkpoint (SANA 1.6B fine-tuned with QK-norm and a
    #    dense time input: the transformer sees flow time s in [0, 1], not 1000 s), converted
    #    once with that process named.
    python -m launch.convert --diffusers $SANA_SPRINT_TEACHER --out teachers/sana_sprint \
        --process "rectified_flow(timestep_scale=1.0, prediction='flow')"
    # 4. Distil.
    python -m launch.train --config configs/t2i/sana_sprint.py --workdir runs/sana_sprint \
        --config.teacher.checkpoint=teachers/sana_sprint --config.data.path=$LATENTS \
        --config.data.text_embeds=$PROMPTS --config.mesh.fsdp=8
    # 5. Evaluate (1, 2 and 4 TrigFlow steps; FID and CLIP score on the data's prompts).
    python -m launch.evaluate --workdir runs/sana_sprint --config.eval.vae=$SANA/vae \
        --config.eval.inception_weights=$PT_INCEPTION --config.eval.clip=$CLIP_VIT_B32
    # 6. Export: a SanaSprintPipeline directory (transformer, SCMScheduler, the DC-AE).
    python -m launch.convert --workdir runs/sana_sprint --out export/sana_sprint --vae $SANA/vae
    #    pipe = SanaSprintPipeline.from_pretrained("export/sana_sprint", text_encoder=...,
    #                                              tokenizer=...)   # the teacher pipeline's
    #    notes = json.load(open("export/sana_sprint/export.json"))
    #    pipe(prompt, guidance_scale=notes["guidance"]["guidance_scale"],
    #         **notes["pipeline_kwargs"]["2"])   # our 2-step grid, not the pipeline's default

The student is the teacher behind the `flow_to_trigflow` wrapper (SANA-Sprint's training-free
flow -> TrigFlow transform: x_F = y / (sin t + cos t) at s = sin t / (sin t + cos t), velocity
converted back), with SANA-Sprint's guidance embedding added (`guidance_embeds`, fed w * 0.1 as
its pipeline does). Null condition: the encoded empty prompt with its mask (`null.npy`,
`null_mask.npy`). Both public teacher layouts start it:
- a teacher without guidance embeddings (SANA 1.5; SANA-Sprint's teacher): the student's
  timestep MLP takes diffusers' SanaCombinedTimestepGuidanceEmbeddings place
  (`time_embed.timestep_embedder`) and its new guidance MLP's last layer starts at zero, so the
  student starts as the teacher's conditional output at every w; the teacher's velocity is CFG
  at the sampled w;
- a teacher with them (`guidance_embeds=True`): the student is its copy, and the CFG scale is the
  teacher's input: its velocity (and the LADD features) are one pass at the sampled w.

Settings (NVlabs/Sana train_scripts/train_scm_ladd.py and its 1.6B 1024 px config), in this
project's data space. SANA-Sprint's TrigFlow (sigma_d 0.5) runs on the latents scaled by sigma_d
(clean = latent x 0.5, noise 0.5 z); the same process on the unit-variance latents themselves is
TrigFlow with sigma_d 1 (the same angles t and flow times s = sin t / (sin t + cos t); every
state is SANA-Sprint's / 0.5), so its noise-level settings translate as:
- sCM: sigma_d 1 (theirs 0.5 on scaled data), time proposal ln(sigma) ~ N(0.2 + ln 2, 1.6^2)
  (their t = arctan(exp(N(0.2, 1.6^2)) / 0.5)), tangent normalisation c = 0.2 (their
  g / (||g|| + 0.1) with g in units 0.5 x ours), CFG w from {4, 4.5, 5} distilled into the
  guidance input, tangent warm-up 4000 steps, adaptive weighting head (their prior weight
  1 / (0.5 tan t) is ours x 2: a constant the adaptive weight absorbs).
- LADD (scm_ladd): StyleGAN-T heads on the frozen teacher's blocks 2, 8, 14, 19 (width 2240),
  hinge losses with weight 0.5 on the generator, discriminator re-noising ln(sigma) ~
  N(-0.6 + ln 2, 1) (their t_D = arctan(exp(N(-0.6, 1)) / 0.5)), generator inputs at t = pi/2
  half of the time, misaligned real pairs as extra fakes, G and D phases alternating step by
  step.
- Sampling: 2 steps through t = 1.3 (SanaSprintPipeline's default intermediate time).
- Optimiser: AdamW (SANA-Sprint uses CAME, which optax does not ship) lr 2e-6 for student and
  heads, 5000 warm-up steps, grad clip 0.1; batch 128 (16 per device on 8); bf16 matmuls and
  full remat for the teacher (and the student initialised from it).

Published: 1 step FID 7.59, GenEval 0.74 (1024 px). Expected results here: none measured (no
weights or accelerator on the CI machine); the recipe builds and trains on a tiny SANA
(tests/test_t2i_recipes.py), from tiny converted teachers of both layouts, then samples and
exports (tests/test_sana_sprint_teacher.py); the export run by SanaSprintPipeline equals our
sampler at 1, 2 and 4 steps (tests/test_sana_sprint_export.py).
"""
import math

from configs.t2i import common

LN2 = math.log(2.0)   # SANA-Sprint's 1 / sigma_d = 2 as a shift of ln(sigma)

SCHEDULE = {"scm_ladd": (20_000, 128, 2e-6, 5000, 0.1), "scm": (20_000, 128, 2e-6, 5000, 0.1)}
OBJECTIVE = {"scm_ladd": "scm_ladd", "scm": "scm"}


def sana_1600m(c, latent: int = 32):
  """SANA 1.6B as SANA-Sprint's teacher: 20 blocks of 70 x 32 linear-attention heads, QK-norm,
  Gemma-2 captions (2304-d), DC-AE latents, dense flow time."""
  c.model.name = "sana"
  c.model.prediction = "flow"
  c.model.in_channels = 32
  c.model.out_channels = 32
  c.model.sample_size = latent
  c.model.num_attention_heads = 70
  c.model.attention_head_dim = 32
  c.model.num_layers = 20
  c.model.num_cross_attention_heads = 20
  c.model.cross_attention_head_dim = 112
  c.model.cross_attention_dim = 2240
  c.model.caption_channels = 2304
  c.model.mlp_ratio = 2.5
  c.model.qk_norm = "rms_norm_across_heads"
  c.model.dtype = "bfloat16"
  c.process.name = "rectified_flow"
  c.process.timestep_scale = 1.0
  return c


def scm(c):
  sana_1600m(c)
  common.caption_latents(c)
  common.teacher_runtime(c, dtype="bfloat16", remat="full")
  common.t2i_eval(c, guidance=4.5, steps=(1, 2, 4))
  c.optim.name = "adamw"
  c.objective.mode = "scd"
  c.objective.init = "teacher"
  # SANA-Sprint's sigma_d 0.5 on data scaled by 0.5 = sigma_d 1 here (module docstring).
  c.objective.sigma_data = 1.0
  c.objective.p_mean = 0.2 + LN2
  c.objective.p_std = 1.6
  c.objective.guidance_scales = (4.0, 4.5, 5.0)
  c.objective.guidance_sampling = "choice"
  c.objective.guidance_embed = True
  c.objective.tangent_warmup = 4000
  c.objective.tangent_norm = 0.2
  c.eval.sampler = "trigflow(grid_kwargs={'mid_t': 1.3})"
  c.objective.label_dropout = 0.0
  return c


def scm_ladd(c):
  scm(c)
  c.objective.feature_blocks = (2, 8, 14, 19)
  c.objective.feature_dim = 2240
  c.objective.adv_loss = "hinge"
  c.objective.adv_weight = 0.5
  c.objective.d_p_mean = -0.6 + LN2
  c.objective.d_p_std = 1.0
  c.objective.max_time_prob = 0.5
  c.objective.misaligned_pairs = True
  c.objective.alternate = True
  return c


RECIPES = {"scm_ladd": scm_ladd, "scm": scm}


def get_config(arg: str = "scm_ladd"):
  return common.recipe_config("configs/t2i/sana_sprint.py", RECIPES, arg, "scm_ladd",
                              objective=OBJECTIVE, schedule=SCHEDULE)
