"""One mesh with axes (data, fsdp, tensor) and the logical-axis table every model uses.

Parameters carry logical names (`nn.with_logical_partitioning`); the rules below map them onto
mesh axes (the maxdiffusion/MaxText vocabulary, so configs transfer). A config may replace the
table with `sharding.rules = "embed=fsdp,mlp=tensor,..."`.
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or None: replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("vocab", None),
)


def parse_rules(text: str) -> tuple[tuple[str, Any], ...]:
  """'embed=fsdp,mlp=tensor,kv=' -> rules; an empty value means replicated; '+' joins axes."""
  if not text:
    return DEFAULT_RULES
  rules = dict(DEFAULT_RULES)
  for item in text.split(","):
    name, _, axis = item.partition("=")
    if name.strip() not in rules:   # a misspelt name would leave its parameters replicated
      raise ValueError(f"config key 'sharding.rules': unknown logical axis {name.strip()!r} "
                       f"(the models' axes: {', '.join(rules)})")
    axes = tuple(a for a in axis.split("+") if a)
    for a in axes:
      if a not in MESH_AXES:
        raise ValueError(f"config key 'sharding.rules': unknown mesh axis {a!r} for {name!r}")
    rules[name.strip()] = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return tuple(rules.items())


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
  """Resolves -1 (fill the rest) and checks the mesh fits `num_devices` (a mesh smaller than
  the device count uses the first devices; `launch.train` says so)."""
  sizes = [data, fsdp, tensor]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError("config keys 'mesh.*': at most one axis may be -1")
  fixed = int(np.prod([s for s in sizes if s != -1]))
  if fixed <= 0 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config keys 'mesh.*': sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    if num_devices % fixed:
      raise ValueError(f"config keys 'mesh.*': {sizes} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // fixed
  if int(np.prod(sizes)) > num_devices:
    raise ValueError(f"config keys 'mesh.*': mesh {tuple(sizes)} needs {int(np.prod(sizes))} "
                     f"devices, {num_devices} available")
  return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(data, fsdp, tensor, len(devices))
  if min(shape) > 1:
    log.warning("mesh data=%d x fsdp=%d x tensor=%d: with all three axes split, XLA computed a "
                "DiT wrongly on 8 CPU devices (jaxlib 0.10.2; tests/test_tensor_parallel.py); "
                "check the first losses against a mesh with one of them at 1", *shape)
  n = int(np.prod(shape))
  try:
    from jax.experimental import mesh_utils
    dev = mesh_utils.create_device_mesh(shape, devices=devices[:n])
  except Exception:  # CPU / uncommon topologies
    dev = np.asarray(devices[:n]).reshape(shape)
  return Mesh(dev, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a (boxed, abstract) param tree from its logical axis names."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def fit_to_shape(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
  """Drops mesh axes from dims they do not divide (small toy layers stay replicated)."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  mesh = sharding.mesh
  out = []
  for dim, axes in zip(shape, spec):
    if axes is None:
      out.append(None)
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    size = int(np.prod([mesh.shape[a] for a in names]))
    out.append(axes if dim % size == 0 else None)
  return NamedSharding(mesh, P(*out))


def tree_shardings(tree: Any, shardings: Any) -> Any:
  """fit_to_shape over matching trees of arrays/ShapeDtypeStructs and shardings."""
  return jax.tree_util.tree_map(lambda x, s: fit_to_shape(s, x.shape), tree, shardings)
