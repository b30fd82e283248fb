"""A researcher's realistic mistakes in a new objective stop at setup, in one line naming the
objective and phase, before a run writes anything (README "Adding an objective")."""
import functools

import jax.numpy as jnp
import pytest

from distill import trainer
from distill.engine import Engine
from distill.objective import OBJECTIVES, Network, Objective, Phase, register_objective
from tests._matching_utils import make_teacher, tiny_config


def _loss(trainable, ctx, batch, rng, t, *, mode):
  x = batch["x"]
  per = jnp.mean(jnp.square(ctx.call("student", x, jnp.zeros((x.shape[0],)),
                                     params=trainable["student"])), axis=-1)
  loss = jnp.mean(per)
  if mode == "ctx_typo":
    ctx.x0("teachr", x, jnp.zeros((x.shape[0],)))
  return {
      "bare": lambda: loss,
      "vector": lambda: (per, {}),
      "aux_list": lambda: (loss, [loss]),
      "aux_vec": lambda: (loss, {"per_example": per}),
  }.get(mode, lambda: (loss, {"mean": loss}))()


def _build(cfg):
  mode = cfg.mode
  if mode == "missing_key":
    _ = cfg.temperature   # a key the objective forgot to declare in its defaults
  phase = Phase("regress", loss=functools.partial(_loss, mode=mode),
                trains=("studnet",) if mode == "trains_typo" else ("student",),
                data="prompt" if mode == "data_typo" else "train")
  ema = {"student": ("eval",)} if mode == "ema_tuple" else {}
  return Objective(networks=(Network("student"),), phases=(phase,), ema=ema,
                   student="studnt" if mode == "student_typo" else "student",
                   sampler="eulr" if mode == "sampler_typo" else "euler")


if "test_mistakes" not in OBJECTIVES:
  register_objective("test_mistakes", defaults={"mode": "ok"})(_build)


@pytest.mark.parametrize("mode, fragment", [
    ("bare", "phase 'regress': the loss must return (loss, metrics) or (loss, metrics, "
             "updates), got an array of shape ()"),
    ("vector", "phase 'regress': the loss must be a scalar, got shape (16,)"),
    ("aux_list", "phase 'regress': metrics must be a dict of scalars, got list"),
    ("aux_vec", "phase 'regress': metric 'per_example' must be a scalar, got shape (16,)"),
    ("ctx_typo", "no network 'teachr' in this objective (it has student)"),
    ("missing_key", "its builder reads config key 'objective.temperature', which the config "
                    "lacks"),
    ("trains_typo", "phase 'regress' trains 'studnet', not one of its networks (student)"),
    ("student_typo", "student 'studnt' (the network it evaluates and samples) is not one of its "
                     "networks (student)"),
    ("sampler_typo", "sampler: unknown solver 'eulr'"),
    ("data_typo", "phase 'regress' reads data stream 'prompt'"),
    ("ema_tuple", "ema['student'] must map roles to decays, e.g. {'student': {'eval': 0.999}}"),
])
def test_mistakes_are_one_line_before_anything_is_written(tmp_path, mode, fragment):
  config = tiny_config("test_mistakes", mode=mode)
  with pytest.raises(trainer.SetupError) as e:
    trainer.train(config, str(tmp_path / "run"))
  message = str(e.value)
  assert fragment in message and "objective 'test_mistakes'" in message, message
  assert "\n" not in message
  assert not (tmp_path / "run").exists()


def test_the_correct_objective_trains(tmp_path):
  summary = trainer.train(tiny_config("test_mistakes"), str(tmp_path / "run"))
  assert summary and (tmp_path / "run" / "config.json").exists()


def _copies(cfg):
  return Objective(
      networks=(Network("teacher", init="checkpoint", trainable=None),
                Network("student", init="teacher", model=cfg.model_name or None,
                        reparameterize=cfg.reparameterize)),
      phases=(Phase("regress", loss=functools.partial(_loss, mode="ok"), trains=("student",)),),
      ema={})


