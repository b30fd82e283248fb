"""Per-phase data streams (DESIGN.md: `Phase(..., data="prompts")`): a phase reads the stream it
names, `data` being the stream "train" and `data_streams.<name>` the others, each with its own
dataset, seed and batch size, on one device and sharded over 8."""
import functools
import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from distill import config as config_lib
from distill import trainer
from distill.engine import Engine
from distill.objective import OBJECTIVES, Network, Objective, Phase, register_objective
from tests.test_train_e2e import ROOT, env

TEACHER = os.path.join(ROOT, "configs", "toy", "teacher.py")


def _loss(trainable, ctx, batch, rng, t):
  """A regression of the student's output on the batch, reporting what the batch was."""
  x = batch["x"]
  out = ctx.call("student", x, jnp.zeros((x.shape[0],)), params=trainable["student"])
  loss = jnp.mean(jnp.square(out - x))
  return loss, {"rows": jnp.asarray(x.shape[0], jnp.float32), "mean": jnp.mean(x),
                "first": x[0, 0]}


def _both_loss(trainable, ctx, batch, rng, t, *, second):
  """`_loss` on the first stream's batch, also reporting the second's (under its name)."""
  loss, metrics = _loss(trainable, ctx, batch, rng, t)
  y = batch[second]["x"]
  return loss, {**metrics, "second_rows": jnp.asarray(y.shape[0], jnp.float32),
                "second_mean": jnp.mean(y), "second_first": y[0, 0]}


def _build(cfg):
  return Objective(networks=(Network("student"),),
                   phases=(Phase("main", loss=_loss, trains=("student",)),
                           Phase("aux", loss=_loss, trains=("student",), data="aux"),
                           Phase("both", loss=functools.partial(_both_loss, second=cfg.both),
                                 trains=("student",), data=("train", cfg.both))),
                   ema={})


if "test_streams" not in OBJECTIVES:
  register_objective("test_streams", defaults={"both": "aux"})(_build)

STREAM = ["objective.name=test_streams", "model.hidden=16", "model.depth=1",
          "train.batch_size=16", "data_streams.aux.name=spiral", "data_streams.aux.batch_size=8",
          "data_streams.aux.turns=3.0", "eval.at_end=false", "sample.num=0"]


def _config(*extra):
  return trainer.prepare_config(trainer.load_config(TEACHER, [*STREAM, *extra]))


def _check_steps(engine, steps):
  """Each phase saw its own stream's global batch of the step (size, values)."""
  state, frozen = engine.init_state()
  for step in range(steps):
    state, frozen, m = engine.train_step(state, frozen, step)
    for key, stream, bs in (("main/", "train", 16), ("aux/", "aux", 8), ("both/", "train", 16),
                            ("both/second_", "aux", 8)):
      want = engine.streams[stream].batch(step, bs)["x"]
      assert float(m[f"{key}rows"]) == bs
      np.testing.assert_allclose(float(m[f"{key}mean"]), want.mean(), rtol=1e-5, atol=1e-6)
      assert float(m[f"{key}first"]) == pytest.approx(float(want[0, 0]), abs=1e-6)


def test_each_phase_reads_its_own_stream():
  c = _config()
  assert c.data_streams.aux.name == "spiral" and c.data_streams.aux.turns == 3.0
  engine = Engine(c)
  assert type(engine.streams["aux"]).__name__ == "Spiral"
  assert engine.streams["train"] is engine.source and engine.stream_batch == {"train": 16,
                                                                               "aux": 8}
  _check_steps(engine, 3)
  # Its own seed: the same dataset as a stream draws other batches than as `data`.
  same = Engine(_config("data.name=spiral", "data.turns=3.0"))
  assert not np.array_equal(same.streams["aux"].batch(0, 8)["x"],
                            same.streams["train"].batch(0, 8)["x"])


