r"""Where the rest of the CPU gap sits: one 3x3 convolution's three passes, JAX against PyTorch.

  python -m benchmarks.conv_layers --batch 100

For each layer shape of the CPU pair (resnet20's three stages, resnet56's are the same, and
the generator's two large convolutions): the forward pass, the input gradient and the
weight gradient, under each `config.cpu_kernels` choice and in PyTorch, median of --repeats
calls, ms.
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.network_breakdown import median_ms
from caedfkd_jax.runtime import xla_cpu

# (height = width, in channels, out channels, the network it is from)
LAYERS = ((32, 16, 16, "student"), (16, 32, 32, "student"), (8, 64, 64, "student"),
          (16, 128, 128, "generator"), (32, 128, 64, "generator"))
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=_DIMENSIONS)


def jax_passes(x, w, dy, choice: str, repeats: int) -> dict[str, float]:
  jit = functools.partial(xla_cpu.jit, choice=choice, platform=jax.default_backend())
  forward = jit(_conv)
  input_grad = jit(lambda x, w, dy: jax.vjp(lambda x: _conv(x, w), x)[1](dy)[0])
  weight_grad = jit(lambda x, w, dy: jax.vjp(lambda w: _conv(x, w), w)[1](dy)[0])
  return {"forward": median_ms(lambda: forward(x, w), repeats),
          "input_grad": median_ms(lambda: input_grad(x, w, dy), repeats),
          "weight_grad": median_ms(lambda: weight_grad(x, w, dy), repeats)}


def torch_passes(x, w, dy, repeats: int) -> dict[str, float]:
  x, dy = (torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()) for a in (x, dy))
  w = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy())
  with torch.no_grad():
    return {
        "forward": median_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1), repeats),
        "input_grad": median_ms(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
                                 repeats),
        "weight_grad": median_ms(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1),
                                  repeats)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  print(f"batch {args.batch}, float32, {jax.devices()[0].device_kind}, PyTorch {torch.__version__} "
        f"({torch.get_num_threads()} threads); ms per call, JAX tuned / xla_default / PyTorch")
  print("| layer | forward | input gradient | weight gradient |\n|---|---|---|---|")
  rng = np.random.default_rng(0)
  for size, c_in, c_out, network in LAYERS:
    x = jnp.asarray(rng.standard_normal((args.batch, size, size, c_in), np.float32))
    w = jnp.asarray(0.1 * rng.standard_normal((3, 3, c_in, c_out), np.float32))
    dy = jnp.asarray(rng.standard_normal((args.batch, size, size, c_out), np.float32))
    ours = {c: jax_passes(x, w, dy, c, args.repeats) for c in ("tuned", "xla_default")}
    theirs = torch_passes(x, w, dy, args.repeats)
    cells = [f"{ours['tuned'][p]:.1f} / {ours['xla_default'][p]:.1f} / {theirs[p]:.1f}"
             for p in theirs]
    print(f"| {size}x{size}, {c_in} -> {c_out} ({network}) | " + " | ".join(cells) + " |",
          flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
