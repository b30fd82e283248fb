"""Exporting a distilled student to the PyTorch world: diffusers' DiTPipeline with the exported
scheduler config reproduces our sampler on the scheduler's grid for the same noise (DDIM, LCM;
flow-matching Euler and its stochastic consistency form in DiTPipeline's loop written out, as
DiTPipeline cannot call a flow-matching scheduler); a LoRA student's PEFT adapter, applied
by `peft` to the exported teacher, equals our merged student; `launch.convert --workdir`
writes a pipeline directory diffusers loads, and refuses what it cannot reproduce in one line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import context as ctx_lib
from distill import evaluation
from distill import processes as procs
from distill import solvers
from distill import wrappers
from distill.objectives import lcm as lcm_objective
from distill.registry import parse_spec
from models import convert, lora
from models.convert import export
from tests.test_dit_convert import random_dit
from tests.test_train_e2e import ROOT, env

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
           sample_size=8, patch_size=2, num_embeds_ada_norm=1000)   # DiTPipeline's null = 1000


def tiny_vae(seed=0):
  torch.manual_seed(seed)
  vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2,
                                block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, sample_size=16)
  with torch.no_grad():
    for p in vae.parameters():
      p.normal_(0, 0.05)
  return vae.eval()


def _set_timesteps(sched, steps, sigmas=None):
  """set_timesteps(steps), or with the given flow sigmas (export.flow_sigmas)."""
  if sigmas is None:
    sched.set_timesteps(steps)
  else:
    sched.set_timesteps(sigmas=sigmas)


def _grid(sched, steps, sigmas=None):
  """The grid a pipeline walks: timesteps (+ our clean end -1) or flow sigmas (end 0)."""
  _set_timesteps(sched, steps, sigmas)
  if hasattr(sched, "sigmas") and type(sched).__name__.startswith("FlowMatch"):
    return sched.sigmas.numpy().astype(np.float32)
  return np.append(sched.timesteps.numpy().astype(np.float32), -1.0)


def _diffusers_images(dm, vae, sched, labels, steps, sigmas=None):
  """DiTPipeline (guidance 1, latents from Generator(0)); flow-matching schedulers have no
  scale_model_input, which DiTPipeline calls, so for them the same loop is written out: the
  scheduler's timesteps into the transformer, its step on the output, the VAE decode."""
  if hasattr(sched, "scale_model_input"):
    pipe = diffusers.DiTPipeline(transformer=dm, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_labels=labels, guidance_scale=1.0, num_inference_steps=steps,
                generator=torch.Generator().manual_seed(0), output_type="np").images
  x = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(0))
  y = torch.tensor(labels)
  _set_timesteps(sched, steps, sigmas)
  with torch.no_grad():
    for t in sched.timesteps:
      out = dm(x, timestep=t.expand(len(labels)), class_labels=y).sample
      x = sched.step(out, t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor).sample
  return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


