"""Choices that follow the platform: the activation dtype, and JAX's persistent compile cache."""

import os

import jax
import jax.numpy as jnp


def compute_dtype(name: str, platform: str | None = None):
  """The activation dtype: "auto" is bfloat16 on accelerators and float32 on CPUs.

  XLA:CPU has no fast bfloat16 convolutions, so "auto" keeps CPUs in float32.
  """
  if name == "auto":
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"compute_dtype {name!r}: use auto, float32, bfloat16 or float16") from None


def enable_compilation_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ("auto": the user cache).

  JAX fixes the directory once a process first uses the cache, so a directory
  already configured (e.g. by JAX_COMPILATION_CACHE_DIR) is kept. Returns the
  directory in use, or None when off.
  """
  current = jax.config.jax_compilation_cache_dir
  if not directory or current:
    return current or None
  if directory == "auto":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "caedfkd_jax", "xla")
  directory = os.path.abspath(os.path.expanduser(directory))
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def host_memory_bytes() -> int | None:
  """Free physical memory, where the system says (Linux); None elsewhere."""
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_memory_bytes(device) -> int | None:
  """What one device can hold: the accelerator allocator's limit, or (CPU) the host memory
  available now; None where neither is known."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  return host_memory_bytes() if device.platform == "cpu" else None
