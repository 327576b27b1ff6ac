r"""XLA:CPU's oneDNN switches against `cpu_kernels=tuned`, one process, calls interleaved.

  python -m benchmarks.onednn_ab --archs resnet20,resnet56 --batch 100 --repeats 7

Issue 12's last configuration idea: can XLA hand the CIFAR ResNets' convolutions (whose weight
gradients are 2-4x slower than PyTorch's oneDNN, docs/results.md) to oneDNN? Each option set
below compiles the same train-mode forward plus weight gradients (`network_breakdown`'s
"train_step"); the sets' calls alternate (A, B, C, ..., A, B, C, ...) so that they share the
machine's conditions. Prints the median ms per set, its speed against `tuned`, and the largest
gradient difference from `tuned` relative to the gradient's norm (the same maths must come out).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import network_breakdown
from caedfkd_jax.runtime import xla_cpu

_YNN, _ONEDNN = "xla_cpu_experimental_ynn_fusion_type", "xla_cpu_experimental_onednn_fusion_type"
_TUNED = xla_cpu.compiler_options("tuned", "cpu") or {}
OPTION_SETS: dict[str, dict] = {
    "tuned": _TUNED,
    "xla_default": {},
    "onednn_convolutions": {_YNN: "LIBRARY_FUSION_TYPE_REDUCE",
                            _ONEDNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    "onednn_custom_call": {**_TUNED, "xla_cpu_use_onednn": True,
                           "xla_cpu_experimental_onednn_custom_call": True},
}


def weight_grad_fns(arch: str, x_BxHxWxC: np.ndarray) -> tuple[dict, object]:
  """Per option set, a compiled train-mode weight gradient of `arch`; and its params."""
  _, variables, logits_sum = network_breakdown.model_and_logits_sum(arch, x_BxHxWxC, jnp.float32)
  x = jnp.asarray(x_BxHxWxC)
  weight_grad = jax.grad(lambda params: logits_sum(params, x, True))
  return ({name: jax.jit(weight_grad, compiler_options=options or None)
           for name, options in OPTION_SETS.items()}, variables["params"])


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archs", default="resnet20,resnet56")
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  x = np.random.default_rng(0).standard_normal((args.batch, 32, 32, 3)).astype(np.float32)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, batch {args.batch}, "
        f"median of {args.repeats} interleaved calls\n")
  print("| arch | option set | train-mode forward + weight gradients, ms | vs tuned | "
        "max abs gradient difference from tuned / gradient norm |")
  print("|---|---|---|---|---|")
  for arch in args.archs.split(","):
    fns, params = weight_grad_fns(arch, x)
    grads = {name: jax.block_until_ready(fn(params)) for name, fn in fns.items()}  # compiles
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.repeats):
      for name, fn in fns.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(params))
        times[name].append(1e3 * (time.perf_counter() - start))
    ref = jax.tree.leaves(grads["tuned"])
    norm = float(np.sqrt(sum(np.sum(np.square(g)) for g in ref)))
    for name in fns:
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(grads[name]), ref))
      ms = statistics.median(times[name])
      print(f"| {arch} | {name} | {ms:.1f} ({min(times[name]):.1f}-{max(times[name]):.1f}) | "
            f"{statistics.median(times['tuned']) / ms:.2f}x | {diff / norm:.1e} |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
