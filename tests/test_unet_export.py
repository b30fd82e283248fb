"""`launch.convert --workdir` of text-to-image (UNet) and DiT runs: the diffusers pipeline layout
(unet/, model_index.json naming the pipeline that runs the student, written only where
from_pretrained loads the directory), LoRA students' PEFT adapters, and the round trip through
`launch.convert --diffusers`.

The runs are real run directories (config.json, a checkpoint) of the recipes' own configs on
tiny networks, written without compiling a train step: the step is replaced by a small random
update of every trained network (what the export reads is the checkpoint, not how it was
trained), so a run takes seconds instead of minutes of XLA compile on a CPU.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import config as config_lib
from distill import trainer
from distill.engine import Engine
from tests.test_dit_convert import random_dit

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# Tiny SD1.5 / SDXL-layout UNets (diffusers kwargs) and the prompts they read.
SD15 = dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
            attention_head_dim=2)
SDXL = dict(SD15, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2), attention_head_dim=(2, 2),
            use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=12 + 6 * 8)
UNETS = {"sd15": (SD15, 0), "sdxl": (SDXL, 12)}   # family -> (UNet, pooled prompt width)
# The audit's tiny DiT (configs/imagenet's recipes at 2 blocks, 10 classes, VP teacher).
DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
           num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
DIT_FLAGS = ["model.num_layers=2", "model.num_attention_heads=2", "model.attention_head_dim=8",
             "model.sample_size=8", "model.num_embeds_ada_norm=10", "model.dtype=float32",
             "model.attention=xla", "model.jvp_attention=xla"]


def _randomised(module, seed: int):
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.normal_(0, 0.05)
  return module.eval()


def unet_teacher(root, family: str):
  """A diffusers pipeline directory: unet/ + the SD scaled-linear DDPM scheduler/."""
  unet = _randomised(diffusers.UNet2DConditionModel(**UNETS[family][0]), seed=0)
  unet.save_pretrained(os.path.join(root, "unet"))
  diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012).save_config(os.path.join(root, "scheduler"))
  return str(root)


def dit_teacher(root):
  """A DiT pipeline directory as diffusers' DiT-XL-2-256: eps + learned variance, DDIM."""
  random_dit(DIT, seed=2).save_pretrained(os.path.join(root, "transformer"))
  diffusers.DDIMScheduler(beta_schedule="linear").save_config(os.path.join(root, "scheduler"))
  return str(root)


def tiny_vae(path):
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, sample_size=16)
  _randomised(vae, seed=4).save_pretrained(path)
  return str(path)


def _random_update(self, state, frozen, step, batches=None):
  """Stands in for Engine.train_step: every trained network moves by N(0, 0.02^2)."""
  del batches
  key = jax.random.PRNGKey(step)
  params = dict(state.params)
  for i, name in enumerate(self.trained):
    leaves, tree = jax.tree_util.tree_flatten(params[name])
    keys = jax.random.split(jax.random.fold_in(key, i), len(leaves))
    params[name] = jax.tree_util.tree_unflatten(
        tree, [a + 0.02 * jax.random.normal(k, a.shape, a.dtype) for a, k in zip(leaves, keys)])
  return state.replace(params=params), frozen, {}


def _random_update_and_ema(self, state, frozen, step, batches=None):
  """_random_update, with every EMA role of a moved network set to its new weights (an EMA
  student's evaluated and exported weights are its EMA)."""
  state, frozen, metrics = _random_update(self, state, frozen, step, batches)
  ema = {n: {role: state.params[n] for role in roles} for n, roles in state.ema.items()}
  return state.replace(ema=ema), frozen, metrics


