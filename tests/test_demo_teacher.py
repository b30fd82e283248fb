"""The demo's shipped teacher (configs/demo/teacher_ckpt): it loads as a teacher, was trained
on the bundled digits by configs/demo/teacher.py, and its cached eval rows (computed when it was
shipped, reused by every demo run) show a teacher that is good in its own right."""
import json
import os

import pytest

from configs.demo import common
from distill import evaluation
from distill.config import base_config
from distill import teacher as teacher_lib
from distill.data import sources

CACHE = os.path.join(common.TEACHER, "teacher_eval.json")


def demo_source():
  """The digits exactly as the demo configs read them."""
  return sources.make_source(common.demo_eval(base_config()).data, 0)


@pytest.fixture(scope="module")
def shipped():
  with open(os.path.join(common.TEACHER, "config.json")) as f:
    return json.load(f)


def test_shipped_teacher_loads_and_matches_its_config_and_data(shipped):
  t = teacher_lib.load_teacher(common.TEACHER)
  src = demo_source()
  assert shipped["provenance"]["data_hash"] == src.content_hash()
  assert shipped["provenance"]["trained_by"] == "configs/demo/teacher.py"
  assert t.model_config["name"] == "dit" and t.num_classes == 10
  assert t.process.timestep(0.5) == pytest.approx(0.5)   # the dense time input sCM needs
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(common.TEACHER)
             for f in fs)
  assert size < 10 * 2**20   # "a few MB" in the repository


def test_cache_rows_belong_to_the_shipped_weights_and_the_demo_settings(shipped):
  """Every demo run finds the teacher rows it needs in the cache (same weights, same eval)."""
  t = teacher_lib.load_teacher(common.TEACHER)
  with open(CACHE) as f:
    cache = json.load(f)
  c = common.demo_eval(base_config())
  src = demo_source()
  for steps in (1, c.eval.teacher_steps):
    key = evaluation.teacher_row_key(
        teacher_hash=t.reference["hash"], data_hash=src.content_hash(), metric="fd",
        num_samples=c.eval.num_samples, seed=c.eval.seed, solver="euler", steps=steps,
        class_conditional=c.eval.class_conditional)
    assert key in cache


def test_teacher_is_good_in_its_own_right(shipped):
  """Its 32-step FD sits near the real-vs-real floor and it draws all ten digits; one Euler
  step is far worse (the gap distillation closes)."""
  report = shipped["provenance"]["eval"]
  rows, floor = report["results"], report["data_floor"]
  many, one = rows["teacher_steps_32"], rows["teacher_steps_1"]
  assert many["coverage"] == 1.0
  assert many["fd"] < 3.0 * floor
  assert one["fd"] > 5.0 * many["fd"]
