"""Shared helpers of tests/test_dmd2.py, test_sid.py and test_vsd.py.

- `make_teacher`: an in-memory toy teacher (random MLP weights, rectified flow, "flow" kind).
- `make_engine` / `phase_context`: an Engine for an objective and the (trainable, ctx) a phase's
  loss sees, exactly as the engine's step builds them.
- `TorchMLP`: a PyTorch port of models/mlp.py's MLPDenoiser reading the same (flax) weights,
  so a PyTorch reference of a loss runs the very same networks.
- `gaussian_context`: a Context whose networks are closed-form: the exact x0 of Gaussian data
  N(mu, s^2 I) (teacher), of the generator's N(m, v^2 I) (fake score), and the generator
  x = m + v z itself (params {"m", "log_v"}).
- `run_train` / `metrics`: `python -m launch.train` in a subprocess (as tests/test_train_e2e.py).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill import config as config_lib
from distill import context as ctx_lib
from distill import processes as procs
from distill import teacher as teacher_lib
from distill.engine import Engine
import distill.objectives  # noqa: F401
import models.all  # noqa: F401
from models.mlp import MLPDenoiser

from tests.test_train_e2e import ROOT, TEACHER as TEACHER_CONFIG, env, metrics  # noqa: F401

MLP_KW = dict(dim=2, hidden=16, depth=2, mlp_ratio=1, time_embed_dim=16, time_scale=1.0)


# --------------------------------------------------------------------------------------------
# In-memory teacher and engine
# --------------------------------------------------------------------------------------------


def make_teacher(num_classes: int = 4, seed: int = 0, scale: float = 0.3, **kw):
  """A Teacher with seeded N(0, scale^2) MLP weights (no PRNG compiles), rectified flow."""
  cfg = dict(MLP_KW, num_classes=num_classes, **kw)
  module = MLPDenoiser(**cfg)
  x = jnp.zeros((1, cfg["dim"]))
  t = jnp.zeros((1,))
  extra = {"class_labels": jnp.zeros((1,), jnp.int32)} if num_classes else {}
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, t, **extra))["params"]
  rng = np.random.default_rng(seed)
  params = jax.tree_util.tree_map(
      lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  process = procs.make_process("rectified_flow")
  model_config = {"name": "mlp", "prediction": "flow", **cfg, "dtype": "float32",
                  "param_dtype": "float32", "extra_time_input": False, "guidance_embed": False,
                  "guidance_scale": 1.0}
  return teacher_lib.Teacher(module=module, params=params, model_config=model_config,
                             process=process, prediction="flow", num_classes=num_classes,
                             reference={"path": "memory", "step": 0, "hash": "", "params": "raw"})


def tiny_config(objective: str, data: str = "gmm", batch: int = 16, **objective_keys):
  c = config_lib.base_config()
  c.objective.name = objective
  from distill.objective import OBJECTIVES
  for k, v in OBJECTIVES.get(objective).defaults.items():
    c.objective[k] = v
  for k, v in objective_keys.items():
    with c.ignore_type():
      c.objective[k] = v
  c.data.name = data
  if data == "gmm":
    c.data.modes = 4
    c.data.radius = 2.0
    c.data.std = 0.2
    c.data.normalize = False
  c.train.steps = 10
  c.train.batch_size = batch
  c.optim.lr = 1e-3
  return c


def make_engine(objective: str, teacher=None, data: str = "gmm", batch: int = 16,
                **objective_keys):
  teacher = teacher if teacher is not None else make_teacher(4 if data == "gmm" else 0)
  engine = Engine(tiny_config(objective, data, batch, **objective_keys), teacher=teacher)
  state, frozen = engine.init_state()
  return engine, state, frozen


def phase_context(engine, state, frozen, trains):
  """(trainable, ctx) of a phase training `trains`, as the engine's step builds them."""
  trainable = {n: state.params[n] for n in trains}
  others = {n: v for n, v in state.params.items() if n not in trains}
  others.update(frozen)
  ctx = ctx_lib.Context(params=others, ema=state.ema, model_state=state.model_state,
                        nets=engine.nets, mesh=engine.mesh)
  return trainable, ctx


