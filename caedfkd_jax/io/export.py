"""`caedfkd export`: a model bundle -> a PyTorch or safetensors state dict.

Keys are those of the source zoo (the `module.` prefix recorded at conversion
included), so the file loads strictly into the original PyTorch network; a
distilled student exports the same way with no prefix.
"""

import argparse
import os
import sys
from typing import Mapping

import numpy as np

from caedfkd_jax.io import atomic_files, bundle as bundle_lib, convert

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
  """Writes `state_dict` as `fmt` to `out` (atomically, mode 0666 less the umask) and returns
  the path; a file already at `out` is replaced (the command refuses that without --overwrite)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  out = os.path.abspath(os.fspath(out))
  arrays = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  if fmt == "torch":
    torch = convert.import_torch()
  else:
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"writing safetensors needs safetensors: "
                        f"{convert.TORCH_EXTRA_HINT}") from e
  # safetensors creates its file private (0600); `replacing` gives it the ordinary mode.
  with atomic_files.replacing(out) as tmp:
    if fmt == "torch":
      torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, tmp)
    else:
      safetensors_numpy.save_file(arrays, tmp, metadata=dict(metadata or {}))
  return out


def _metadata(spec: bundle_lib.ModelSpec) -> dict[str, str]:
  # "format": "pt" tells safetensors readers the layout is PyTorch's.
  return {"format": "pt", "arch": spec.arch, "num_classes": str(spec.num_classes)}


def export_bundle(directory: str | os.PathLike, fmt: str, out: str | os.PathLike) -> str:
  """Bundle -> state dict file in `fmt`; returns the path written."""
  state_dict, spec = bundle_state_dict(directory)
  return save_state_dict(state_dict, fmt, out, _metadata(spec))


def _format_for(out: str, fmt: str | None) -> str:
  """--format, else the one --out's suffix names; refuses the two disagreeing."""
  suffix = os.path.splitext(out)[1].lower()
  implied = _SUFFIX_FORMAT.get(suffix)
  if fmt:
    if implied and implied != fmt:
      raise ValueError(f"--format {fmt} does not match --out {out} (a {implied} suffix); "
                       "drop --format or change the suffix.")
    return fmt
  if implied is None:
    raise ValueError(f"cannot tell the format of {out} from its suffix; "
                     f"pass --format {' or --format '.join(FORMATS)}.")
  return implied


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("bundle", metavar="DIR", help="model bundle directory")
  parser.add_argument("--format", choices=FORMATS, default=None,
                      help="torch (torch.save of the state dict) or safetensors; "
                      "default: from the suffix of --out (.safetensors, .pt/.pth/.th/.bin), "
                      "which must not name the other format")
  parser.add_argument("--out", required=True, metavar="FILE",
                      help="file to write (refused if it exists, unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the file already at --out (refused otherwise)")


def run(args: argparse.Namespace) -> int:
  fmt = _format_for(args.out, args.format)
  atomic_files.refuse_existing(args.out, args.overwrite)
  if os.path.isdir(args.out):
    raise ValueError(f"--out {args.out} is a directory; give the path of the file to write, "
                     f"e.g. {os.path.join(args.out, 'model.' + fmt.replace('torch', 'pt'))}.")
  state_dict, spec = bundle_state_dict(args.bundle)
  warning = bundle_lib.untrained_warning(spec)
  if warning is not None:
    print(f"{args.bundle}: {warning}", file=sys.stderr)
  out = save_state_dict(state_dict, fmt, args.out, _metadata(spec))
  prefix = spec.extra.get("key_prefix", "")
  print(f"exported {args.bundle} ({spec.arch}, {spec.num_classes} classes) as {fmt}: "
        f"{len(state_dict)} tensors" + (f", keys prefixed {prefix!r}" if prefix else ""))
  print(f"  written to {out}")
  return 0
