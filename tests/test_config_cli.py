"""Configs: overrides, validation before any work (one line, exit 2, nothing written)."""
import os
import subprocess
import sys

import pytest

from distill import config as config_lib
from distill import processes as procs
from distill import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = os.path.join(ROOT, "configs", "toy", "teacher.py")


def load(*overrides, arg=""):
  return trainer.load_config(TEACHER + (f":{arg}" if arg else ""), overrides)


def test_overrides_parse_to_the_existing_type():
  c = load("train.steps=12", "optim.lr=0.5", "eval.steps=(1,3)", "checkpoint.async_save=false",
           "data.modes=4")
  assert c.train.steps == 12 and isinstance(c.train.steps, int)
  assert c.optim.lr == 0.5
  assert tuple(c.eval.steps) == (1, 3)
  assert c.checkpoint.async_save is False
  assert c.data.modes == 4


def test_config_argument_selects_dataset():
  assert load(arg="spiral").data.name == "spiral"


def test_process_fields_are_config_keys():
  """The chosen process's own fields (e.g. a dense time input) are overridable and reach it."""
  c = load("process.timestep_scale=1.0")
  assert c.process.timestep_scale == 1.0
  process = procs.make_process(**trainer.prepare_config(c).process.to_dict())
  assert process.timestep(0.25) == pytest.approx(0.25)
  assert procs.make_process(name="rectified_flow").timestep(0.25) == pytest.approx(250.0)


@pytest.mark.parametrize("override, fragment", [
    ("train.stepz=3", "'train.stepz'"),
    ("nosuch.key=1", "'nosuch'"),
    ("train.steps=abc", "'train.steps': expected an int"),
    ("checkpoint.async_save=maybe", "'checkpoint.async_save': expected a bool"),
    ("process.timestep_scal=1.0", "'process.timestep_scal'"),
    ("process.timestep_scale=fast", "'process.timestep_scale': expected a float"),
])
def test_bad_overrides_name_the_key(override, fragment):
  with pytest.raises(config_lib.ConfigError, match=fragment.replace("(", r"\(")):
    load(override)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda c: c.data.__setitem__("modez", 3), "data.modez"),
    (lambda c: c.model.__setitem__("hiddn", 3), "model.hiddn"),
    (lambda c: c.objective.__setitem__("weightng", "snr"), "objective.weightng"),
    (lambda c: c.train.__setitem__("batch_size", 10), "train.batch_size"),  # ok on 1 device
    (lambda c: c.mesh.__setitem__("data", 4), "mesh"),
    (lambda c: c.teacher.__setitem__("checkpoint", "/no/such/run"), "teacher.checkpoint"),
    (lambda c: c.train.__setitem__("grad_accum", 3), "train.grad_accum"),
    (lambda c: c.optim.__setitem__("lr", "fast"), "optim.lr"),
    # An attention kernel in a pass it cannot serve fails here, not at the first jvp.
    (lambda c: c.model.__setitem__("jvp_attention", "pallas"), "model.jvp_attention='pallas'"),
    (lambda c: c.model.__setitem__("attention", "flash"), "model.attention='flash'"),
    (lambda c: c.teacher.runtime.__setitem__("attention", "mosaic_jvp"),
     "teacher.runtime.attention='mosaic_jvp'"),
    # Names a loss or the evaluation reads only later, and counts that cannot be.
    (lambda c: c.model.__setitem__("prediction", "velocity"), "model.prediction': unknown"),
    (lambda c: c.train.__setitem__("batch_size", -4), "train.batch_size': must be >= 1"),
    (lambda c: c.eval.__setitem__("sampler", "eulr"), "eval.sampler': unknown solver 'eulr'"),
    (lambda c: c.eval.__setitem__("sampler", "tcd(gamma="), "eval.sampler': sampler spec"),
    (lambda c: c.eval.__setitem__("steps", (1, 0)), "eval.steps': every entry must be >= 1"),
    (lambda c: c.eval.__setitem__("sampler", "consistency(foo=1)"),
     "eval.sampler': solver 'consistency' has no option 'foo'"),
])
def test_validation_names_the_key(mutate, fragment):
  c = load()
  with c.unlocked() if hasattr(c, "unlocked") else _nullctx():
    with c.ignore_type():
      mutate(c)
  if fragment == "train.batch_size":
    trainer.prepare_config(c)  # 10 is divisible by the 1-device data-parallel size
    return
  with pytest.raises((config_lib.ConfigError, ValueError), match=fragment.replace(".", r"\.")):
    trainer.prepare_config(c)