def make_run(workdir, spec: str, teacher: str, data: dict, overrides=(), update=None):
  """A run directory of config `spec` at step 1 (see the module docstring); `update` replaces
  the train step (default `_random_update`)."""
  c = trainer.load_config(spec, [f"teacher.checkpoint={teacher}", "train.steps=1",
                                 "train.batch_size=2", "eval.at_end=false",
                                 "checkpoint.every_steps=0", "sample.num=0", *overrides])
  c.data = config_lib.ConfigDict(data)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(Engine, "train_step", update or _random_update)
    mp.setattr(trainer, "_trace", lambda *a: None)
    trainer.train(c, str(workdir))
  return str(workdir)


def prompt_data(family: str) -> dict:
  return dict(name="synthetic", height=8, width=8, channels=4, num_classes=0, text_tokens=5,
              text_dim=24, pooled_dim=UNETS[family][1])


def export(workdir, out, *flags):
  """`launch.convert --workdir` in this process: (exit code, stdout + stderr lines)."""
  import contextlib
  import io
  from launch import convert as launch_convert
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
    rc = launch_convert.main(["--workdir", str(workdir), "--out", str(out), *map(str, flags)])
  return rc, [ln for ln in buf.getvalue().splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """family/recipe -> run directory, built once for this module's tests."""
  root = tmp_path_factory.mktemp("unet_runs")
  teachers = {f: unet_teacher(root / f"teacher_{f}", f) for f in UNETS}
  made = {}
  for family, recipe, extra in (("sd15", "lcm_lora", ["objective.lora_rank=4"]),
                                ("sdxl", "lcm_lora", ["objective.lora_rank=4"]),
                                ("sd15", "hyper_sd", ["objective.lora_rank=4",
                                                      "objective.stage_steps=1",
                                                      "objective.segment_stages=(2, 1)"]),
                                ("sd15", "lcm", []), ("sd15", "dmd2", [])):
    made[f"{family}/{recipe}"] = make_run(root / f"{family}_{recipe}",
                                          f"configs/t2i/{family}.py:{recipe}", teachers[family],
                                          prompt_data(family), extra)
  made["vae"] = tiny_vae(root / "vae")
  made["teachers"] = teachers
  return made


def _torch_inputs(family: str, seed: int = 0):
  """(sample, timestep, encoder_hidden_states, added_cond_kwargs) for a torch UNet."""
  g = torch.Generator().manual_seed(seed)
  x = torch.randn(2, 4, 8, 8, generator=g)
  t = torch.tensor([999, 259])
  text = torch.randn(2, 5, 24, generator=g)
  added = None
  if UNETS[family][1]:
    added = {"text_embeds": torch.randn(2, UNETS[family][1], generator=g),
             "time_ids": torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]] * 2)}
  return x, t, text, added


def _torch_unet(path, family: str, seed: int = 0):
  unet = diffusers.UNet2DConditionModel.from_pretrained(path).eval()
  x, t, text, added = _torch_inputs(family, seed)
  with torch.no_grad():
    return unet(x, t, text, added_cond_kwargs=added).sample.numpy()


def _our_student(workdir, family: str, seed: int = 0):
  """The run's merged student on the same inputs, computed by our UNet in float32."""
  from distill.context import merge_params
  engine, state, frozen, _ = trainer.open_run(workdir)
  info = engine.nets["student"]
  params = trainer.eval_params(engine, state, frozen)["student"]
  full = merge_params(info, params, {**frozen, **state.params})
  module = info.module.clone(dtype=jnp.float32, remat="none")
  x, t, text, added = _torch_inputs(family, seed)
  cond = {}
  if added is not None:
    cond["added_cond"] = {k: jnp.asarray(v.numpy()) for k, v in added.items()}
  out = module.apply({"params": full}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                     jnp.asarray(t.numpy(), jnp.float32), jnp.asarray(text.numpy()), **cond)
  return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("key", ["sd15/lcm_lora", "sdxl/lcm_lora", "sd15/hyper_sd"])
