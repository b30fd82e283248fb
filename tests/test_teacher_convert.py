"""Teachers from diffusers directories: strict conversion, the Orbax cache of a converted
teacher, its use by the engine, and clear one-line errors for bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from distill import teacher as teacher_lib
from tests.test_train_e2e import ROOT, env

diffusers = pytest.importorskip("diffusers")


def _tiny_dit(learn_sigma=True):
  torch.manual_seed(0)
  m = diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=1,
      out_channels=2 if learn_sigma else 1, num_layers=1, sample_size=16, patch_size=4,
      num_embeds_ada_norm=10, norm_type="ada_norm_zero")
  with torch.no_grad():
    for p in m.parameters():
      p.normal_(0, 0.05)
  return m.eval()


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("dit_pipe")
  _tiny_dit().save_pretrained(root / "transformer", safe_serialization=True)
  diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                          beta_start=0.00085, beta_end=0.012).save_config(root / "scheduler")
  return root


def test_pipeline_dir_gives_process_and_parameterisation(pipeline_dir):
  t = teacher_lib.load_teacher(str(pipeline_dir))
  assert t.model_config["name"] == "dit" and t.prediction == "v"
  assert t.process.name == "vp_discrete" and t.process.beta_schedule == "scaled_linear"
  assert t.num_classes == 10
  assert t.model_config["output_channels"] == 1  # learn_sigma: denoise with the first half
  assert len(t.reference["hash"]) == 64


def test_model_dir_without_scheduler_uses_family_default(tmp_path):
  _tiny_dit().save_pretrained(tmp_path / "m", safe_serialization=True)
  t = teacher_lib.load_teacher(str(tmp_path / "m"))
  assert t.prediction == "eps" and t.process.beta_schedule == "linear"


def test_our_export_json_gives_the_exact_process(tmp_path):
  """A directory `launch.convert --workdir` wrote: export.json's process wins over the scheduler
  and the family default (a flow network at time scale 1 has no scheduler saying so)."""
  _tiny_dit().save_pretrained(tmp_path / "transformer", safe_serialization=True)
  process = {"name": "rectified_flow", "timestep_scale": 1.0, "shift": 3.0}
  (tmp_path / "export.json").write_text(json.dumps({"process": process, "prediction": "flow"}))
  t = teacher_lib.load_teacher(str(tmp_path))
  assert t.prediction == "flow" and t.process.name == "rectified_flow"
  assert (t.process.timestep_scale, t.process.shift) == (1.0, 3.0)


def test_an_autoencoder_is_not_a_teacher(tmp_path):
  from tests.test_export import tiny_vae
  tiny_vae().save_pretrained(tmp_path / "vae", safe_serialization=True)
  with pytest.raises(ValueError, match="holds AutoencoderKL, an autoencoder"):
    teacher_lib.load_teacher(str(tmp_path / "vae"), "raw",
                             process="rectified_flow(prediction='flow')")


def convert(*args):
  return subprocess.run([sys.executable, "-m", "launch.convert", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600, env=env())


def test_converted_teacher_cache_roundtrip_and_no_overwrite(pipeline_dir, tmp_path):
  out = tmp_path / "converted"
  p = convert("--diffusers", str(pipeline_dir), "--out", str(out))
  assert p.returncode == 0, p.stderr[-2000:]
  direct = teacher_lib.load_teacher(str(pipeline_dir))
  cached = teacher_lib.load_teacher(str(out))
  assert cached.reference["hash"] == direct.reference["hash"]
  assert cached.model_config == json.loads(json.dumps(direct.model_config))
  assert cached.prediction == "v" and cached.process == direct.process
  again = convert("--diffusers", str(pipeline_dir), "--out", str(out))
  assert again.returncode == 2 and "exists" in again.stderr
  assert teacher_lib.load_teacher(str(out)).reference["hash"] == direct.reference["hash"]


def test_bad_teacher_one_line_error(tmp_path):
  m = _tiny_dit()
  m.save_pretrained(tmp_path / "bad", safe_serialization=True)
  from safetensors.torch import load_file, save_file
  f = tmp_path / "bad" / "diffusion_pytorch_model.safetensors"
  sd = load_file(str(f))
  sd.pop(next(k for k in sd if k.endswith("proj_out_2.weight")))
  save_file(sd, str(f))
  p = convert("--diffusers", str(tmp_path / "bad"), "--out", str(tmp_path / "o"))
  lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
  assert p.returncode == 2 and len(lines) == 1 and "proj_out_2.weight" in lines[0], p.stderr
  assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_engine_fine_tunes_a_converted_teacher(pipeline_dir, tmp_path):
  """denoise with objective.init=teacher on the digits: the DiT comes from the diffusers dir."""
  w = tmp_path / "ft"
  cfg_file = tmp_path / "ft_config.py"
  cfg_file.write_text("from distill.config import base_config\n"
                      "def get_config(arg=None):\n"
                      "  c = base_config()\n  c.objective.name = 'denoise'\n"
                      "  return c\n")
  p = subprocess.run([sys.executable, "-m", "launch.train", "--config", str(cfg_file),
                      "--workdir", str(w), "--config.data.name=digits", "--config.model.name=dit",
                      f"--config.teacher.checkpoint={pipeline_dir}", "--config.teacher.params=raw",
                      "--config.objective.init=teacher", "--config.train.steps=3",
                      "--config.train.batch_size=8", "--config.train.log_every=1",
                      "--config.eval.at_end=false", "--config.checkpoint.every_steps=0",
                      "--config.sample.num=4", "--config.eval.teacher_steps=2"],
                     cwd=ROOT, capture_output=True, text=True, timeout=900, env=env())
  assert p.returncode == 0, p.stderr[-3000:]
  cfg = json.load(open(w / "config.json"))
  assert cfg["resolved"]["models"]["model"]["name"] == "dit"
  assert cfg["resolved"]["processes"]["model"]["beta_schedule"] == "scaled_linear"
  rows = [json.loads(x) for x in open(w / "metrics.jsonl")]
  assert len(rows) == 3 and all(np.isfinite(r["denoise/loss"]) for r in rows)


def test_teacher_runtime_changes_how_not_what_it_computes(pipeline_dir):
  """`teacher.runtime`: scanned blocks + remat give the same outputs (weights re-laid out),
  bf16 weights are cast and their outputs stay close (bf16 rounding of 1-layer DiT weights:
  2e-2), the reference hash stays the checkpoint's; architecture keys are refused in one line."""
  import jax
  import jax.numpy as jnp
  from distill import config as config_lib
  base = teacher_lib.load_teacher(str(pipeline_dir))
  fast = teacher_lib.with_runtime(base, {"scan_blocks": True, "remat": "full"})
  half = teacher_lib.with_runtime(base, {"param_dtype": "bfloat16"})
  assert fast.module.scan_blocks and fast.model_config["remat"] == "full"
  assert fast.reference == base.reference and half.model_config["param_dtype"] == "bfloat16"
  assert {np.asarray(a).dtype for a in jax.tree_util.tree_leaves(half.params)} == {
      np.dtype(jnp.bfloat16)}
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 1)), jnp.float32)
  t, y = jnp.array([10.0, 500.0]), jnp.array([1, 3])
  out = lambda tt: tt.module.apply({"params": tt.params}, x, t, y)
  np.testing.assert_allclose(out(fast), out(base), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out(half), np.float32), out(base), atol=2e-2)
  with pytest.raises(ValueError, match=r"teacher.runtime.num_layers': not a runtime option"):
    teacher_lib.with_runtime(base, {"num_layers": 3})
  c = config_lib.apply_overrides(config_lib.base_config(),
                                 ["teacher.runtime.dtype=bfloat16", "teacher.runtime.scan_blocks=True"])
  assert c.teacher.runtime.to_dict() == {"dtype": "bfloat16", "scan_blocks": True}


