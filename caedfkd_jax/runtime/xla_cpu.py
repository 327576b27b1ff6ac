"""Which kernels XLA:CPU uses for the train steps and evaluation (`config.cpu_kernels`).

jaxlib 0.10's XLA:CPU hands each convolution to YNNPACK on its own. For a
convolution's weight gradient it then transposes both operands to a batch-minor
layout, and its fusion pass folds the chain that produced the input (BatchNorm,
the residual additions of earlier blocks) into that transpose: the chain is
recomputed in a cache-hostile order, once per convolution that reads it (up to
35 ms a transpose in resnet20's training step, against 0.5 ms for the transpose
alone).

"tuned" leaves convolutions to XLA's Eigen kernels and passes YNNPACK the
reductions (BatchNorm's batch statistics) and, in the student step, the elementwise
fusions, which then read the chain once instead of recomputing it. The generator
step keeps them off (`elementwise=False`): there they were slower than XLA's
default. So do `lax.scan`-fused or `jax.vmap`-ped steps (never the CPU default),
where XLA 0.10's YNNPACK elementwise fusion failed at run time ("Instruction with
unsupported layout in YNN fusion"). The maths is the same
(tests/xla_cpu_test.py holds both choices against float64). Measured in
docs/results.md ("XLA:CPU kernels for the train steps"). "xla_default" keeps
XLA's own choice. Accelerators are never affected.
"""

import functools
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CHOICES = ("tuned", "xla_default")

_YNN = "xla_cpu_experimental_ynn_fusion_type"
_TUNED = {True: {_YNN: "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_ELTWISE"},
          False: {_YNN: "LIBRARY_FUSION_TYPE_REDUCE"}}   # by `elementwise`


@functools.cache
def _accepted(option_items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib knows the options (older ones lack the YNNPACK switch)."""
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(option_items)).lower(
        jnp.float32(0)).compile()
    return True
  except Exception as error:  # An unknown option is an XlaRuntimeError; keep XLA's default.
    logging.warning("cpu_kernels='tuned' is not available in this jaxlib (%s); using XLA's "
                    "default CPU kernels.", str(error).splitlines()[0])
    return False


def compiler_options(choice: str, platform: str, elementwise: bool = True
                     ) -> dict[str, Any] | None:
  """`jax.jit` compiler options for `choice` on `platform` (None: XLA's defaults).

  `elementwise=False` keeps YNNPACK's elementwise fusions off (scanned or vmapped steps).
  """
  if choice not in CHOICES:
    raise ValueError(f"cpu_kernels={choice!r} is not one of {', '.join(CHOICES)}; "
                     "'tuned' is the measured default, 'xla_default' XLA's own choice.")
  if platform != "cpu" or choice == "xla_default":
    return None
  options = _TUNED[elementwise]
  return options if _accepted(tuple(sorted(options.items()))) else None


def jit(fn: Callable, *, choice: str, platform: str, elementwise: bool = True,
        **jit_kwargs) -> Callable:
  """`jax.jit(fn, **jit_kwargs)` compiled with `choice`'s kernels on `platform`."""
  return jax.jit(fn, compiler_options=compiler_options(choice, platform, elementwise),
                 **jit_kwargs)
