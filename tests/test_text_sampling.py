"""Text-conditioned sampling: `evaluation.generate` with prompt embeddings (and CFG against the
network's null prompt), the evaluation and sample grids of a text-to-image run, and
`launch.sample --prompt_embeds`.

A tiny SANA (rectified flow) on the synthetic source's random prompts (5 tokens x 24), as in
tests/test_text_conditioning.py. The hand-written references call the flax module directly and
step Euler in the flow velocity: x <- x + (t' - t) v on the process's own time grid.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill import config as config_lib
from distill import evaluation, trainer
from distill.engine import Engine
from tests._matching_utils import perturb, tiny_config
from tests.test_text_conditioning import SANA

L, D = 5, 24
SHAPE = (8, 8, 4)
TOL = dict(rtol=1e-4, atol=1e-5)  # float32; the sampler is jitted, the reference is not


def _config():
  c = tiny_config("denoise", batch=4)
  c.data = config_lib.ConfigDict(dict(name="synthetic", height=8, width=8, channels=4,
                                      num_classes=0, text_tokens=L, text_dim=D, pooled_dim=0))
  with c.model.ignore_type():
    for k, v in SANA.items():
      c.model[k] = v
  c.process.name = "rectified_flow"
  c.train.steps = 2
  c.train.log_every = 1
  c.checkpoint.every_steps = 0
  c.checkpoint.async_save = False
  c.eval.metric = "swd"
  c.eval.num_samples = 6
  c.eval.teacher_steps = 2
  c.eval.seed = 3
  c.sample.num = 6
  c.sample.seed = 5
  return c


@pytest.fixture(scope="module")
def tiny():
  """(engine, ctx, perturbed params of the SANA 'model'): random init moved off its zero
  projections so the prompt visibly changes the output."""
  engine = Engine(_config())
  state, frozen = engine.init_state()
  ctx = trainer.context_for(engine, state, frozen)
  return engine, ctx, perturb(state.params["model"], seed=0, scale=0.1)


def _noise(process, seed: int, n: int, batch: int) -> np.ndarray:
  """generate's noise: chunk i (of `batch` rows) from fold_in(PRNGKey(seed), i)."""
  key = jax.random.PRNGKey(seed)
  out = []
  for i in range(0, n, batch):
    k_noise, _ = jax.random.split(jax.random.fold_in(key, i))
    out.append(np.asarray(process.prior(k_noise, (min(batch, n - i),) + SHAPE)))
  return np.concatenate(out)


def _euler(info, params, noise, steps, embeds, null=None, w=1.0):
  """Euler on the flow velocity, calling the SANA module directly; CFG u + w (c - u) with the
  null prompt `null` (L, D) broadcast over the batch."""
  grid = np.asarray(info.process.timesteps(steps), np.float32)
  x = jnp.asarray(noise)

  def v(e, t):
    ts = info.process.timestep(jnp.full((x.shape[0],), t, jnp.float32))
    return info.module.apply({"params": params}, x, ts, encoder_hidden_states=e)

  for t, t_next in zip(grid[:-1], grid[1:]):
    vel = v(jnp.asarray(embeds), t)
    if null is not None:
      u = v(jnp.broadcast_to(jnp.asarray(null, jnp.float32), embeds.shape), t)
      vel = u + w * (vel - u)
    x = x + (t_next - t) * vel
  return np.asarray(x)


def test_generate_with_prompts_equals_a_hand_euler_loop(tiny):
  engine, ctx, params = tiny
  info = engine.nets["model"]
  conds = engine.source.conditions(3, 11)
  # batch 2: two chunks, the second padded; their prompt rows follow their noise rows.
  got, _ = evaluation.generate(ctx, "model", params, n=3, seed=2, solver="euler", steps=2,
                               shape=SHAPE, conds=conds, batch=2)
  want = _euler(info, params, _noise(info.process, 2, 3, 2), 2, conds["text_embeds"])
  np.testing.assert_allclose(got, want, **TOL)
  # The prompt reaches the samples: other prompts, other samples (same noise).
  other, _ = evaluation.generate(ctx, "model", params, n=3, seed=2, solver="euler", steps=2,
                                 shape=SHAPE, conds={"text_embeds": conds["text_embeds"] + 1.0},
                                 batch=2)
  assert np.abs(other - got).max() > 1e-3
  with pytest.raises(ValueError, match="'text_embeds': expected 3 rows"):
    evaluation.generate(ctx, "model", params, n=3, seed=2, solver="euler", steps=1, shape=SHAPE,
                        conds={"text_embeds": conds["text_embeds"][:2]})