def test_a_run_records_and_resumes_its_streams(tmp_path):
  w = str(tmp_path / "run")
  trainer.train(_config("train.steps=4", "checkpoint.every_steps=2", "train.log_every=1"), w)
  with open(os.path.join(w, "config.json")) as f:
    stored = json.load(f)
  assert stored["data_streams"]["aux"]["name"] == "spiral"
  engine = Engine(_config())
  assert stored["resolved"]["data_hash"] == engine.data_hash() != engine.source.content_hash()
  # Another aux data set is another run: refused in one line before anything is written.
  with pytest.raises(trainer.SetupError, match=r"data_streams.aux.turns is 3.0 there, 2.0 here"):
    trainer.train(_config("train.steps=6", "data_streams.aux.turns=2.0"), w)
  summary = trainer.train(_config("train.steps=6", "checkpoint.every_steps=2",
                                  "train.log_every=1"), w)
  assert summary
  with open(os.path.join(w, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in rows if "aux/rows" in r] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("extra, fragment", [
    (["data_streams.aux.turnz=1.0"], "data_streams.aux.turnz: unknown key for dataset 'spiral'"),
    (["data_streams.aux.batch_size=6", "mesh.data=1", "train.grad_accum=4"],
     "config key 'data_streams.aux.batch_size': 6 does not split into 4 micro-batches"),
    (["data_streams.train.name=gmm"], "config key 'data_streams.train': 'train' is the `data` "
                                      "section's stream"),
])
def test_stream_settings_are_checked_with_the_config(extra, fragment):
  with pytest.raises(config_lib.ConfigError) as e:
    _config(*extra)
  assert fragment in str(e.value)


def test_streams_no_phase_reads_or_a_phase_lacks_stop_at_setup():
  with pytest.raises(ValueError, match=r"config key 'data_streams.extra': no phase of objective "
                                       r"'test_streams' reads it \(its phases read: aux, train\)"):
    Engine(_config("data_streams.extra.name=gmm"))
  c = trainer.prepare_config(trainer.load_config(TEACHER, [s for s in STREAM
                                                           if "data_streams" not in s]))
  with pytest.raises(ValueError, match=r"phase 'aux' reads data stream 'aux', which the config "
                                       r"does not give \(its streams: train\): add it with "
                                       r"--config.data_streams.aux.name=DATASET"):
    Engine(c)


def test_a_phase_reading_two_streams_gets_the_second_under_its_name():
  """Phase(data=("train", "aux")): the batch is train's with batch["aux"] = aux's batch (traced,
  sharded and compiled as one argument); a stream named like a key of the first stream's batch
  would hide it and stops at setup."""
  engine = Engine(_config())
  both = engine.objective.phases[2]
  assert both.streams == ("train", "aux")
  batch = engine.abstract_phase_batch(both)
  assert set(batch) == {"x", "label", "aux"} and set(batch["aux"]) == {"x", "label"}
  assert batch["x"].shape[0] == 16 and batch["aux"]["x"].shape[0] == 8
  with pytest.raises(ValueError, match=r"config key 'data_streams.label': phase 'both' reads "
                                       r"this stream under batch\['label'\], which is also a key "
                                       r"of stream 'train'"):
    Engine(_config("objective.both=label", "data_streams.label.name=spiral"))


def test_streams_shard_over_eight_devices():
  script = textwrap.dedent(f"""
      import jax
      assert jax.device_count() == 8
      from tests import test_data_streams as t
      from distill.engine import Engine
      engine = Engine(t._config("mesh.data=8"))
      batch = engine.global_batch(0, "aux")
      assert batch["x"].shape[0] == 8 and len(batch["x"].sharding.device_set) == 8
      t._check_steps(engine, 2)
      print("ok")
  """)
  p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env(8), "PYTHONPATH": ROOT},
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]


def test_a_batch_that_cannot_be_read_while_training_stops_in_one_line(tmp_path, capsys,
                                                                        monkeypatch):
  """A record the setup checks could not see (a corrupt shard) stops the run at that step with
  one line naming the data and the last good checkpoint; launch.train exits 1 with that line,
  the checkpoints already written kept."""
  from distill.data import sources, toy
  from launch import train as train_tool

  class Corrupt(toy.GMM):
    DEFAULTS = dict(toy.GMM.DEFAULTS)

    def batch(self, step, *args):
      if step >= 2:
        raise ValueError("shard 3: truncated record")
      return super().batch(step, *args)

  if "test_corrupt" not in sources.DATASETS:
    sources.register_dataset("test_corrupt")(Corrupt)
  w = tmp_path / "run"
  args = ["data.name=test_corrupt", "train.steps=5", "checkpoint.every_steps=1",
          "eval.at_end=false", "sample.num=0", "model.hidden=16", "model.depth=1"]
  with pytest.raises(trainer.TrainingError, match=r"^data \(config key 'data.name': "
                                                  r"'test_corrupt'\) at step 2: shard 3: "
                                                  r"truncated record; the last good checkpoint "
                                                  r"is step 2"):
    trainer.train(trainer.prepare_config(trainer.load_config(TEACHER, args)), str(w))
  monkeypatch.setattr(trainer, "train", lambda *a: (_ for _ in ()).throw(
      trainer.TrainingError("data at step 2: shard 3: truncated record")))
  capsys.readouterr()
  assert train_tool.main(["--config", TEACHER, "--workdir", str(w)]) == 1
  err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
  assert err == ["error: data at step 2: shard 3: truncated record"]
