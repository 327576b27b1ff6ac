"""Multi-process runs: start-up, and the few places where the processes must agree.

Every process runs the same program on its own devices; `jax.devices()` is then
global, so the ("data",) mesh spans all hosts with no other change. What needs
care is the host side: reading an array sharded across processes, writing
files once, and taking clock-based decisions (stop, checkpoint) that would
otherwise differ between processes and leave one waiting in a collective.
"""

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils


def initialize(config: ml_collections.ConfigDict) -> bool:
  """`jax.distributed.initialize` from the config when `config.distributed`; True if it ran.

  Must precede every other JAX call in the process: the backend reads the
  process's place in the cluster once, when it is created. Unset fields are
  auto-detected by JAX (SLURM, Open MPI, Cloud TPU, Kubernetes, $JAX_COORDINATOR_ADDRESS).
  """
  if not config.distributed or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(coordinator_address=config.coordinator_address or None,
                             num_processes=config.num_processes, process_id=config.process_id)
  return True


def is_primary() -> bool:
  """The process that writes logs, samples, the student bundle and result.json."""
  return jax.process_index() == 0


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """`jax.device_put` of values that every process holds alike (the teacher, a fresh state).

  `device_put` only reaches this process's devices; over several processes each
  array is built from its local shards instead.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  def put_one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # Typed keys have no numpy form.
      return jax.random.wrap_key_data(put_one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put_one, tree)


def to_host(tree: Any) -> Any:
  """`jax.device_get` that also reads arrays sharded across processes.

  Such arrays are gathered, a collective: every process must call this on the
  same arrays in the same order.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def agree(*flags: bool) -> tuple[bool, ...]:
  """Process 0's `flags` on every process (one tiny collective; free with one process).

  For decisions taken from each host's own clock: were one process to stop or
  checkpoint and another not, the other would wait forever in its next collective.
  """
  if jax.process_count() == 1:
    return tuple(bool(f) for f in flags)
  agreed = multihost_utils.broadcast_one_to_all(np.asarray(flags, np.bool_))
  return tuple(bool(f) for f in np.asarray(agreed))