def perturb(tree, seed: int, scale: float = 0.05):
  """tree + N(0, scale^2) noise (so copies of the teacher differ from it)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(np.shape(a)),
                            jnp.float32), tree)


# --------------------------------------------------------------------------------------------
# PyTorch port of the MLP
# --------------------------------------------------------------------------------------------


def flat_params(tree) -> dict:
  """{'a/b/kernel': np.ndarray} of a flax param tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v) for p, v in flat}


def unflat(like, flat: dict):
  """A tree shaped like `like` from {'a/b/kernel': array}."""
  paths = jax.tree_util.tree_flatten_with_path(like)[0]
  treedef = jax.tree_util.tree_structure(like)
  leaves = [flat["/".join(str(getattr(k, "key", k)) for k in p)] for p, _ in paths]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def torch_params(tree, requires_grad: bool = False) -> dict:
  import torch
  return {k: torch.tensor(v, dtype=torch.float32, requires_grad=requires_grad)
          for k, v in flat_params(tree).items()}


def torch_lora_merge(base: dict, lora: dict, scale: float) -> dict:
  """base kernels + (A @ B) * scale where the LoRA tree has an adapter."""
  out = dict(base)
  for k, a in lora.items():
    if k.endswith("/lora_A"):
      stem = k[: -len("/lora_A")]
      out[stem] = base[stem] + (a @ lora[stem + "/lora_B"]) * scale
  return out


class TorchMLP:
  """models/mlp.py's MLPDenoiser in PyTorch, reading weights {flax path: tensor}."""

  def __init__(self, depth: int, hidden: int, num_classes: int, time_embed_dim: int,
               time_scale: float = 1.0):
    self.depth, self.hidden, self.num_classes = depth, hidden, num_classes
    self.time_embed_dim, self.time_scale = time_embed_dim, time_scale

  @staticmethod
  def _dense(p, name, x):
    return x @ p[name + "/kernel"] + p[name + "/bias"]

  @staticmethod
  def _ln(p, name, x):
    import torch
    return torch.nn.functional.layer_norm(x, x.shape[-1:], p[name + "/scale"], p[name + "/bias"],
                                          eps=1e-6)

  def __call__(self, p, x, timestep, labels=None, feature_block=None):
    import torch
    F = torch.nn.functional
    half = self.time_embed_dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = (timestep * self.time_scale)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = self._dense(p, "time_embed/fc2", F.silu(self._dense(p, "time_embed/fc1", emb)))
    if self.num_classes:
      if labels is None:
        labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long)
      c = c + p["class_embed/embedding"][labels]
    h = self._dense(p, "in_proj", x)
    feats = None
    for i in range(self.depth):
      b = f"block_{i}"
      y = self._dense(p, b + "/fc1", self._ln(p, b + "/norm", h))
      y = y + self._dense(p, b + "/cond", F.silu(c))
      h = h + self._dense(p, b + "/fc2", F.silu(y))
      if feature_block is not None and i == feature_block % self.depth:
        feats = h
    out = self._dense(p, "out_proj", F.silu(self._ln(p, "out_norm", h)))
    return (out, feats) if feature_block is not None else out


def torch_mlp(teacher) -> TorchMLP:
  c = teacher.model_config
  return TorchMLP(c["depth"], c["hidden"], c["num_classes"], c["time_embed_dim"],
                  c["time_scale"])


def torch_head(p, feats):
  """The "gan_head" model in PyTorch."""
  import torch
  F = torch.nn.functional
  h = F.layer_norm(feats, feats.shape[-1:], p["norm/scale"], p["norm/bias"], eps=1e-6)
  h = F.silu(h @ p["fc1/kernel"] + p["fc1/bias"])
  return (h @ p["fc2/kernel"] + p["fc2/bias"])[:, 0]


def step_labels(batch, gen_draws, num_classes: int = 4):
  """The step's labels in torch: batch labels, null (= num_classes) where gen_draws["null"]."""
  import torch
  labels = n2t(batch["label"])
  if "null" in gen_draws:
    labels = torch.where(n2t(gen_draws["null"]).bool(), torch.full_like(labels, num_classes),
                         labels)
  return labels


def t2n(x):
  return x.detach().numpy()


def n2t(x, dtype=None):
  import torch
  a = np.asarray(x)
  if a.dtype.kind in "iub":
    return torch.tensor(a.astype(np.int64))
  return torch.tensor(a.astype(np.float32))


