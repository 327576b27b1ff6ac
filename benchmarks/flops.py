"""FLOP counts and the peak rates model-FLOPs utilisation (MFU) is measured against.

FLOPs come from XLA's cost analysis of the lowered step. It counts a
multiply-add as 2 FLOPs and skips the taps that fall on a convolution's zero
padding, so for 32x32 CIFAR ResNets it reads about 8% under the textbook
2 x MACs: MFU computed from it is, if anything, an understatement.
"""

import time

import jax
import jax.numpy as jnp

# Dense bf16 peak of one chip from its datasheet, TFLOP/s (no sparsity), by device_kind prefix.
DATASHEET_BF16_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,   # SXM; the PCIe card is 756.
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "NVIDIA RTX 3090": 71.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
}


def lowered_flops(lowered) -> float | None:
  """XLA's FLOP count of a `jax.jit(...).lower(...)` result, or None where XLA gives none.

  XLA:CPU counts the unoptimised module. XLA:GPU (jax 0.11.2, H100) gives no count before
  compiling, and after compiling counts none of the convolutions it hands to cuDNN, so on GPUs
  the benchmark counts the same step lowered for the CPU instead (dfkd_benchmark's `flops` side).
  """
  analysis = lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis["flops"]) if analysis and "flops" in analysis else None


def datasheet_peak(device: jax.Device) -> float | None:
  """Peak bf16 FLOP/s of one device from DATASHEET_BF16_TFLOPS, or None if unknown."""
  for prefix, tflops in DATASHEET_BF16_TFLOPS.items():
    if device.device_kind.startswith(prefix):
      return tflops * 1e12
  return None


def measured_matmul_peak(dtype=jnp.float32, size: int | None = None, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul on the default device: the ceiling actually reachable.

  8192 x 8192 on accelerators, 2048 on CPUs (seconds, not minutes). Median of `repeats`.
  """
  platform = jax.default_backend()
  size = size or (8192 if platform != "cpu" else 2048)
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    times.append(time.perf_counter() - start)
  times.sort()
  return 2 * size**3 / times[len(times) // 2]
