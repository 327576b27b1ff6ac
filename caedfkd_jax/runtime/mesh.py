"""The one ("data",) mesh: the state replicated, every batch sharded along its leading axis."""

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"   # The mesh's only axis: data parallelism.


def select_devices(num_devices: int) -> list | None:
  """The devices a run uses: all (None for 0), or the first `num_devices` of one process."""
  if not num_devices:
    return None
  if jax.process_count() > 1 or num_devices > jax.device_count():
    raise ValueError(f"config.num_devices={num_devices}: a single process has "
                     f"{jax.device_count()} devices; use 0 (all of them), which is also the only "
                     "choice multi-host.")
  return jax.devices()[:num_devices]


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), (DATA,), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def constrain_batch(tree: Any, mesh: Mesh | None) -> Any:
  """Shards the leading (batch) axis over "data": the data-parallel split (no-op without a mesh)."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P(DATA))
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)
