r"""Where a framework gap comes from: one zoo network's forward and training step, JAX vs PyTorch.

  python -m benchmarks.network_breakdown --archs resnet56,resnet20 --batch 100

JAX runs once per `--cpu_kernels` choice (caedfkd_jax/runtime/xla_cpu.py), so the table shows
XLA's default CPU kernels beside the tuned ones the train steps use.

For each arch: the eval-mode forward (what the teacher does in a KD step), the input gradient
(what the teacher does in a generator step: no weight gradients) and the train-mode
forward+backward with weight gradients (what the student does), in both frameworks on the
same machine, median of --repeats calls after a warm-up call.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from caedfkd_jax import models
from caedfkd_jax.io import torch_zoo
from caedfkd_jax.runtime import xla_cpu


def median_ms(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def model_and_logits_sum(arch: str, x_BxHxWxC: np.ndarray, dtype):
  """(`arch`'s model, its variables at seed 0, logits_sum(params, x, train)): the scalar each
  timed gradient differentiates."""
  model = models.create_model(arch, 10, dtype)
  variables = model.init(jax.random.key(0), jnp.asarray(x_BxHxWxC[:1]))
  batch_stats = variables["batch_stats"]

  def logits_sum(params, x, train):
    out = model.apply({"params": params, "batch_stats": batch_stats}, x, train=train,
                      mutable=["batch_stats"] if train else False)
    return (out[0][0] if train else out[0]).sum()

  return model, variables, logits_sum


def jax_times(arch: str, x_BxHxWxC: np.ndarray, dtype, repeats: int,
              cpu_kernels: str = "tuned") -> dict[str, float]:
  model, variables, logits_sum = model_and_logits_sum(arch, x_BxHxWxC, dtype)
  params, batch_stats = variables["params"], variables["batch_stats"]
  x = jnp.asarray(x_BxHxWxC)
  jit = functools.partial(xla_cpu.jit, choice=cpu_kernels, platform=jax.default_backend())
  forward = jit(lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x)[0])
  input_grad = jit(jax.grad(lambda x: logits_sum(params, x, False)))
  train_grad = jit(jax.grad(lambda p: logits_sum(p, x, True)))
  return {"forward": median_ms(lambda: forward(params, x), repeats),
          "input_grad": median_ms(lambda: input_grad(x), repeats),
          "train_step": median_ms(lambda: train_grad(params), repeats)}


def torch_times(arch: str, x_BxHxWxC: np.ndarray, repeats: int) -> dict[str, float]:
  model = torch_zoo.build(arch, 10)
  x = torch.from_numpy(x_BxHxWxC.transpose(0, 3, 1, 2).copy())

  def forward():
    with torch.no_grad():
      return model.eval()(x)

  def input_grad():
    xg = x.clone().requires_grad_(True)
    model.eval().requires_grad_(False)(xg).sum().backward()
    return xg.grad

  def train_step():
    model.train().requires_grad_(True).zero_grad()
    model(x).sum().backward()

  return {"forward": median_ms(forward, repeats), "input_grad": median_ms(input_grad, repeats),
          "train_step": median_ms(train_step, repeats)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--archs", default="resnet56,resnet20")
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--jax_dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--cpu_kernels", default=",".join(xla_cpu.CHOICES),
                      help="JAX columns, one per XLA:CPU kernel choice (comma-separated).")
  args = parser.parse_args(argv)
  choices = args.cpu_kernels.split(",")
  x = np.random.default_rng(0).random((args.batch, 32, 32, 3), np.float32)
  print(f"batch {args.batch}, JAX {args.jax_dtype} on {jax.devices()[0].device_kind}, "
        f"PyTorch {torch.__version__} float32 ({torch.get_num_threads()} threads); ms per call")
  jax_columns = " | ".join(f"JAX {c} ms" for c in choices)
  speed_columns = " | ".join(f"JAX {c} speed" for c in choices)
  print(f"| arch | phase | {jax_columns} | PyTorch ms | {speed_columns} |")
  print("|---" * (3 + 2 * len(choices)) + "|")
  for arch in args.archs.split(","):
    ours = {c: jax_times(arch, x, jnp.dtype(args.jax_dtype), args.repeats, c) for c in choices}
    theirs = torch_times(arch, x, args.repeats)
    for phase in theirs:
      ms = " | ".join(f"{ours[c][phase]:.1f}" for c in choices)
      speed = " | ".join(f"{theirs[phase] / ours[c][phase]:.2f}x" for c in choices)
      print(f"| {arch} | {phase} | {ms} | {theirs[phase]:.1f} | {speed} |", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
