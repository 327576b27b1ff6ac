"""Simulated CPU devices (`--xla_force_host_platform_device_count`) at real sizes.

XLA:CPU sizes its intra-op thread pool to max(cores, devices), and each device's
program runs on a thread of that pool: with more simulated devices than cores
the pool is exactly one thread per device (8 of 8 `tf_XLAEigen` threads were
seen parked in all-reduces at once). A device parked in a collective holds its
thread, so the devices still computing have no spare thread for the pool work
they queue; at real sizes that can leave some devices never reaching the
all-reduce, and XLA aborts after 40 s ("Termination timeout for all reduce").
`reserve_intra_op_threads` doubles the pool before JAX starts its CPU backend,
which measured no slower on 2 cores.
"""

import os
import re
from collections.abc import MutableMapping

_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def simulated_device_count(xla_flags: str | None = None) -> int:
  """CPU devices that XLA_FLAGS asks XLA to simulate (1 when it asks for none)."""
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  counts = _DEVICE_COUNT_FLAG.findall(xla_flags)
  return int(counts[-1]) if counts else 1


def cpu_cores() -> int:
  """Cores this process may run on (its affinity, as XLA counts them)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def reserve_intra_op_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
  """Sets PJRT_NPROC to 2x the simulated devices when they outnumber the cores.

  XLA reads PJRT_NPROC once, when JAX creates its CPU backend, so this must run
  before the first JAX computation; a PJRT_NPROC the user set is kept. Returns
  the value set, or None when nothing was changed.
  """
  environ = os.environ if environ is None else environ
  devices = simulated_device_count(environ.get("XLA_FLAGS", ""))
  if devices <= cpu_cores() or "PJRT_NPROC" in environ:
    return None
  from jax._src import xla_bridge  # Private, but the only way to ask without starting it.
  if environ is os.environ and xla_bridge.backends_are_initialized():
    return None  # Too late for this process: its pools already exist.
  environ["PJRT_NPROC"] = str(2 * devices)
  return 2 * devices