CASES = {
    # sampler, process, prediction, learn_sigma, steps
    "ddim_eps_learn_sigma": ("ddim", {"name": "vp_discrete", "beta_schedule": "linear"}, "eps",
                             True, 4),
    "lcm_v": ("lcm", {"name": "vp_discrete", "beta_schedule": "scaled_linear"}, "v", False, 4),
    # The sampler of an LCM student trained on another lattice with another boundary scaling
    # (objective.num_ddim_steps=20, timestep_scaling=5: lcm.lcm_sampler's spec).
    "lcm_v_lattice20": (lcm_objective.lcm_sampler(20, 0.5, 5.0),
                        {"name": "vp_discrete", "beta_schedule": "scaled_linear"}, "v", False, 4),
    # DMD2's multistep sampler over an SD-like VP student (LCMScheduler, no boundary scalings).
    "consistency_vp_eps": ("consistency", {"name": "vp_discrete",
                                           "beta_schedule": "scaled_linear"}, "eps", False, 4),
    "euler_flow": ("euler", {"name": "rectified_flow", "shift": 3.0}, "flow", False, 4),
    "consistency_flow": ("consistency", {"name": "rectified_flow"}, "flow", False, 3),
    # sCM's sampler over a rectified-flow network presented as TrigFlow (flow_to_trigflow): its
    # mid-time grid walked by the flow scheduler through the exported sigmas.
    "trigflow_flow": ("trigflow", {"name": "rectified_flow", "shift": 2.0}, "flow", False, 3),
}
WRAPPERS = {"trigflow_flow": lambda: wrappers.FlowToTrigFlow(sigma_data=0.5)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_dit_pipeline_with_exported_scheduler_reproduces_our_sampler(case):
  """Same DiT, same VAE, same noise (the pipeline's generator for the latents, torch's global
  stream for the schedulers' step noise): the pipeline's images equal our sampler's latents
  decoded by the VAE. atol 2e-4 on images in [0, 1]: a few float32 DiT calls and the decoder."""
  sampler, proc_cfg, kind, learn_sigma, steps = CASES[case]
  cfg = dict(DIT, out_channels=8 if learn_sigma else 4)
  dm = random_dit(cfg, seed=3)
  module, variables = convert.from_diffusers(dm)
  process = procs.make_process(**proc_cfg)
  info = ctx_lib.NetInfo(name="student", module=module, prediction=kind, process=process,
                         num_classes=1000, output_channels=4 if learn_sigma else 0,
                         wrapper=WRAPPERS[case]() if case in WRAPPERS else None)
  sched_cfg = export.scheduler_config(info, sampler)
  make = lambda: getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
  vae = tiny_vae()
  labels = [3, 998]
  torch.manual_seed(123)
  sigmas = (export.flow_sigmas(sched_cfg, info, sampler, [steps]) or {}).get(str(steps))
  images = _diffusers_images(dm, vae, make(), labels, steps, sigmas)

  shape = (2, 4, 8, 8)
  noise = torch.randn(shape, generator=torch.Generator().manual_seed(0)).numpy()
  torch.manual_seed(123)
  stochastic = sampler.split("(")[0] in ("lcm", "consistency", "trigflow")
  lcm = sched_cfg["_class_name"] == "LCMScheduler"
  draws = steps - 1 if lcm else steps                    # LCM draws none at its last step
  step_noise = [torch.randn(shape).numpy() for _ in range(draws if stochastic else 0)]
  step_noise += [np.zeros(shape, np.float32)] * (steps - len(step_noise))
  ctx = ctx_lib.Context(params={"student": variables["params"]}, ema={}, model_state={},
                        nets={"student": info})
  y = jnp.asarray(labels)
  nhwc = lambda a: jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))
  # Our sampler on its own grid (not the scheduler's): the grids must agree too.
  # (a flow-matching scheduler walks it with the sigmas export.json records: flow_sigmas)
  name, options = parse_spec(sampler)
  ours_grid = (solvers.SOLVERS.get(name).grid or solvers.process_grid)(
      info.process, steps, **options.get("grid_kwargs", {}))
  if sigmas is not None:   # as flow sigmas of the same noise levels
    alpha, sigma = (np.asarray(v) for v in info.process.alpha_sigma(ours_grid))
    ours_grid = sigma / (alpha + sigma)
  np.testing.assert_allclose(ours_grid, _grid(make(), steps, sigmas), atol=1e-6, rtol=0)
  # The noise at the first time in the presented process (TrigFlow's prior is sigma_d eps).
  prior = float(info.process.prior_std)
  latents = evaluation.make_sampler(ctx, "student", solver=sampler, steps=steps,
                                    step_noise=jnp.stack([nhwc(a) for a in step_noise]))(
                                        ctx.params["student"], prior * nhwc(noise),
                                        {"label": y}, None)
  with torch.no_grad():
    z = torch.from_numpy(np.array(latents).transpose(0, 3, 1, 2)) / vae.config.scaling_factor
    ours = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
  assert np.std(images) > 1e-3
  np.testing.assert_allclose(ours, images, atol=2e-4, rtol=0)


def test_wrapped_students_say_what_they_export():
  module, _ = convert.from_diffusers(random_dit(DIT))
  rf = procs.make_process("rectified_flow")
  cm = ctx_lib.NetInfo(name="s", module=module, prediction="flow", process=rf,
                       wrapper=wrappers.EDMConsistency())
  with pytest.raises(ValueError, match="edm_consistency"):
    export.scheduler_config(cm, "cm")
  scm = ctx_lib.NetInfo(name="s", module=module, prediction="flow", process=rf,
                        wrapper=wrappers.FlowToTrigFlow(sigma_data=0.5))
  assert export.scheduler_config(scm, "trigflow")["stochastic_sampling"] is True
  vp = ctx_lib.NetInfo(name="s", module=module, prediction="eps",
                       process=procs.make_process("vp_discrete"))
  with pytest.raises(ValueError, match="no diffusers scheduler reproduces sampler 'heun'"):
    export.scheduler_config(vp, "heun")