def test_process_override_and_scm_scheduler(pipeline_dir, tmp_path):
  """`--process` replaces what the scheduler config says (and supplies it where there is
  none, keeping the family's prediction kind); SANA-Sprint's SCMScheduler means a dense-time
  flow transformer; a bad spec is one line."""
  t = teacher_lib.load_teacher(str(pipeline_dir), process="rectified_flow(timestep_scale=1.0, "
                                                          "prediction='flow')")
  assert t.process.name == "rectified_flow" and t.process.timestep_scale == 1.0
  assert t.prediction == "flow" and t.model_config["prediction"] == "flow"
  keep = teacher_lib.load_teacher(str(pipeline_dir), process="vp_discrete(beta_schedule='linear')")
  assert keep.prediction == "v" and keep.process.beta_schedule == "linear"
  assert teacher_lib.process_from_scheduler({"_class_name": "SCMScheduler"}) == (
      {"name": "rectified_flow", "timestep_scale": 1.0}, "flow")
  with pytest.raises(ValueError, match="--process 'rectified_flow\\(nope=1\\)'"):
    teacher_lib.load_teacher(str(pipeline_dir), process="rectified_flow(nope=1)")
  (tmp_path / "m").mkdir()
  _tiny_dit().save_pretrained(tmp_path / "m" / "transformer", safe_serialization=True)
  bare = teacher_lib.load_teacher(str(tmp_path / "m"), process="rectified_flow(shift=3.0)")
  assert bare.process.shift == 3.0 and bare.prediction == "eps"  # DiT's family default kind