def test_kernels_that_cannot_run_here_are_checked_for_runs_and_replaced_for_reading_one():
  """Training, benchmarking or compiling with a kernel the platform lacks stops in one line;
  sampling, evaluating or exporting a run trained with one reads it with XLA attention."""
  c = load("model.attention=cudnn", "model.jvp_attention=pallas_jvp")
  with c.teacher.runtime.unlocked():
    c.teacher.runtime.attention = "splash"
  with pytest.raises(config_lib.ConfigError, match="model.attention='cudnn' does not run on cpu"):
    trainer.check_platform(c, "cpu")
  with pytest.raises(config_lib.ConfigError, match="teacher.runtime.attention='splash'"):
    trainer.check_platform(c, "gpu")
  with pytest.raises(config_lib.ConfigError, match="model.jvp_attention='pallas_jvp'"):
    trainer.check_platform(load("model.jvp_attention=pallas_jvp"), "tpu")
  here = trainer.runnable_here(c, "cpu")
  assert (here.model.attention, here.model.jvp_attention) == ("xla", "pallas_jvp")
  assert here.teacher.runtime.attention == "xla"


class _nullctx:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


@pytest.mark.parametrize("args, fragment", [
    (["--config.train.stepz=5"], "train.stepz"),
    (["--config.model.hidden=wide"], "model.hidden"),
    (["--config.teacher.checkpoint=/nonexistent/teacher"], "teacher.checkpoint"),
    (["--config.mesh.data=64"], "mesh"),
    (["--config.init.model=/nonexistent/run"], "init.model"),   # found when the run starts
    (["--config.init.nosuch=/nonexistent/run"], "init.nosuch"),
    # Read only when the step is traced: the trace runs before anything is written.
    (["--config.optim.schedule=cosin"], "unknown schedule 'cosin'"),
    (["--config.objective.weighting=foo"],
     "config key 'objective.weighting': unknown loss weighting 'foo'"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, args, fragment):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", TEACHER,
                         "--workdir", str(workdir), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1, proc.stderr
  assert fragment in lines[0]
  assert not workdir.exists()


def test_libtpu_probe_is_quieted_only_without_tpu():
  """launch's import sets TPU_WORKER_HOSTNAMES / TPU_HOST_BOUNDS for libtpu only where libtpu is
  installed, no TPU can be present and the user has not set them."""
  from launch import quiet_libtpu_without_tpu as quiet
  env = {}
  quiet(env, libtpu_installed=True, tpu_possible=False)
  assert env == {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"}
  for kw in (dict(libtpu_installed=True, tpu_possible=True),
             dict(libtpu_installed=False, tpu_possible=False)):
    env = {}
    quiet(env, **kw)
    assert env == {}, kw
  env = {"TPU_WORKER_HOSTNAMES": "w0,w1"}
  quiet(env, libtpu_installed=True, tpu_possible=False)
  assert env == {"TPU_WORKER_HOSTNAMES": "w0,w1"}


def test_cli_error_is_one_line_without_jax_platforms(tmp_path):
  """Without JAX_PLATFORMS (a user's shell), a bad key is still one line on stderr, also with
  libtpu installed on a host without TPUs (its metadata-probe warnings are quieted)."""
  import launch
  if launch._tpu_possible():  # pylint: disable=protected-access
    pytest.skip("this host may have a TPU (or cannot tell): libtpu's probe is left alone")
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_WORKER_HOSTNAMES", "TPU_HOST_BOUNDS")}
  proc = subprocess.run([sys.executable, "-m", "launch.train", "--config", TEACHER,
                         "--workdir", str(tmp_path / "run"), "--config.model.jvp_attention=pallas"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 2
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert lines == ["error: model.jvp_attention='pallas' cannot serve this pass; choose one of "
                   "('xla', 'pallas_jvp', 'mosaic_jvp')"], proc.stderr


DEMO_DMD2 = os.path.join(ROOT, "configs", "demo", "dmd2.py")


def test_a_component_swapped_on_the_command_line_drops_the_keys_of_the_one_it_replaces(caplog):
  # The demo configs set data.size for the digits; the synthetic data has no such key, and a
  # command line cannot delete a key, so the swap drops it (saying so) instead of refusing.
  with caplog.at_level("WARNING", logger="distill.trainer"):
    c = trainer.load_config(DEMO_DMD2, ["data.name=synthetic", "data.height=8"])
  assert c.data.name == "synthetic" and c.data.height == 8 and "size" not in c.data
  assert "dropped data.size" in caplog.text and "dataset 'digits'" in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="distill.trainer"):   # nothing dropped, nothing said
    assert trainer.load_config(TEACHER, ["data.name=spiral"]).data.name == "spiral"
    c = trainer.load_config(DEMO_DMD2, [])
  assert c.data.size == 8 and not caplog.text
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'data.size'"):
    trainer.load_config(DEMO_DMD2, ["data.name=synthetic", "data.size=8"])


def test_labels_beyond_the_networks_classes_stop_before_anything_is_written(tmp_path):
  # 1000-class data for the demo's 10-class teacher: the labels would index past its class
  # table (NaN losses that trained on silently).
  c = trainer.load_config(DEMO_DMD2, ["data.name=synthetic", "data.height=8", "data.width=8",
                                      "data.channels=1", "data.num_classes=1000"])
  with pytest.raises(trainer.SetupError, match=r"data 'synthetic' has 1000 classes \(labels "
                                               r"0..999\), but network '\w+' embeds 10"):
    trainer.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_per_network_entries_are_created_on_the_command_line_and_must_name_the_objectives():
  # `ema.<net>.<role>` and `optim.networks.<net>.<key>` need no sub-dictionary in the file...
  dmd2 = os.path.join(ROOT, "configs", "toy", "dmd2.py")
  c = trainer.load_config(dmd2, ["optim.networks.fake_score.lr=1e-4", "ema.student.eval=0.9"])
  assert c.optim.networks.fake_score.lr == 1e-4 and c.ema.student.eval == 0.9
  with pytest.raises(config_lib.ConfigError, match="unknown config key 'optim.nets'"):
    trainer.load_config(dmd2, ["optim.nets.fake_score.lr=1e-4"])
  # ... and a name the objective does not have stops at setup instead of being ignored.
  from distill.engine import Engine
  from tests._matching_utils import make_teacher
  for overrides, fragment in (
      (["optim.networks.fakescore.lr=1e-4"],
       "config key 'optim.networks.fakescore': objective 'dmd2' trains no network 'fakescore' "
       "(it trains fake_score, gan_head, student)"),
      (["ema.student.eval=0.9"], "config key 'ema.student.eval': objective 'dmd2' keeps no EMA "
                                 "role 'eval' of network 'student'")):
    c = trainer.prepare_config(trainer.load_config(dmd2, overrides + ["teacher.checkpoint="]))
    with pytest.raises(ValueError) as e:
      Engine(c, teacher=make_teacher(0))
    assert fragment in str(e.value)


@pytest.mark.parametrize("override, fragment", [
    ("eval.num_samples=0", "'eval.num_samples': must be >= 1, got 0"),
    ("eval.teacher_steps=0", "'eval.teacher_steps': must be >= 1, got 0"),
    ("eval.ideal_steps=(0,)", "'eval.ideal_steps': every entry must be >= 1, got 0"),
    ("sample.num=-3", "'sample.num': must be >= 0, got -3"),
    ("eval.metric=fd", "metric 'fd' scores grayscale images (H, W, 1)"),
])
def test_evaluation_settings_that_would_fail_after_training_stop_before_it(tmp_path, override,
                                                                           fragment):
  with pytest.raises((config_lib.ConfigError, trainer.SetupError)) as e:
    trainer.train(load(override), str(tmp_path / "run"))
  assert fragment in str(e.value)
  assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_a_config_file_is_one_line(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(config_lib.ConfigError, match="is not a config file"):
    trainer.load_config(str(tmp_path / "config.json"))
  (tmp_path / "plain.py").write_text("def get_config(arg=''):\n  return {'objective': {}}\n")
  with pytest.raises(config_lib.ConfigError, match="get_config returned a dict, expected an "
                                                   "ml_collections.ConfigDict"):
    trainer.load_config(str(tmp_path / "plain.py"))


def test_sharding_rules_name_the_models_logical_axes():
  from distill import sharding as shd
  rules = dict(shd.parse_rules("embed=tensor,mlp=fsdp+tensor,kv="))
  assert rules["embed"] == "tensor" and rules["mlp"] == ("fsdp", "tensor") and rules["kv"] is None
  assert rules["heads"] == "tensor"   # the rest keep the table's
  # a misspelt logical name left its parameters replicated, silently
  with pytest.raises(ValueError, match="unknown logical axis 'mlps' .*embed, mlp"):
    shd.parse_rules("mlps=tensor")
  with pytest.raises(ValueError, match="unknown mesh axis 'fsdpp'"):
    shd.parse_rules("embed=fsdpp")