def test_lora_student_exports_the_merged_unet_and_its_peft_adapter(runs, key, tmp_path):
  """data #5: an LCM-LoRA or Hyper-SD (staged, one LoRA over the original UNet) UNet student
  exports (it stopped with AttributeError 'peft_lora').
  unet/ computes our merged student (atol 1e-5: float32 UNets, a different op order), and
  lora/ applied by peft to the teacher's UNet computes unet/ (rtol 1e-5, atol 1e-6: the same
  float32 weights up to the merge's rounding); the adapter changes the output. SDXL's student
  is trained with scanned transformer blocks (teacher.runtime): the adapter is unstacked."""
  peft = pytest.importorskip("peft")
  family = key.split("/")[0]
  out = tmp_path / "export"
  rc, lines = export(runs[key], out, "--vae", runs["vae"])
  assert rc == 0, lines
  assert sorted(os.listdir(out)) == ["export.json", "lora", "model_index.json", "scheduler",
                                     "unet", "vae"]
  notes = json.load(open(out / "export.json"))
  sampler = {"lcm_lora": "LCMScheduler", "hyper_sd": "DDIMScheduler"}[key.split("/")[1]]
  assert notes["lora"]["rank"] == 4 and notes["scheduler"] == sampler
  exported = _torch_unet(out / "unet", family)
  np.testing.assert_allclose(exported, _our_student(runs[key], family),
                             atol=1e-5, rtol=0)
  teacher_dir = os.path.join(runs["teachers"][family], "unet")
  base = diffusers.UNet2DConditionModel.from_pretrained(teacher_dir).eval()
  applied = peft.PeftModel.from_pretrained(base, str(out / "lora")).merge_and_unload().eval()
  x, t, text, added = _torch_inputs(family)
  with torch.no_grad():
    got = applied(x, t, text, added_cond_kwargs=added).sample.numpy()
  np.testing.assert_allclose(got, exported, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(exported - _torch_unet(teacher_dir, family))) > 1e-3


_EXPORTS: dict = {}


def exported(runs, key: str, tmp_path_factory, *flags):
  """The export of run `key` with --vae and `flags` (once per module)."""
  if (key, flags) not in _EXPORTS:
    out = tmp_path_factory.mktemp("exports") / key.replace("/", "_")
    rc, lines = export(runs[key], out, "--vae", runs["vae"], *flags)
    assert rc == 0, lines
    _EXPORTS[key, flags] = (out, lines)
  return _EXPORTS[key, flags]