def test_cfg_uses_the_networks_null_prompt(tiny):
  engine, ctx, params = tiny
  info = engine.nets["model"]
  null = np.random.default_rng(1).standard_normal((L, D)).astype(np.float32)
  with_null = ctx.replace(nets={**ctx.nets, "model": dataclasses.replace(
      info, null_inputs={"text_embeds": null})})
  conds = engine.source.conditions(3, 12)
  got, _ = evaluation.generate(with_null, "model", params, n=3, seed=4, solver="euler",
                               steps=2, shape=SHAPE, conds=conds, guidance=3.0)
  noise = _noise(info.process, 4, 3, 4096)
  want = _euler(info, params, noise, 2, conds["text_embeds"], null=null, w=3.0)
  np.testing.assert_allclose(got, want, **TOL)
  # Without a null prompt on the network: the all-zero one (another result).
  zero, _ = evaluation.generate(ctx, "model", params, n=3, seed=4, solver="euler", steps=2,
                                shape=SHAPE, conds=conds, guidance=3.0)
  np.testing.assert_allclose(zero, _euler(info, params, noise, 2, conds["text_embeds"],
                                          null=np.zeros((L, D)), w=3.0), **TOL)
  assert np.abs(zero - got).max() > 1e-3


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A finished 2-step SANA teacher run with eval at the end and sample grids."""
  w = tmp_path_factory.mktemp("text") / "run"
  summary = trainer.train(_config(), str(w))
  return w, summary


def test_text_run_writes_grids_and_eval_with_its_prompts(text_run, monkeypatch):
  w, summary = text_run
  assert os.path.getsize(summary["samples"]) > 0
  report = json.load(open(w / "eval.json"))
  assert set(report["results"]) == {"teacher_steps_1", "teacher_steps_2"}
  engine, state, frozen, step = trainer.open_run(str(w))
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)
  src, cfg = engine.source, engine.config
  # The row is the metric of samples drawn with the data's evaluation prompts.
  x, _ = evaluation.generate(ctx, "model", params["model"], n=6, seed=cfg.eval.seed + 1,
                             solver="euler", steps=2, shape=SHAPE,
                             conds=src.conditions(6, cfg.eval.seed))
  swd = evaluation.scores("swd", x, src.reference(6, cfg.eval.seed))["swd"]
  assert report["results"]["teacher_steps_2"]["swd"] == pytest.approx(swd, rel=1e-5)
  # Other prompts (same seeds): other rows, and other teacher-cache keys.
  cache: dict = {}
  same = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert same["results"]["teacher_steps_2"]["swd"] == pytest.approx(swd, rel=1e-5)
  assert len(cache) == 2 and all('"conditions"' in k for k in cache)
  # A generation chunk that splits the samples draws other noise (per chunk): other rows under
  # other keys, never the cached ones; a chunk holding every sample is the same samples.
  default_batch = cfg.eval.batch_size
  with cfg.unlocked():
    cfg.eval.batch_size = 4
  chunked = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert len(cache) == 4 and all('"batch": 4' in k for k in list(cache)[2:])
  assert chunked["results"]["teacher_steps_2"]["swd"] != pytest.approx(swd, rel=1e-3)
  with cfg.unlocked():
    cfg.eval.batch_size = 6
  whole = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert len(cache) == 4 and whole["results"] == same["results"]
  with cfg.unlocked():
    cfg.eval.batch_size = default_batch
  shifted = {"text_embeds": src.conditions(6, cfg.eval.seed)["text_embeds"] + 2.0}
  monkeypatch.setattr(src, "conditions", lambda n, seed: {k: v[:n] for k, v in shifted.items()})
  other = trainer.run_evaluation(engine, state, frozen, step, teacher_cache=cache)
  assert len(cache) == 6
  for name in ("teacher_steps_1", "teacher_steps_2"):
    assert other["results"][name]["swd"] != pytest.approx(same["results"][name]["swd"], rel=1e-3)
  # The grids sample with `source.conditions(sample.num, sample.seed)`.
  seen = []
  real = evaluation.generate
  monkeypatch.setattr(evaluation, "generate",
                      lambda *a, **k: seen.append(k["conds"]) or real(*a, **k))
  trainer.write_samples(engine, state, frozen, step, str(w))
  assert seen and all(np.array_equal(c["text_embeds"], shifted["text_embeds"][:6])
                      for c in seen)


def _sample(capsys, *args):
  from launch import sample
  rc = sample.main(list(args))
  return rc, capsys.readouterr().err


def test_launch_sample_prompt_embeds(text_run, tmp_path, capsys):
  w, _ = text_run
  engine, state, frozen, _ = trainer.open_run(str(w))
  ctx = trainer.context_for(engine, state, frozen)
  params = trainer.eval_params(engine, state, frozen)["model"]
  rng = np.random.default_rng(3)
  gen = lambda conds, n: evaluation.generate(ctx, "model", params, n=n, seed=9, solver="euler",
                                             steps=1, shape=SHAPE, conds=conds)[0]
  base = ["--workdir", str(w), "--steps", "1", "--seed", "9"]
  # A .npy of two prompts, cycled over three samples.
  embeds = rng.standard_normal((2, L, D)).astype(np.float32)
  np.save(tmp_path / "two.npy", embeds)
  rc, err = _sample(capsys, *base, "--num", "3", "--prompt_embeds", str(tmp_path / "two.npy"),
                    "--out", str(tmp_path / "a.png"))
  assert rc == 0, err
  np.testing.assert_allclose(np.load(tmp_path / "a.npy"),
                             gen({"text_embeds": embeds[[0, 1, 0]]}, 3), **TOL)
  # A caption-embedding directory (with a mask), rows 3 and 1.
  d = tmp_path / "captions"
  d.mkdir()
  caps = rng.standard_normal((4, L, D)).astype(np.float32)
  mask = np.ones((4, L), np.int32)
  mask[:, -1] = 0
  np.save(d / "embeds.npy", caps)
  np.save(d / "mask.npy", mask)
  rc, err = _sample(capsys, *base, "--num", "2", "--prompt_embeds", str(d), "--rows", "3,1",
                    "--out", str(tmp_path / "b.png"))
  assert rc == 0, err
  assert (tmp_path / "b.png").stat().st_size > 0
  np.testing.assert_allclose(np.load(tmp_path / "b.npy"),
                             gen({"text_embeds": caps[[3, 1]], "text_mask": mask[[3, 1]]}, 2),
                             **TOL)
  # Wrong shapes and rows: one line naming the file, expected vs got (end to end: exit 2).
  np.save(tmp_path / "wide.npy", rng.standard_normal((L, D + 1)).astype(np.float32))
  rc, err = _sample(capsys, *base, "--prompt_embeds", str(tmp_path / "wide.npy"))
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert rc == 2 and len(lines) == 1, err
  assert all(f in lines[0] for f in ("wide.npy", f"(5, {D + 1})", f"expected (5, {D})")), err
  from launch import sample
  np.save(tmp_path / "4d.npy", np.zeros((1, 2, L, D), np.float32))
  for path, rows, fragments in [
      (tmp_path / "4d.npy", "", ["4d.npy", "(1, 2, 5, 24)", "expected (L, D)"]),
      (d, "4", ["--rows", "4", "captions"]),
      (tmp_path / "two.npy", "1", ["--rows", "two.npy"])]:
    args = argparse.Namespace(prompt_embeds=str(path), rows=rows, num=2, seed=0)
    with pytest.raises(ValueError) as e:
      sample.run_conditions(engine.source, args)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in fragments), e.value


def test_latent_grids_are_decoded_by_eval_vae_and_written_by_the_main_process(text_run,
                                                                             monkeypatch,
                                                                             tmp_path):
  """With eval.vae, every grid panel (real latents, teacher) is the VAE's decoding of the
  latents it samples, shown in [-1, 1]; a process other than the main one samples (sampling is
  collective) but writes nothing."""
  pytest.importorskip("torch")  # models.convert reads safetensors through torch
  from distill import images
  from distill.metrics import suite
  from tests.test_eval_metrics import _vae_dir
  w, _ = text_run
  vae = _vae_dir(str(tmp_path / "vae"))
  engine, state, frozen, step = trainer.open_run(str(w), [f"eval.vae={vae}"])
  raw, shown = [], []
  real = evaluation.generate
  monkeypatch.setattr(evaluation, "generate",
                      lambda *a, **k: (lambda out: raw.append(out[0]) or out)(real(*a, **k)))
  monkeypatch.setattr(images, "save_panels", lambda path, panels: shown.append(panels))
  path = trainer.write_samples(engine, state, frozen, step, str(tmp_path / "other"),
                               is_main=False)
  assert raw and not shown and not os.path.exists(path)
  trainer.write_samples(engine, state, frozen, step, str(tmp_path / "main"))
  (panels,) = shown
  assert [t for t, _ in panels] == ["data", "teacher 2 steps"]
  for (_, x), latents in zip(panels[1:], raw[len(raw) // 2:]):
    assert x.shape == (6, 16, 16, 3)
    np.testing.assert_allclose(x, suite.decode_latents(vae, latents, 6) / 127.5 - 1.0)
  np.testing.assert_allclose(
      panels[0][1], suite.decode_latents(vae, engine.source.reference(6, 5), 6) / 127.5 - 1.0)
