"""Networks with mutable collections (batch statistics) keep them in the state; losses return
their updates, and a skipped (non-finite) step keeps the old statistics."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill.objective import Network, Objective, Phase, register_objective, OBJECTIVES
from models.registry import MODELS, register_model
from tests.test_engine_phases import Engine, tiny_config


if "test_bn_mlp" not in MODELS:
  @register_model("test_bn_mlp")
  class BNMLP(nn.Module):
    dim: int = 2

    @nn.compact
    def __call__(self, x, timestep, class_labels=None, *, train: bool = False):
      h = nn.Dense(8)(x)
      h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(h)
      return nn.Dense(self.dim)(nn.relu(h))


def build(cfg):
  def loss(trainable, ctx, batch, rng, t):
    out, updates = ctx.call("net", batch["x"], jnp.zeros(batch["x"].shape[:1]),
                            params=trainable["net"], train=True, mutable=["batch_stats"])
    return jnp.mean(jnp.square(out)), {}, {"net": updates}
  return Objective(networks=(Network("net"),), phases=(Phase("p", loss, trains=("net",)),))


def test_batch_stats_live_in_state_and_update():
  if "test_bn" not in OBJECTIVES:
    register_objective("test_bn")(build)
  c = tiny_config("test_bn", steps=2)
  with c.unlocked():
    c.model = {"name": "test_bn_mlp", "prediction": "flow"}
  engine = Engine(c)
  state, frozen = engine.init_state()
  mean0 = np.asarray(state.model_state["net"]["batch_stats"]["BatchNorm_0"]["mean"])
  np.testing.assert_array_equal(mean0, 0.0)
  state, frozen, _ = engine.train_step(state, frozen, 0)
  mean1 = np.asarray(state.model_state["net"]["batch_stats"]["BatchNorm_0"]["mean"])
  assert np.abs(mean1).max() > 0