def _flat(tree):
  return {"/".join(map(str, p)): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _read_back(out, workdir, tmp_path):
  """`launch.convert --diffusers OUT` converts the export, and the teacher it reads is the run's
  merged student bit for bit (transposes only), under the run's own process."""
  from distill import teacher as teacher_lib
  from distill.context import merge_params
  from launch import convert as launch_convert
  from models.unet import unstack_transformer_blocks
  assert launch_convert.main(["--diffusers", str(out), "--out", str(tmp_path / "teacher")]) == 0
  back = teacher_lib.load_teacher(str(out), "raw")
  engine, state, frozen, _ = trainer.open_run(workdir)
  info = engine.nets["student"]
  full = merge_params(info, trainer.eval_params(engine, state, frozen)["student"],
                      {**frozen, **state.params})
  full = unstack_transformer_blocks(full) if info.module.scan_blocks else full
  want, got = _flat(jax.device_get(full)), _flat(back.params)
  assert sorted(want) == sorted(got)
  assert all(np.array_equal(want[k], got[k]) for k in want)
  notes = json.load(open(out / "export.json"))
  from distill import processes as procs
  assert procs.process_config(back.process) == notes["process"]
  assert back.prediction == info.own_prediction


# run -> (pipeline class, components from_pretrained must be given)
PIPELINES = {"sd15/lcm_lora": ("StableDiffusionPipeline", ("text_encoder", "tokenizer")),
             "sd15/lcm": ("LatentConsistencyModelPipeline", ("text_encoder", "tokenizer")),
             "sdxl/lcm_lora": ("StableDiffusionXLPipeline", ()),
             # DMD2's consistency sampler: LCMScheduler without boundary scalings
             "sd15/dmd2": ("StableDiffusionPipeline", ("text_encoder", "tokenizer"))}


@pytest.mark.parametrize("key", sorted(PIPELINES))
def test_unet_export_is_the_pipeline_layout_and_reads_back(runs, key, tmp_path_factory,
                                                           tmp_path):
  """data #12: unet/ (it was model/), model_index.json naming the pipeline that runs the
  student (it was `_class_name: null`): DiffusionPipeline.from_pretrained loads it as that
  class, with the text encoders it cannot hold passed in (export.json names them), and it
  samples from prompt embeddings; `launch.convert --diffusers OUT` reads the export back
  exactly (it refused the directory)."""
  out, _ = exported(runs, key, tmp_path_factory)
  pipeline, needed = PIPELINES[key]
  index = json.load(open(out / "model_index.json"))
  assert index["_class_name"] == pipeline and index["unet"] == ["diffusers",
                                                                "UNet2DConditionModel"]
  notes = json.load(open(out / "export.json"))
  assert notes["subfolder"] == "unet" and notes["model_index"].startswith(pipeline)
  assert all(f"{k}=" in notes["model_index"] for k in needed)
  pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), **{k: None for k in needed})
  assert type(pipe).__name__ == pipeline and type(pipe.scheduler).__name__ == "LCMScheduler"
  pipe.set_progress_bar_config(disable=True)
  g = torch.Generator().manual_seed(0)
  kw = dict(prompt_embeds=torch.randn(1, 5, 24, generator=g), num_inference_steps=2,
            output_type="np", generator=g, guidance_scale=1.0)
  if key.startswith("sdxl"):
    kw.update(pooled_prompt_embeds=torch.randn(1, 12, generator=g), height=16, width=16)
  img = pipe(**kw).images
  assert img.shape == (1, 16, 16, 3) and np.all(np.isfinite(img))
  _read_back(out, runs[key], tmp_path)


def test_student_without_a_scheduler_exports_no_model_index(runs, tmp_path_factory, tmp_path):
  """data #12 / imnet #11: a student whose sampler no diffusers scheduler reproduces gets no
  model_index.json (a pipeline without scheduler/ does not load), the printed line and
  export.json say why; unet/ still reads back exactly."""
  out, lines = exported(runs, "sd15/dmd2", tmp_path_factory, "--sampler", "euler")
  assert sorted(os.listdir(out)) == ["export.json", "unet", "vae"]
  notes = json.load(open(out / "export.json"))
  assert "no diffusers scheduler reproduces sampler 'euler'" in notes["scheduler"]
  assert notes["model_index"].startswith("no model_index.json: StableDiffusionPipeline needs "
                                         "scheduler/")
  assert notes["model_index"] in lines
  _read_back(out, runs["sd15/dmd2"], tmp_path)
  # An export written before UNets went to unet/ (model/, export.json's subfolder) reads back.
  import shutil
  old = tmp_path / "old_layout"
  shutil.copytree(out, old)
  os.rename(old / "unet", old / "model")
  (old / "export.json").write_text(json.dumps(dict(notes, subfolder="model")))
  _read_back(old, runs["sd15/dmd2"], tmp_path / "old")


def test_guided_dit_student_is_refused_in_one_line(tmp_path):
  """imnet #10: the guided recipe's student embeds w (guidance_embedder), which diffusers'
  DiTTransformer2DModel has no input for: one line saying so (it was "flax params does not
  match the model: unexpected keys ... guidance_embedder"), exit 2, nothing written."""
  run = make_run(tmp_path / "guided", "configs/imagenet/dit_xl2.py:guided",
                 dit_teacher(tmp_path / "teacher"),
                 dict(name="synthetic", height=8, width=8, channels=4, num_classes=10),
                 DIT_FLAGS + ["objective.guidance_steps=1", "objective.stage_steps=1",
                              "objective.student_steps=16"])
  out = tmp_path / "export" / "guided"
  rc, lines = export(run, out, "--vae", tiny_vae(tmp_path / "vae"))
  assert rc == 2 and len(lines) == 1, lines
  assert "takes the guidance scale w as an input" in lines[0]
  assert "DiTTransformer2DModel has no place for" in lines[0]
  assert not out.exists() and os.listdir(tmp_path / "export") == []


