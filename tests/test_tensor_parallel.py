"""Tensor parallelism (`mesh.tensor` > 1): the demo's DiT objectives through `python -m
launch.train` on 8 fake CPU devices log the losses of one device (rtol 2e-4, as
tests/test_train_e2e.py's data/fsdp run), the attention and MLP kernels are stored split over
"tensor", and an attention kernel (run per shard in shard_map) with a head count the tensor axis
does not divide stops at setup with one line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train_e2e import ROOT, env, metrics

DEMO = os.path.join(ROOT, "configs", "demo")
TINY = ["--config.train.steps=4", "--config.train.batch_size=16", "--config.train.log_every=2",
        "--config.checkpoint.every_steps=0", "--config.eval.at_end=false",
        "--config.sample.num=0"]


def train(config, workdir, *extra, devices=1):
  return subprocess.run([sys.executable, "-m", "launch.train", "--config", config, "--workdir",
                         str(workdir), *extra], cwd=ROOT, capture_output=True, text=True,
                        timeout=600, env=env(devices))


def test_kernel_heads_not_divisible_by_tensor_axis_raise_one_line():
  """attend_heads under a context mesh: a kernel with 3 heads over tensor=2 raises naming both;
  4 heads, or XLA's attention (left to the partitioner), trace."""
  from models.dit import attend_heads
  mesh = jax.sharding.AbstractMesh((1, 1, 2), ("data", "fsdp", "tensor"))

  def trace(heads, impl):
    q = jax.ShapeDtypeStruct((2, 16, heads, 16), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
      return jax.eval_shape(lambda q: attend_heads(q, q, q, impl), q)

  with pytest.raises(ValueError, match=r"mesh.tensor=2, which does not divide 3 attention heads"):
    trace(3, "pallas")
  assert trace(4, "pallas").shape == (2, 16, 4, 16)
  assert trace(3, "xla").shape == (2, 16, 3, 16)


def test_train_with_heads_not_divisible_by_tensor_stops_at_setup(tmp_path):
  w = tmp_path / "run"
  p = train(os.path.join(DEMO, "teacher.py"), w, *TINY, "--config.model.num_layers=1",
            "--config.model.attention_head_dim=16", "--config.model.num_attention_heads=3",
            "--config.model.attention=pallas", "--config.mesh.data=1", "--config.mesh.tensor=2",
            devices=2)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and "mesh.tensor=2" in lines[0] and "3 attention heads" in lines[0], \
      p.stderr[-3000:]
  assert not w.exists()


SPLIT_PROBE = r"""
import json, sys
import jax
from distill import config as config_lib, teacher as teacher_lib, trainer
from distill.engine import Engine
c = trainer.prepare_config(config_lib.apply_overrides(config_lib.load_config_file(sys.argv[1]),
                                                      sys.argv[2:]))
e = Engine(c, teacher=teacher_lib.from_config(c))
state, _ = e.init_state()
out = {}
for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
  name = jax.tree_util.keystr(path)
  if "transformer_blocks_0" in name and name.endswith("['kernel']") and (
      "to_q" in name or "fc1" in name):
    out[name] = {"spec": [str(s) for s in leaf.sharding.spec], "shape": list(leaf.shape),
                 "shard": list(leaf.addressable_shards[0].data.shape)}
print(json.dumps(out))
"""


def _assert_same_losses(a, b):
  """Every `<phase>/<term>` of each logged line (learning rates aside) within rtol 2e-4."""
  a = [{k: v for k, v in r.items() if "/" in k and "/lr/" not in k} for r in a]
  b = [{k: v for k, v in r.items() if "/" in k and "/lr/" not in k} for r in b]
  assert len(a) == len(b) and a and all(a)
  for ra, rb in zip(a, b):
    assert set(ra) == set(rb)
    for k in ra:
      np.testing.assert_allclose(rb[k], ra[k], rtol=2e-4, atol=1e-6, err_msg=k)


MESHES = [
    pytest.param((1, 2, 2), id="fsdp2_tensor2"),
    pytest.param((2, 1, 2), id="data2_tensor2"),
    # On 8 fake CPU devices (jaxlib 0.10.2) the DiT forward itself is wrong on this mesh (max
    # error 4.6 in the outputs, GSPMD and Shardy alike) while every smaller mesh, and a
    # hand-written attention block with the same shardings, agree: an XLA miscompile, reported.
    pytest.param((2, 2, 2), id="data2_fsdp2_tensor2", marks=pytest.mark.xfail(
        strict=True, reason="XLA CPU: DiT outputs wrong on mesh (2, 2, 2), see docs/status.md")),
]


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["scm", "dmd2"])
@pytest.mark.parametrize("mesh", MESHES)
def test_tensor_parallel_demo_matches_one_device(tmp_path, objective, mesh):
  config = os.path.join(DEMO, f"{objective}.py")
  one = tmp_path / "one"
  p = train(config, one, *TINY)
  assert p.returncode == 0, p.stderr[-3000:]
  keys = [f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
          f"--config.mesh.tensor={mesh[2]}"]
  sharded = tmp_path / "sharded"
  p = train(config, sharded, *TINY, *keys, devices=8)
  assert p.returncode == 0, p.stderr[-3000:]
  cfg = json.load(open(sharded / "config.json"))
  assert cfg["resolved"]["mesh"] == dict(zip(("data", "fsdp", "tensor"), mesh))
  _assert_same_losses(metrics(one), metrics(sharded))
  probe = subprocess.run([sys.executable, "-c", SPLIT_PROBE, config, "train.batch_size=16",
                          *(k[len("--config."):] for k in keys)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env(8))
  assert probe.returncode == 0, probe.stderr[-3000:]
  kernels = json.loads(probe.stdout.strip().splitlines()[-1])
  assert kernels and any("to_q" in n for n in kernels) and any("fc1" in n for n in kernels)
  for name, k in kernels.items():   # q/k/v and MLP-in kernels: (embed, heads|mlp)
    assert k["spec"][-1] == "tensor", (name, k)
    assert k["shard"][-1] == k["shape"][-1] // 2, (name, k)