def test_no_scheduler_where_none_reproduces_the_sampler():
  """Sampler options (the demo's refined tcd) and a flow time input other than the
  scheduler's s x 1000 get one line each instead of a scheduler that samples differently."""
  module, _ = convert.from_diffusers(random_dit(DIT))
  dense = ctx_lib.NetInfo(name="s", module=module, prediction="flow",
                          process=procs.make_process("rectified_flow", timestep_scale=1.0))
  with pytest.raises(ValueError, match="scaled by 1 .* s x 1000"):
    export.scheduler_config(dense, "euler")
  rf = ctx_lib.NetInfo(name="s", module=module, prediction="flow",
                       process=procs.make_process("rectified_flow"))
  assert export.scheduler_config(rf, "euler")["num_train_timesteps"] == 1000
  with pytest.raises(ValueError, match=r"options .* \(gamma\); --sampler consistency"):
    export.scheduler_config(rf, "consistency(gamma=0.3)")


@pytest.mark.parametrize("scan", [False, True])
def test_peft_adapter_on_the_exported_teacher_equals_our_merged_student(scan, tmp_path):
  """A LoRA over attention and MLP kernels of a (scanned or not) DiT, exported as PEFT and
  applied by peft to the exported teacher: merged outputs equal our merged student's export
  (rtol 1e-5, float32) and differ from the teacher's."""
  peft = pytest.importorskip("peft")
  from safetensors.numpy import save_file
  dm = random_dit(DIT, seed=1)
  module, variables = convert.from_diffusers(dm, scan_blocks=scan)
  base = variables["params"]
  pattern = r"(attn/(to_q|to_v)|mlp/fc2)/kernel"
  adapter = lora.lora_init(base, pattern, rank=4, rng=jax.random.PRNGKey(0))
  adapter = jax.tree_util.tree_map(
      lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(1), a.shape), adapter)
  rank, alpha = 4, 8.0
  merged = lora.lora_merge(base, adapter, lora.lora_scale(rank, alpha))
  tensors, config = convert.converter_for(module).peft_lora(module, adapter, rank=rank,
                                                            alpha=alpha)
  assert len(config["target_modules"]) == 3 * DIT["num_layers"]
  save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
  (tmp_path / "adapter_config.json").write_text(json.dumps(config))

  teacher = convert.to_diffusers(module, {"params": base})
  student = convert.to_diffusers(module, {"params": merged})
  applied = peft.PeftModel.from_pretrained(teacher, str(tmp_path)).merge_and_unload().eval()
  x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
  t, y = torch.tensor([10, 700]), torch.tensor([1, 5])
  with torch.no_grad():
    got = applied(x, t, y).sample.numpy()
    want = student(x, t, y).sample.numpy()
    plain = convert.to_diffusers(module, {"params": base})(x, t, y).sample.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(want - plain)) > 1e-3