def test_the_run_config_sets_how_a_loaded_teacher_computes(pipeline_dir):
  """`model.*` runtime options of the same model apply to the loaded teacher (the ImageNet DMD2
  recipe's model.remat=full, the README's --config.model.attention=xla on a CPU), then
  `teacher.runtime.*` over them; a config describing another model leaves the teacher as it
  was; a kernel the teacher's own run recorded that cannot run here (a cuDNN-trained teacher
  on a CPU) becomes XLA's, while one this config names stays for check_platform to refuse."""
  import dataclasses
  from distill import config as config_lib
  c = config_lib.apply_overrides(config_lib.base_config(), [
      "model.name=dit", f"teacher.checkpoint={pipeline_dir}", "teacher.params=raw"])
  with c.unlocked():
    c.model.remat, c.model.dtype = "full", "bfloat16"
  t = teacher_lib.from_config(c)
  assert t.module.remat == "full" and t.model_config["remat"] == "full"
  assert t.model_config["dtype"] == "bfloat16"
  with c.unlocked():
    c.teacher.runtime.remat = "dots_saveable"
  assert teacher_lib.from_config(c).module.remat == "dots_saveable"
  with c.unlocked():
    c.model = config_lib.ConfigDict({"name": "mlp", "remat": "full"})
    c.teacher.runtime = config_lib.ConfigDict()
  base = teacher_lib.load_teacher(str(pipeline_dir), "raw")
  assert teacher_lib.from_config(c).model_config == base.model_config
  cudnn = dataclasses.replace(base, model_config={**base.model_config, "attention": "cudnn"},
                              module=base.module.clone(attention="cudnn"))
  assert teacher_lib.run_runtime(c, cudnn, "cpu") == {"attention": "xla"}
  assert teacher_lib.run_runtime(c, cudnn, "gpu") == {}
  with c.unlocked():
    c.teacher.runtime.attention = "cudnn"
  assert teacher_lib.run_runtime(c, cudnn, "cpu") == {"attention": "cudnn"}


@pytest.mark.parametrize("options, fragment", [
    ({"rescale_betas_zero_snr": True}, "scheduler option rescale_betas_zero_snr=True is not "
                                       "supported"),
    ({"trained_betas": [0.001] * 1000}, "scheduler option trained_betas="),
    ({"prediction_type": "flow_prediction", "use_flow_sigmas": True},
     "scheduler option use_flow_sigmas=True is not supported"),
    ({"prediction_type": "flow_prediction"}, "scheduler prediction_type 'flow_prediction' is "
                                             "not supported (known: epsilon, v_prediction, "
                                             "sample)"),
])
def test_scheduler_options_the_process_cannot_reproduce_are_refused(pipeline_dir, tmp_path,
                                                                    options, fragment):
  """A scheduler whose noise levels the converted process would not reproduce (zero-terminal-
  SNR rescaling, given betas, flow sigmas) or whose prediction kind is unknown stops in one
  line naming the scheduler file, instead of converting a teacher that is called at the wrong
  noise levels; `--process` names the process and goes on."""
  import shutil
  d = tmp_path / "pipe"
  shutil.copytree(pipeline_dir, d)
  path = d / "scheduler" / "scheduler_config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **options}))
  with pytest.raises(ValueError) as e:
    teacher_lib.load_teacher(str(d))
  assert str(e.value).startswith(f"{path}: {fragment}"), str(e.value)
  if "rescale_betas_zero_snr" in options:
    t = teacher_lib.load_teacher(str(d), process="vp_discrete(beta_schedule='linear')")
    assert t.process.name == "vp_discrete"
