"""`caedfkd export`: a model bundle -> a PyTorch or safetensors state dict.

Keys are those of the source zoo (the `module.` prefix recorded at conversion
included), so the file loads strictly into the original PyTorch network; a
distilled student exports the same way with no prefix.
"""

import argparse
import os
from typing import Mapping

import numpy as np

from caedfkd_jax.io import bundle as bundle_lib, convert

FORMATS = ("torch", "safetensors")
_SUFFIX_FORMAT = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch",
                  ".th": "torch", ".bin": "torch"}


def bundle_state_dict(directory: str | os.PathLike
                      ) -> tuple[dict[str, np.ndarray], bundle_lib.ModelSpec]:
  """The bundle's variables as the source zoo's state dict (numpy), and its spec."""
  loaded = bundle_lib.load_bundle(os.fspath(directory))
  spec = loaded.spec
  state_dict = convert.variables_to_state_dict(
      loaded.variables, spec.arch, spec.num_classes,
      prefix=spec.extra.get("key_prefix", ""), image_size=spec.image_size)
  return state_dict, spec


def save_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, out: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> str:
  """Writes `state_dict` as `fmt` to `out` (atomically) and returns the path."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  out = os.path.abspath(os.fspath(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = out + ".tmp"
  arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  if fmt == "torch":
    torch = convert.import_torch()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, tmp)
  else:
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"writing safetensors needs safetensors: "
                        f"{convert.TORCH_EXTRA_HINT}") from e
    safetensors_numpy.save_file(arrays, tmp, metadata=dict(metadata or {}))
  os.replace(tmp, out)
  return out


def _metadata(spec: bundle_lib.ModelSpec) -> dict[str, str]:
  # "format": "pt" tells safetensors readers the layout is PyTorch's.
  return {"format": "pt", "arch": spec.arch, "num_classes": str(spec.num_classes)}


def export_bundle(directory: str | os.PathLike, fmt: str, out: str | os.PathLike) -> str:
  """Bundle -> state dict file in `fmt`; returns the path written."""
  state_dict, spec = bundle_state_dict(directory)
  return save_state_dict(state_dict, fmt, out, _metadata(spec))


def _format_for(out: str, fmt: str | None) -> str:
  if fmt:
    return fmt
  suffix = os.path.splitext(out)[1].lower()
  if suffix not in _SUFFIX_FORMAT:
    raise ValueError(f"cannot tell the format of {out} from its suffix; "
                     f"pass --format {' or --format '.join(FORMATS)}.")
  return _SUFFIX_FORMAT[suffix]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("bundle", metavar="DIR", help="model bundle directory")
  parser.add_argument("--format", choices=FORMATS, default=None,
                      help="torch (torch.save of the state dict) or safetensors; "
                      "default: from the suffix of --out (.safetensors, .pt/.pth/.th)")
  parser.add_argument("--out", required=True, metavar="FILE", help="file to write")


def run(args: argparse.Namespace) -> int:
  fmt = _format_for(args.out, args.format)
  state_dict, spec = bundle_state_dict(args.bundle)
  out = save_state_dict(state_dict, fmt, args.out, _metadata(spec))
  prefix = spec.extra.get("key_prefix", "")
  print(f"exported {args.bundle} ({spec.arch}, {spec.num_classes} classes) as {fmt}: "
        f"{len(state_dict)} tensors" + (f", keys prefixed {prefix!r}" if prefix else ""))
  print(f"  written to {out}")
  return 0