if "test_copies" not in OBJECTIVES:
  register_objective("test_copies", defaults={"model_name": "", "reparameterize": False})(
      _copies)


def test_a_copy_of_a_network_named_teacher_honours_model_and_reparameterize():
  # init="teacher" reaches the earlier network named "teacher": its `model` and
  # `reparameterize` apply as they do to a copy of the teacher checkpoint.
  teacher = make_teacher(4)
  c = tiny_config("test_copies", reparameterize=True)
  c.process.name = "vp_discrete"
  c.model.prediction = "eps"
  info = Engine(c, teacher=teacher).nets["student"]
  assert (info.process.name, info.prediction) == ("vp_discrete", "eps")
  plain = Engine(tiny_config("test_copies"), teacher=teacher).nets["student"]
  assert (plain.process.name, plain.prediction) == ("rectified_flow", "flow")
  with pytest.raises(KeyError, match="mpl"):
    Engine(tiny_config("test_copies", model_name="mpl"), teacher=teacher)


def _two_nets(cfg):
  """A frozen `student` (from init.student) that a trained `learner` regresses onto."""
  del cfg

  def learner_loss(trainable, ctx, batch, rng, t):
    x = batch["x"]
    guide = ctx.call("student", x, jnp.zeros((x.shape[0],)))
    out = ctx.call("learner", x, jnp.zeros((x.shape[0],)), params=trainable["learner"])
    return jnp.mean(jnp.square(out - guide)), {}

  return Objective(networks=(Network("student", trainable=None), Network("learner")),
                   phases=(Phase("learn", loss=learner_loss, trains=("learner",)),), ema={},
                   student="learner")


if "test_frozen_init" not in OBJECTIVES:
  register_objective("test_frozen_init")(_two_nets)


def test_a_frozen_network_from_another_run_is_hash_checked_on_resume(tmp_path):
  # Frozen weights are not checkpointed: a resume reloads them from init.<net>, so that run's
  # weights must still be the ones the run started with.
  source, run = str(tmp_path / "source"), str(tmp_path / "run")
  c = tiny_config("test_mistakes")
  c.train.steps, c.checkpoint.every_steps, c.eval.at_end, c.sample.num = 2, 2, False, 0
  trainer.train(c, source)
  d = tiny_config("test_frozen_init")
  d.train.steps, d.checkpoint.every_steps, d.eval.at_end, d.sample.num = 2, 2, False, 0
  d.init = {"student": source}
  trainer.train(d, run)
  c.train.steps = 4
  trainer.train(c, source)   # the source run trains on: its latest weights differ
  d.train.steps = 4
  with pytest.raises(trainer.SetupError, match=r"the frozen student's weights changed since the "
                                               r"run started .*config key init.student"):
    trainer.train(d, run)


def test_a_zero_length_stage_stops_at_setup():
  # guided with guidance_steps=0 promoted the untrained student (zero guidance embedding) into
  # the w-teacher at step 0: an unguided student, silently.
  c = tiny_config("guided", guidance_steps=0)
  with pytest.raises(ValueError, match=r"objective 'guided': stage 0 has 0 steps; each stage "
                                       r"needs > 0"):
    Engine(c, teacher=make_teacher(4))


@pytest.mark.parametrize("keys, fragment", [
    (dict(lora_rank=-3), "'objective.lora_rank': expected >= 0"),
    (dict(lora_rank=4, lora_pattern="("), "pattern '(' is not a regular expression"),
    (dict(lora_rank=4, lora_alpha=-1.0), "alpha must be > 0"),
])
def test_lora_settings_stop_at_setup(keys, fragment):
  # a negative rank trained a full fine-tune silently; a bad pattern was a re.error traceback
  c = tiny_config("lcm", target="online", **keys)
  with pytest.raises(ValueError) as e:
    Engine(c, teacher=make_teacher(4))
  assert fragment in str(e.value)