# rectified-flow conversions in torch (teacher kind "flow", t in [0, 1], timestep 1000 t)
def rf_x0(flow, x_t, t):
  return x_t - t[:, None] * flow


def rf_eps(flow, x_t, t):
  return x_t + (1.0 - t[:, None]) * flow


# --------------------------------------------------------------------------------------------
# Closed-form Gaussian networks
# --------------------------------------------------------------------------------------------


def gaussian_posterior_x0(x_t, t, mean, var):
  """E[x0 | x_t] for x0 ~ N(mean, var I) under rectified flow x_t = (1 - t) x0 + t eps."""
  a = (1.0 - t)[:, None]
  s = t[:, None]
  k = a * var / (a * a * var + s * s)
  return mean + k * (x_t - a * mean)


def gaussian_context(mu, s, *, dim, fake=None, num_classes=0):
  """A Context with closed-form "teacher" (data N(mu, s^2)), "fake_score" (N(m, v^2) for
  fixed `fake=(m, v)`, or reading the generator's params when None) and "student" (x = m + v z
  at t_max) networks, all predicting x0 under rectified flow (timestep = 1000 t)."""
  process = procs.make_process("rectified_flow")

  def teacher_fn(variables, x, timestep, class_labels=None):
    return gaussian_posterior_x0(x, timestep / 1000.0, jnp.asarray(mu), s * s)

  def fake_fn(variables, x, timestep, class_labels=None):
    p = variables["params"]
    return gaussian_posterior_x0(x, timestep / 1000.0, p["m"], jnp.exp(2 * p["log_v"]))

  def student_fn(variables, z, timestep, class_labels=None):
    p = variables["params"]
    return p["m"] + jnp.exp(p["log_v"]) * z

  def info(name, fn):
    return ctx_lib.NetInfo(name=name, module=None, prediction="x0", process=process,
                           num_classes=num_classes, apply_fn=fn)
  nets = {"teacher": info("teacher", teacher_fn), "fake_score": info("fake_score", fake_fn),
          "student": info("student", student_fn)}
  params = {"teacher": {}}
  if fake is not None:
    params["fake_score"] = {"m": jnp.asarray(fake[0], jnp.float32),
                            "log_v": jnp.asarray(np.log(fake[1]), jnp.float32)}
  return nets, params


def closed_form_context(teacher_fn, student_fn, *, num_classes: int = 0, ema: bool = False):
  """A Context of two closed-form x0-predicting networks under rectified flow (timestep =
  1000 t): "teacher" (no params) and "student" (its params are the loss's trainable tree);
  `ema` gives the student an (empty) `eval` EMA role, the target of EMA-target losses."""
  process = procs.make_process("rectified_flow")

  def info(name, fn):
    return ctx_lib.NetInfo(name=name, module=None, prediction="x0", process=process,
                           num_classes=num_classes, apply_fn=fn)
  return ctx_lib.Context(params={"teacher": {}}, ema={"student": {"eval": {}}} if ema else {},
                         model_state={}, nets={"teacher": info("teacher", teacher_fn),
                                               "student": info("student", student_fn)})


# --------------------------------------------------------------------------------------------
# Subprocess runs
# --------------------------------------------------------------------------------------------


def train_cmd(config: str, workdir, *extra):
  return [sys.executable, "-m", "launch.train", "--config", config, "--workdir", str(workdir),
          *extra]


def run_train(config: str, workdir, *extra, devices: int = 1, timeout: int = 600):
  proc = subprocess.run(train_cmd(config, workdir, *extra), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=env(devices))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def check_killed_stages_resume_exactly(config: str, tmp_path, args, kill_steps, term: str,
                                       stages) -> None:
  """A staged run SIGKILLed once a checkpoint of each of `kill_steps` exists, then resumed, logs
  the (step, stage, `term`) rows of an uninterrupted run exactly, `stages` (the stage of each
  logged step) among them."""
  from tests.test_train_e2e import kill_after_checkpoint  # pylint: disable=import-outside-toplevel
  run_train(config, tmp_path / "ref", *args)
  w = tmp_path / "killed"
  for step in kill_steps:
    kill_after_checkpoint(train_cmd(config, w, *args), w, step)
  last = run_train(config, w, *args)
  assert "resumed from step" in last.stdout + last.stderr
  rows = lambda d: [(r["step"], r["stage"], r[term]) for r in metrics(d)]
  want = rows(tmp_path / "ref")
  assert [s for _, s, _ in want] == list(stages)
  assert rows(w) == want


