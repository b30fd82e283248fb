"""`init.<network>`: a network starts from the same network of another run (SiD2A: SiDA's
generator from a trained SiD run) instead of its objective's init, at that run's EMA weights;
bad values are one clear error, and a resumed run keeps its own checkpoint."""
import json
import os

import jax
import numpy as np
import pytest

from distill import teacher as teacher_lib
from distill import trainer
from distill.engine import Engine
from tests import _matching_utils as mu

CONFIG = os.path.join(mu.ROOT, "configs", "toy", "sid.py")
SMALL = ["train.batch_size=32", "eval.at_end=False", "sample.num=0",
         "checkpoint.async_save=False", "train.log_every=2", "checkpoint.every_steps=0"]


def _config(teacher, *extra):
  return trainer.load_config(f"{CONFIG}:gmm", [*SMALL, f"teacher.checkpoint={teacher}", *extra])


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(tree))]


def _equal(a, b) -> bool:
  la, lb = _leaves(a), _leaves(b)
  return len(la) == len(lb) and all(x.shape == y.shape and np.array_equal(x, y)
                                    for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def sid_run(tmp_path_factory):
  teacher = mu.shared_tiny_teacher("gmm", 20)
  work = str(tmp_path_factory.mktemp("runs") / "sid")
  trainer.train(_config(teacher, "train.steps=4", "objective.ema_decay=0.5"), work)
  return teacher, work


def test_student_starts_from_the_other_runs_ema_and_trains_on(sid_run, tmp_path):
  teacher, sid = sid_run
  source = teacher_lib.load_run_network(sid, "student")
  assert source.reference["params"] == "ema/eval" and source.reference["step"] == 4
  config = _config(teacher, f"init.student={sid}", "train.steps=2",
                   "objective.discriminator=encoder", "objective.gan_feature_block=0",
                   "objective.gan_weight=0.05")
  engine = Engine(config, teacher=teacher_lib.from_config(trainer.prepare_config(config)))
  state, frozen = engine.init_state()
  # The generator is the SiD run's EMA student; the fake score still starts from the teacher.
  assert _equal(state.params["student"], source.params)
  assert not _equal(state.params["student"], engine.teacher.params)
  assert _equal(state.params["fake_score"], engine.teacher.params)
  # ... and the SiDA run trains from there (finite losses, the weights move).
  work = str(tmp_path / "sida")
  trainer.train(config, work)
  trained = teacher_lib.load_run_network(work, "student", "raw")
  assert not _equal(trained.params, source.params)
  rows = mu.metrics(work)
  assert rows and all(np.isfinite(v) for r in rows for k, v in r.items() if k.endswith("loss"))
  # config.json records where the student started (that run's path, step, weights hash), and
  # a resume (which does not read the init run) keeps the record.
  want = {"path": os.path.abspath(sid), "step": 4, "hash": source.reference["hash"]}
  recorded = lambda: json.load(open(os.path.join(work, "config.json")))["resolved"]["init_runs"]
  assert {k: recorded()["student"][k] for k in want} == want

  # A resumed run restores its own checkpoint, whatever init says now. Reading a run leaves
  # a save another process has in flight (Orbax's temporary directory) alone.
  in_flight = os.path.join(work, "checkpoints", "4.orbax-checkpoint-tmp-1")
  os.makedirs(in_flight)
  engine2, state2, _, step = trainer.open_run(work, [])
  assert step == 2 and _equal(state2.params["student"], trained.params)
  assert os.path.isdir(in_flight)
  os.rmdir(in_flight)
  trainer.train(_config(teacher, f"init.student={sid}", "train.steps=3",
                        "objective.discriminator=encoder", "objective.gan_feature_block=0",
                        "objective.gan_weight=0.05"), work)
  assert {k: recorded()["student"][k] for k in want} == want


def test_bad_init_values_are_one_clear_error(sid_run, tmp_path):
  teacher, sid = sid_run
  cases = [
      (f"init.nosuch={sid}", ValueError, "'init.nosuch': the objective has no network 'nosuch'"),
      (f"init.student={tmp_path / 'missing'}", FileNotFoundError,
       "'init.student': .* is not a run directory"),
      (f"init.student={teacher}", ValueError, "the run .* has no network 'student'"),
  ]
  for override, error, message in cases:
    config = _config(teacher, override)
    with pytest.raises(error, match=message):
      engine = Engine(config, teacher=teacher_lib.from_config(
          trainer.prepare_config(config)))
      engine.init_state()


def test_a_resume_needs_the_init_run_of_a_trained_network_at_no_path(sid_run, tmp_path):
  """Its weights come from the run's own checkpoint: the init run may have moved (the path is
  recorded as a move) or be gone."""
  import json
  import shutil
  teacher, sid = sid_run
  source = str(tmp_path / "source")
  shutil.copytree(sid, source)
  work = str(tmp_path / "sida")
  common = ["objective.discriminator=encoder", "objective.gan_feature_block=0",
            "checkpoint.every_steps=2"]
  trainer.train(_config(teacher, f"init.student={source}", "train.steps=2", *common), work)
  moved = str(tmp_path / "moved")
  shutil.move(source, moved)
  trainer.train(_config(teacher, f"init.student={moved}", "train.steps=4", *common), work)
  with open(os.path.join(work, "config.json")) as f:
    changes = json.load(f)["provenance"]["config_changes"]
  assert changes == [{"step": 2, "changes": {"init.student": [source, moved]}}]
  shutil.rmtree(moved)
  trainer.train(_config(teacher, f"init.student={moved}", "train.steps=6", *common), work)
  assert _steps_of(work)[-1] == 6
  # Reading the run (sample, evaluate, export) restores it the same way.
  assert trainer.open_run(work)[3] == 6


def _steps_of(work: str) -> list:
  return sorted(int(d) for d in os.listdir(os.path.join(work, "checkpoints")) if d.isdigit())


def test_a_lora_run_is_read_as_its_merged_network(tmp_path):
  """An LCM-LoRA run's student is its teacher with the adapter merged, as the run itself
  evaluated it (init.<net> and teacher.checkpoint read it so); a run that does not record the
  adapter's scale is named in one line."""
  teacher = mu.shared_tiny_teacher("gmm", 20)
  run = str(tmp_path / "lcm_lora")
  lcm = os.path.join(mu.ROOT, "configs", "toy", "lcm.py")
  mu.run_train(lcm, run, f"--config.teacher.checkpoint={teacher}", "--config.train.steps=3",
               "--config.objective.lora_rank=4", "--config.objective.lora_alpha=8.0",
               "--config.objective.target=online", "--config.eval.at_end=false",
               "--config.sample.num=0", "--config.train.batch_size=16")
  engine, state, frozen, _ = trainer.open_run(run)
  want = trainer.eval_params(engine, state, frozen)["student"]
  info = engine.nets["student"]
  assert info.base == "teacher" and info.lora_scale == 2.0
  from distill.context import merge_params
  want = merge_params(info, want, {**frozen, **state.params})
  got = teacher_lib.load_run_network(run, "student", key="init.student")
  assert _equal(got.params, want) and not _equal(got.params, frozen["teacher"])
  # The same run without the recorded scale (written before it was recorded):
  cfg_path = os.path.join(run, "config.json")
  cfg = json.loads(open(cfg_path).read())
  del cfg["resolved"]["networks"]["student"]["lora_scale"]
  open(cfg_path, "w").write(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"config key 'init.student': network 'student' of .* is "
                                       r"a LoRA adapter over its 'teacher', and the run does not "
                                       r"record how to merge it"):
    teacher_lib.load_run_network(run, "student", key="init.student")
