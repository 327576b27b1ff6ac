"""The DFKD methods, one file each, behind one seam (`base.Method`).

  nayer      NAYER (CVPR 2024): a noisy-layer generator on clean label embeddings, a bank.
  cae_dfkd   CAE-DFKD on the NAYER base: CEND generator inputs and the CNCL student loss.

`get(name)` returns the method that `--config.method=NAME` runs.
"""

import importlib

from caedfkd_jax.methods.base import Method

NAMES = ("cae_dfkd", "nayer")


def get(name: str) -> Method:
  if name not in NAMES:
    raise ValueError(f"Unknown method {name!r}: --config.method takes one of {', '.join(NAMES)}.")
  return importlib.import_module(f"caedfkd_jax.methods.{name}").METHOD