def test_dit_export_writes_model_index_only_where_dit_pipeline_loads_it(tmp_path):
  """imnet #11: with --vae and no scheduler (a sampler none reproduces), no model_index.json
  (DiTPipeline.from_pretrained refused the one written: "expected ['scheduler', ...]"), the
  printed line and export.json say why; with the DMD2 student's own consistency sampler (a VP
  teacher) the LCMScheduler is written and DiTPipeline.from_pretrained loads the directory."""
  run = make_run(tmp_path / "dmd2", "configs/imagenet/dit_xl2.py:dmd2",
                 dit_teacher(tmp_path / "teacher"),
                 dict(name="synthetic", height=8, width=8, channels=4, num_classes=10),
                 DIT_FLAGS + ["objective.gan_feature_block=1"])
  vae = tiny_vae(tmp_path / "vae")
  rc, lines = export(run, tmp_path / "euler", "--vae", vae, "--sampler", "euler")
  assert rc == 0, lines
  assert sorted(os.listdir(tmp_path / "euler")) == ["export.json", "transformer", "vae"]
  note = json.load(open(tmp_path / "euler" / "export.json"))["model_index"]
  assert note.startswith("no model_index.json: DiTPipeline needs scheduler/") and note in lines
  rc, lines = export(run, tmp_path / "own", "--vae", vae)
  assert rc == 0, lines
  pipe = diffusers.DiTPipeline.from_pretrained(str(tmp_path / "own"))
  assert type(pipe.scheduler).__name__ == "LCMScheduler"
  assert json.load(open(tmp_path / "own" / "export.json"))["model_index"] == "DiTPipeline"


def test_run_whose_prompt_directory_moved_exports_with_its_new_place(runs, tmp_path):
  """data #13: a text-to-image run whose data.text_embeds directory moved (exporting on
  another machine) stops in one line naming the key and the flag that fixes it (it said only
  "has no embeds.npy", and convert took no overrides); --config.data.text_embeds=NEW exports."""
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  np.save(prompts / "embeds.npy", np.random.default_rng(0).normal(size=(3, 5, 24)).astype("f4"))
  np.save(prompts / "null.npy", np.zeros((5, 24), np.float32))
  data = trainer.load_config("configs/t2i/sd15.py:dmd2,prompts").data.to_dict()
  run = make_run(tmp_path / "run", "configs/t2i/sd15.py:dmd2,prompts",
                 runs["teachers"]["sd15"], dict(data, text_embeds=str(prompts), shape=(8, 8, 4)))
  moved = tmp_path / "moved"
  os.rename(prompts, moved)
  rc, lines = export(run, tmp_path / "out")
  assert rc == 2 and len(lines) == 1, lines
  assert (f"data.text_embeds: the run's recorded '{prompts}' is gone" in lines[0]
          and "pass --config.data.text_embeds=DIR" in lines[0])
  assert not (tmp_path / "out").exists()
  rc, lines = export(run, tmp_path / "out", f"--config.data.text_embeds={moved}")
  assert rc == 0, lines
  assert (tmp_path / "out" / "unet" / "config.json").is_file()


@pytest.fixture(scope="module")
def lcm_w_run(runs, tmp_path_factory):
  """An sd15:lcm run whose EMA (the evaluated and exported weights) moved too, so the student's
  w projection is not zero (it starts at zero) and w changes its output."""
  root = tmp_path_factory.mktemp("lcm_w")
  return make_run(root / "run", "configs/t2i/sd15.py:lcm", runs["teachers"]["sd15"],
                  prompt_data("sd15"), update=_random_update_and_ema)


