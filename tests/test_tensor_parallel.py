"""Tensor parallelism (`mesh.tensor` > 1): an attention kernel (run per shard in shard_map)
with a head count the tensor axis does not divide stops at setup with one line."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tests.test_train_e2e import ROOT, env

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
