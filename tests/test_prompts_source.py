"""The `prompts` source: caption embeddings without images for the data-free objectives (VSD /
SwiftBrush, SiD-LSG, DMD2 without its GAN term). Its batches follow the determinism contract of
every source (each caption once per epoch, process slices that concatenate to the global
batch), a data-free objective trains from it, and everything that needs real images (an
objective with a GAN or data term, an evaluation) is refused with one line."""
from __future__ import annotations

import numpy as np
import pytest

from distill import config as config_lib
from distill import evaluation
from distill.data import sources
from distill.engine import Engine
from distill.metrics.suite import MetricError
from tests.test_text_conditioning import SANA, _config, sana_teacher

C, L, D, P = 10, 5, 24, 6


def _caption_dir(tmp_path, pooled: bool = True, seed: int = 0):
  rng = np.random.default_rng(seed)
  d = tmp_path / f"prompts{seed}"
  d.mkdir()
  np.save(d / "embeds.npy", rng.standard_normal((C, L, D)).astype(np.float32))
  np.save(d / "mask.npy", (rng.random((C, L)) < 0.8).astype(np.float32))
  np.save(d / "null.npy", rng.standard_normal((L, D)).astype(np.float32))
  if pooled:
    np.save(d / "pooled.npy", rng.standard_normal((C, P)).astype(np.float32))
    np.save(d / "null_pooled.npy", rng.standard_normal((P,)).astype(np.float32))
  return str(d)


def _source(path, seed=3, **keys):
  cfg = config_lib.ConfigDict({"name": "prompts", "text_embeds": path, "shape": (4, 4, 4),
                               **keys})
  return sources.make_source(cfg, seed)


def test_batches_are_the_captions_once_per_epoch_and_split_by_process(tmp_path):
  path = _caption_dir(tmp_path)
  src = _source(path, time_ids=32)
  embeds, pooled = np.load(f"{path}/embeds.npy"), np.load(f"{path}/pooled.npy")
  seen = []
  for step in range(5):   # 5 steps of 2 = one epoch of the 10 captions
    b = src.batch(step, 2)
    assert set(b) == {"x", "text_embeds", "text_mask", "pooled_text_embeds", "time_ids"}
    assert b["x"].shape == (2, 4, 4, 4) and not b["x"].any()
    np.testing.assert_array_equal(b["time_ids"], [[32, 32, 0, 0, 32, 32]] * 2)
    ids = [int(np.flatnonzero((embeds == row).all(axis=(1, 2)))[0]) for row in b["text_embeds"]]
    np.testing.assert_array_equal(b["pooled_text_embeds"], pooled[ids])
    seen += ids
  assert sorted(seen) == list(range(C))
  whole = src.batch(7, 4)
  halves = [src.batch(7, 4, process_index=p, process_count=2) for p in range(2)]
  for k in whole:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
  np.testing.assert_array_equal(_source(path, time_ids=32).batch(7, 4)["text_embeds"],
                                whole["text_embeds"])   # a pure function of (seed, step)
  assert set(src.null_inputs()) == {"text_embeds", "pooled_text_embeds"}
  cond = src.conditions(6, seed=1)
  assert cond["text_embeds"].shape == (6, L, D) and "x" not in cond
  np.testing.assert_array_equal(src.conditions(6, seed=1)["text_embeds"], cond["text_embeds"])
  other = _source(_caption_dir(tmp_path, seed=1))
  assert src.content_hash() == _source(path).content_hash() != other.content_hash()


@pytest.mark.parametrize("keys,fragment", [
    ({"text_embeds": ""}, "data.text_embeds"),
    ({"shape": ()}, "data.shape"),
    ({"null_prompt": "empty"}, "data.null_prompt"),
    ({"time_ids": -1}, "data.time_ids"),
])
def test_bad_settings_name_the_key(tmp_path, keys, fragment):
  cfg = {"text_embeds": _caption_dir(tmp_path), **keys}
  with pytest.raises(ValueError, match=fragment):
    _source(cfg.pop("text_embeds"), **cfg)


def _prompts_config(objective, path, **keys):
  c = _config(objective, SANA, "rectified_flow", **keys)
  c.data = config_lib.ConfigDict({"name": "prompts", "text_embeds": path, "shape": (8, 8, 4),
                                  "null_prompt": "file", "time_ids": 0})
  c.eval.at_end = False
  c.sample.num = 0
  return c


def test_data_free_objectives_train_from_prompts_and_the_rest_are_refused(tmp_path):
  path = _caption_dir(tmp_path, pooled=False)
  teacher = sana_teacher()
  # SwiftBrush: the LoRA fake score on the attention projections
  engine = Engine(_prompts_config("vsd", path, lora_pattern="attn"), teacher=teacher)
  state, frozen = engine.init_state()
  import jax
  for step in range(2):
    state, frozen, m = engine.train_step(state, frozen, step)
    assert all(np.isfinite(float(v)) for v in jax.device_get(m).values())
  Engine(_prompts_config("sid", path), teacher=teacher)   # SiD-LSG: no GAN term
  refused = [("sid", {"gan_weight": 0.01}), ("dmd2", {"gan_weight": 0.003}),
             ("scm", {}), ("denoise", {})]
  for objective, keys in refused:
    with pytest.raises(ValueError, match="'data.name': 'prompts' serves prompts without images"):
      Engine(_prompts_config(objective, path, **keys), teacher=teacher)
  cfg = _prompts_config("vsd", path, lora_pattern="attn")
  cfg.eval.at_end = True
  with pytest.raises(ValueError, match="eval.at_end"):
    Engine(cfg, teacher=teacher)
  with pytest.raises(MetricError, match="no reference images"):
    evaluation.evaluate(ctx=None, source=engine.source, params={}, step=0, student="student",
                        student_role="student", student_solver="euler", student_steps=(1,),
                        teacher=None, teacher_steps=1, num_samples=4, seed=0)


def test_a_run_is_evaluated_on_another_data_set(tmp_path):
  """`launch.evaluate --config.data.name=<other>` (how a prompts-trained run is scored against
  latents): the run's own data keys are dropped, the new data set's defaults and data.*
  overrides apply, and its keys are still checked."""
  from distill import trainer
  from tests import _matching_utils as mu
  run = mu.shared_tiny_teacher("moons", 20)
  engine, state, frozen, step = trainer.open_run(run, ["data.name=spiral", "data.turns=2.0",
                                                       "eval.num_samples=64"])
  assert engine.config.data.name == "spiral" and engine.config.data.turns == 2.0
  report = trainer.run_evaluation(engine, state, frozen, step)
  assert report["results"]["teacher_steps_1"]["swd"] > 0
  with pytest.raises(config_lib.ConfigError, match="data.modes"):
    trainer.open_run(run, ["data.name=spiral", "data.modes=3"])
  # A data set with other classes changes the networks: said as such, not "no checkpoint".
  with pytest.raises(FileNotFoundError, match="fits this config"):
    trainer.open_run(run, ["data.name=spiral", "data.arms=3"])