def check_sharded_losses(config: str, tmp_path, args, losses, required) -> None:
  """The run on 8 fake CPU devices (data=4, fsdp=2) logs the same `losses(rows)` as on 1 device
  (rtol 2e-4: the sharded reductions sum in another order), with every `required` key logged."""
  run_train(config, tmp_path / "one", *args)
  run_train(config, tmp_path / "eight", *args, "--config.mesh.data=4", "--config.mesh.fsdp=2",
            devices=8)
  a, b = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [5, 10]
  for ra, rb in zip(losses(a), losses(b)):
    assert all(k in ra for k in required), ra
    for k in ra:
      np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=1e-6, err_msg=k)


def phase_losses(rows):
  """The `<phase>/loss` values of metrics rows (what sharded runs compare)."""
  return [{k: v for k, v in r.items() if k.endswith("/loss")} for r in rows]


TINY_TEACHER = ["--config.model.hidden=32", "--config.model.depth=2",
                "--config.train.batch_size=128", "--config.eval.num_samples=512",
                "--config.eval.teacher_steps=16", "--config.sample.num=64",
                "--config.optim.warmup_steps=10", "--config.checkpoint.every_steps=0"]


def train_tiny_teacher(workdir, data: str = "gmm", steps: int = 20, *extra):
  """A small toy teacher run directory (`steps` denoise steps)."""
  run_train(f"{TEACHER_CONFIG}:{data}", workdir, *TINY_TEACHER, f"--config.train.steps={steps}",
            "--config.train.log_every=10", "--config.eval.at_end=false", *extra)
  return str(workdir)


_SHARED_TEACHERS: dict = {}


def shared_tiny_teacher(data: str = "gmm", steps: int = 20, *extra) -> str:
  """`train_tiny_teacher`'s run directory, trained once per test process for these arguments
  and shared by every test asking for the same teacher (they only read it as
  `teacher.checkpoint`); removed when the process exits."""
  key = (data, int(steps)) + tuple(extra)
  if key not in _SHARED_TEACHERS:
    import atexit  # pylint: disable=import-outside-toplevel
    import shutil  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    root = tempfile.mkdtemp(prefix="shared_teacher_")
    atexit.register(shutil.rmtree, root, True)
    _SHARED_TEACHERS[key] = train_tiny_teacher(os.path.join(root, "teacher"), data, steps,
                                               *extra)
  return _SHARED_TEACHERS[key]


def check_toy_run(config: str, tmp_path, steps: int, *extra, min_fraction: float = 0.6,
                  student_steps: int = 1, teacher_steps: int = 600):
  """Trains a small spiral teacher (hidden 64, `teacher_steps` steps), distils it for `steps`
  steps and checks the `student_steps`-step student closes `min_fraction` of the teacher's 1 vs
  16-step SWD gap and that its weights differ from the teacher's. Returns the eval results."""
  from distill import checkpoint as ckpt
  teacher = shared_tiny_teacher("spiral", teacher_steps, "--config.model.hidden=64",
                                "--config.optim.lr=2e-3")
  w = tmp_path / "student"
  run_train(f"{config}:spiral", w, f"--config.teacher.checkpoint={teacher}",
            f"--config.train.steps={steps}", "--config.train.batch_size=128",
            "--config.eval.num_samples=1024", "--config.eval.teacher_steps=16",
            f"--config.eval.steps=({student_steps},)", "--config.sample.num=64",
            "--config.checkpoint.every_steps=0", *extra)
  with open(os.path.join(w, "eval.json")) as f:
    r = json.load(f)["results"]
  t1, tn, s1 = (r["teacher_steps_1"]["swd"], r["teacher_steps_16"]["swd"],
                r[f"student_steps_{student_steps}"]["swd"])
  assert (t1 - s1) / (t1 - tn) >= min_fraction, r
  _, tree = ckpt.restore_raw(str(w / "checkpoints"))
  student = tree["state"]["params"]["student"]
  _, ttree = ckpt.restore_raw(os.path.join(teacher, "checkpoints"))
  tparams = ttree["state"]["ema"]["model"]["eval"]
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree_util.tree_leaves(student),
                             jax.tree_util.tree_leaves(tparams)))
  assert diff > 1e-3
  return r
