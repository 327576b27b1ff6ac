"""The DFKD methods, one file each, behind one seam (`base.Method`).

  nayer         NAYER (CVPR 2024): a noisy-layer generator on clean label embeddings, a bank.
  cae_dfkd      CAE-DFKD on the NAYER base: CEND generator inputs and the CNCL student loss.
  cmi           CMI (IJCAI 2021): a re-initialised generator on learnt z, a contrastive head.
  cae_dfkd_cmi  CAE-DFKD on the CMI base: CEND in place of z, CNCL on the student.
  cpsc_dfkd     CPSC-DFKD (PR 2023): a class-conditional generator, SupCon, no bank.
  diffdfkd      DiffDFKD (ICME 2025): teacher-guided Stable Diffusion latents, a bank.

`get(name)` returns the method that `--config.method=NAME` runs.
"""

import importlib

from caedfkd_jax.methods.base import Method

NAMES = ("cae_dfkd", "nayer", "cmi", "cae_dfkd_cmi", "cpsc_dfkd", "diffdfkd")
# (module, attribute) of a method defined beside a sibling; the rest are `<name>.METHOD`.
_DEFINED_IN = {"cae_dfkd_cmi": ("cae_dfkd", "ON_CMI")}


def get(name: str) -> Method:
  if name not in NAMES:
    raise ValueError(f"Unknown method {name!r}: --config.method takes one of {', '.join(NAMES)}.")
  module, attribute = _DEFINED_IN.get(name, (name, "METHOD"))
  return getattr(importlib.import_module(f"caedfkd_jax.methods.{module}"), attribute)