def test_launch_convert_export_refuses_an_existing_out(tmp_path):
  (tmp_path / "out").mkdir()
  p = subprocess.run([sys.executable, "-m", "launch.convert", "--workdir", str(tmp_path),
                      "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                     text=True, timeout=300, env=env())
  assert p.returncode == 2 and "exists" in p.stderr
  # A misspelt --sampler is refused before anything is read (it exported without a scheduler).
  p = subprocess.run([sys.executable, "-m", "launch.convert", "--workdir", str(tmp_path),
                      "--out", str(tmp_path / "new"), "--sampler", "eulr"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300, env=env())
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and "--sampler: unknown solver 'eulr'" in lines[0]
  assert not (tmp_path / "new").exists()


def digits_vp_dit_teacher(root):
  """A tiny 1-channel class-conditional DiT with SD's DDIM scheduler as a diffusers pipeline
  directory at `root` (a VP teacher for the 16 x 16 digits)."""
  cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
             num_layers=1, sample_size=16, patch_size=4, num_embeds_ada_norm=10)
  random_dit(cfg).save_pretrained(root / "transformer", safe_serialization=True)
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012).save_config(root / "scheduler")
  return root


@pytest.mark.slow
def test_lcm_lora_run_exports_a_pipeline_diffusers_loads(tmp_path):
  """A DiT teacher from a diffusers pipeline directory, an LCM-LoRA student trained 2 steps on
  the digits, exported with a VAE: DiTPipeline.from_pretrained loads it and samples; the LCM
  scheduler and the PEFT adapter are there."""
  root = digits_vp_dit_teacher(tmp_path / "teacher")
  w = tmp_path / "run"
  p = subprocess.run([sys.executable, "-m", "launch.train", "--config",
                      os.path.join(ROOT, "configs", "toy", "lcm.py") + ":digits",
                      "--workdir", str(w), "--config.data.name=digits", "--config.data.size=16",
                      f"--config.teacher.checkpoint={root}", "--config.teacher.params=raw",
                      "--config.objective.lora_rank=4", "--config.objective.target=online",
                      "--config.objective.lora_pattern=attn/to_(q|v)",
                      "--config.objective.num_ddim_steps=10", "--config.train.steps=2",
                      "--config.train.batch_size=8", "--config.eval.at_end=false",
                      "--config.checkpoint.every_steps=0", "--config.sample.num=4"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900, env=env())
  assert p.returncode == 0, p.stderr[-3000:]
  vae = tmp_path / "vae"
  v = tiny_vae()
  diffusers.AutoencoderKL(**{**dict(v.config), "latent_channels": 1}).save_pretrained(vae)
  out = tmp_path / "export"
  p = subprocess.run([sys.executable, "-m", "launch.convert", "--workdir", str(w), "--out",
                      str(out), "--vae", str(vae)], cwd=ROOT, capture_output=True, text=True,
                     timeout=600, env=env())
  assert p.returncode == 0, p.stderr[-3000:]
  assert sorted(os.listdir(out)) == ["export.json", "lora", "model_index.json", "scheduler",
                                     "transformer", "vae"]
  notes = json.load(open(out / "export.json"))
  assert notes["scheduler"] == "LCMScheduler" and notes["lora"]["rank"] == 4
  sched = json.load(open(out / "scheduler" / "scheduler_config.json"))
  assert sched["original_inference_steps"] == 10
  pipe = diffusers.DiTPipeline.from_pretrained(str(out))
  assert type(pipe.scheduler).__name__ == "LCMScheduler"
  img = pipe(class_labels=[1], guidance_scale=1.0, num_inference_steps=2,
             generator=torch.Generator().manual_seed(0), output_type="np").images
  assert img.shape[0] == 1 and img.shape[-1] == 3 and np.all(np.isfinite(img))


def test_export_json_gives_the_sigmas_that_walk_a_flow_students_grid(tmp_path):
  """launch.convert's scheduler note: for an sCM student over a flow network (shift 3),
  export.json's sigmas for each eval step count make the exported FlowMatchEuler scheduler walk
  our trigflow grid (as flow sigmas); a DDIM student's own scheduler grid needs none."""
  from launch import convert as convert_tool
  module, _ = convert.from_diffusers(random_dit(DIT))
  scm = ctx_lib.NetInfo(name="s", module=module, prediction="flow",
                        process=procs.make_process("rectified_flow", shift=3.0),
                        wrapper=wrappers.FlowToTrigFlow(sigma_data=0.5))
  notes, shipped = {}, {}
  convert_tool._write_scheduler(str(tmp_path / "a"), scm, "trigflow", (1, 2, 4), notes, shipped)
  sched = json.load(open(tmp_path / "a" / "scheduler" / "scheduler_config.json"))
  assert sorted(notes["sigmas"]) == ["1", "2", "4"]
  for n in (1, 2, 4):
    s = diffusers.FlowMatchEulerDiscreteScheduler.from_config(sched)
    s.set_timesteps(sigmas=notes["sigmas"][str(n)])
    alpha, sigma = (np.asarray(v) for v in scm.process.alpha_sigma(
        solvers.trigflow_grid(scm.process, n)))
    np.testing.assert_allclose(s.sigmas.numpy(), sigma / (alpha + sigma), atol=1e-6)
  vp = ctx_lib.NetInfo(name="s", module=module, prediction="eps",
                       process=procs.make_process("vp_discrete"))
  notes = {}
  convert_tool._write_scheduler(str(tmp_path / "b"), vp, "ddim", (1, 2, 4), notes, {})
  assert notes["scheduler"] == "DDIMScheduler" and "sigmas" not in notes


@pytest.mark.slow
def test_staged_student_export_records_its_step_count(tmp_path):
  """A segmented_cm student of a VP DiT teacher through Hyper-SD-like stages 4 -> 2 segments:
  export.json records `steps` = 2 (the pipeline's num_inference_steps) beside the DDIM
  scheduler; a student whose objective fixes no count (LCM) records none."""
  root = digits_vp_dit_teacher(tmp_path / "teacher")
  common = ["--config.data.name=digits", "--config.data.size=16",
            f"--config.teacher.checkpoint={root}", "--config.teacher.params=raw",
            "--config.objective.num_ddim_steps=8", "--config.train.batch_size=8",
            "--config.eval.at_end=false", "--config.checkpoint.every_steps=0",
            "--config.sample.num=0"]
  runs = {"segmented_cm": ["--config.objective.segment_stages=(4,2)",
                           "--config.objective.stage_steps=1"],
          "lcm": ["--config.train.steps=1"]}
  for name, extra in runs.items():
    w = tmp_path / name
    p = subprocess.run([sys.executable, "-m", "launch.train", "--config",
                        os.path.join(ROOT, "configs", "toy", f"{name}.py") + ":digits",
                        "--workdir", str(w), *common, *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=900, env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / f"{name}_export"
    p = subprocess.run([sys.executable, "-m", "launch.convert", "--workdir", str(w), "--out",
                        str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=env())
    assert p.returncode == 0, p.stderr[-3000:]
    notes = json.load(open(out / "export.json"))
    if name == "segmented_cm":
      assert notes["scheduler"] == "DDIMScheduler" and notes["steps"] == 2, notes
    else:
      assert notes["scheduler"] == "LCMScheduler" and "steps" not in notes, notes


def test_export_names_the_vae_class_its_config_gives(tmp_path):
  """--vae ships any diffusers VAE: model_index.json names the class in its config (SANA's
  AutoencoderDC is not an AutoencoderKL, which from_pretrained would build from its config);
  a config without _class_name is refused in one line before the run is read."""
  from launch import convert as convert_tool
  from tests.test_dcae import random_dcae
  random_dcae("sana_like").save_pretrained(tmp_path / "dc")
  tiny_vae().save_pretrained(tmp_path / "kl")
  assert convert_tool._vae_class(str(tmp_path / "dc")) == "AutoencoderDC"
  assert convert_tool._vae_class(str(tmp_path / "kl")) == "AutoencoderKL"
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text(json.dumps({"latent_channels": 4}))
  p = subprocess.run([sys.executable, "-m", "launch.convert", "--workdir", str(tmp_path),
                      "--out", str(tmp_path / "new"), "--vae", str(tmp_path / "bad")], cwd=ROOT,
                     capture_output=True, text=True, timeout=300, env=env())
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and "has no _class_name" in lines[0], p.stderr
  assert not (tmp_path / "new").exists()


def test_no_pipeline_index_where_the_pipeline_cannot_run_the_scheduler():
  """DiTPipeline calls scheduler.scale_model_input, which FlowMatchEulerDiscreteScheduler lacks
  (a flow DiT student's export): no model_index.json then, and the note says why; with DDIM it
  is written and names DiTPipeline."""
  flow = {"transformer": "DiTTransformer2DModel", "vae": "AutoencoderKL",
          "scheduler": "FlowMatchEulerDiscreteScheduler"}
  assert not hasattr(diffusers.FlowMatchEulerDiscreteScheduler, "scale_model_input")
  index, note = export.pipeline_index("DiTPipeline", flow, "transformer")
  assert index is None and "DiTPipeline's loop runs DDIMScheduler or LCMScheduler" in note
  index, _ = export.pipeline_index("DiTPipeline", {**flow, "scheduler": "DDIMScheduler"},
                                   "transformer")
  assert index["_class_name"] == "DiTPipeline" and index["scheduler"][1] == "DDIMScheduler"