def test_lcm_pipeline_from_the_export_reproduces_our_sampler_at_the_documented_guidance(
    runs, lcm_w_run, tmp_path_factory):
  """The w-embedded LCM student (sd15:lcm) exported with --vae loads as diffusers'
  LatentConsistencyModelPipeline; at the guidance scale export.json documents for our w (the
  recipe's eval.guidance), with the same initial noise, prompt embeddings and step noise (the
  scheduler's draws from torch's global stream), it returns our own sampler's latents
  (evaluation.make_sampler with the run's student sampler, as launch.sample) at 1, 2 and 4
  steps. atol 1e-4 on latents of unit scale: up to four float32 UNet calls (parity 1e-5 each)
  and the scheduler's float32 arithmetic. w + 1 changes the output by over 10x that, so the
  w convention is what is checked. (4 steps differed: our sampler walked 999, 749, 499, 249,
  LCMScheduler 999, 759, 499, 259, the grid the student is trained on.)"""
  from distill import evaluation
  run = lcm_w_run
  out = tmp_path_factory.mktemp("lcm_w_export") / "export"
  rc, lines = export(run, out, "--vae", runs["vae"])
  assert rc == 0, lines
  notes = json.load(open(out / "export.json"))
  w = notes["guidance"]["guidance_scale"]
  # float32 (the recipe's teacher.runtime computes in bf16), as the diffusers pipeline.
  engine, state, frozen, _ = trainer.open_run(run, ["teacher.runtime.dtype=float32"])
  assert w == float(engine.config.eval.guidance) == 7.5
  pipe = diffusers.DiffusionPipeline.from_pretrained(str(out), text_encoder=None,
                                                     tokenizer=None)
  assert type(pipe).__name__ == notes["guidance"]["pipeline"] == "LatentConsistencyModelPipeline"
  pipe.set_progress_bar_config(disable=True)
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)["student"]
  g = torch.Generator().manual_seed(1)
  shape = (2, 4, 8, 8)
  noise = torch.randn(shape, generator=g)
  text = torch.randn(2, 5, 24, generator=g)
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))

  def pipeline(steps, scale):
    torch.manual_seed(7)
    return pipe(prompt_embeds=text, latents=noise.clone(), num_inference_steps=steps,
                guidance_scale=scale, output_type="latent").images.numpy()

  for steps in (1, 2, 4):
    theirs = pipeline(steps, w)
    torch.manual_seed(7)
    step_noise = [torch.randn(shape).numpy() for _ in range(steps - 1)] + [np.zeros(shape)]
    fn = evaluation.make_sampler(ctx, "student", solver=trainer.student_sampler(engine),
                                 steps=steps, guidance=w,
                                 step_noise=jnp.stack([nhwc(a) for a in step_noise]))
    ours = np.asarray(fn(params, nhwc(noise.numpy()),
                         {"text_embeds": jnp.asarray(text.numpy())}, None)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=f"{steps} steps")
    assert np.max(np.abs(pipeline(steps, w + 1.0) - theirs)) > 1e-3   # 10 x the tolerance


def test_sample_gives_a_w_embedded_student_the_evaluated_w_by_default(lcm_w_run, tmp_path):
  """launch.sample without --guidance samples the LCM student at eval.guidance (7.5), the w of
  its evaluate rows and of its export's documented guidance_scale: it sampled at w = 1, outside
  the trained range (6, 16), unlike every other tool. Compared exactly: the same jitted
  sampler, seed and prompts; w = 1 differs."""
  from launch import sample as launch_sample

  def sample(*flags):
    out = tmp_path / f"s{len(os.listdir(tmp_path))}.png"
    assert launch_sample.main(["--workdir", lcm_w_run, "--num", "2", "--steps", "2",
                               "--out", str(out), *flags]) == 0
    return np.load(str(out).replace(".png", ".npy"))

  default = sample()
  np.testing.assert_array_equal(default, sample("--guidance", "7.5"))
  assert np.max(np.abs(default - sample("--guidance", "1"))) > 1e-3
