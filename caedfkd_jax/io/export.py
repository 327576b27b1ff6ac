"""`caedfkd export`: a model bundle -> a PyTorch or safetensors state dict.

Keys are those of the source zoo (the `module.` prefix recorded at conversion
included), so the file loads strictly into the original PyTorch network; a
distilled student exports the same way with no prefix.

Two more layouts feed the detection and segmentation tools users already run:

- `--format torchvision`: a ResNet backbone (resnet18, resnet34, resnet50) in
  torchvision's `ResNet` keys (`conv1`, `bn1`, `layerN.M.*`, `layerN.0.downsample.{0,1}`,
  `fc`), written with torch.save or, for a `.safetensors` --out, as safetensors. The
  DFKD-zoo resnet18/34 keep their CIFAR stem (a 3x3 stride-1 conv, no max-pool), so the
  user builds torchvision's `resnet18()` and sets `model.conv1 = nn.Conv2d(3, 64, 3, 1, 1,
  bias=False)` and `model.maxpool = nn.Identity()` before loading; resnet50 has
  torchvision's own stem. The akamaster CIFAR ResNets (resnet8..110) are refused: three
  stages of 16/32/64 channels and a parameter-free option-A shortcut, where torchvision's
  ResNet has four stages of 64..512 channels and a conv + BN downsample.
- `--format detectron2`: the same backbone in detectron2's names under
  `backbone.bottom_up.` (an FPN backbone's ResNet), as torch.save of
  {"model": ..., "__author__": ..., "matching_heuristics": False}: a plain dict of tensors,
  which detectron2 (and `torch.load(weights_only=True)`) reads as is. The classifier and
  `num_batches_tracked` are left out (detectron2's backbone has neither: its default
  FrozenBN keeps no count), and the config lines it needs, the pixel mean/std among them,
  are printed.
"""

import argparse
import os
import re
import sys
from typing import Mapping

import numpy as np

from caedfkd_jax import models
from caedfkd_jax.io import atomic_files, bundle as bundle_lib, convert
from caedfkd_jax.models import resnet, resnet_cifar

FORMATS = ("torch", "safetensors")  # file formats of the source zoo's own keys
LAYOUTS = ("torchvision", "detectron2")  # other tools' keys (file format from the suffix)
_SUFFIX_FORMAT = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch",
                  ".th": "torch", ".bin": "torch"}

# (block, blocks per stage) -> the torchvision constructor with that layout.
_TORCHVISION_DEPTH = {
    (resnet.BasicBlock, (2, 2, 2, 2)): 18,
    (resnet.BasicBlock, (3, 4, 6, 3)): 34,
    (resnet.Bottleneck, (3, 4, 6, 3)): 50,
    (resnet.Bottleneck, (3, 4, 23, 3)): 101,
    (resnet.Bottleneck, (3, 8, 36, 3)): 152,
}
# What a user sets on torchvision's resnet18()/resnet34() to hold the DFKD zoo's CIFAR stem.
CIFAR_STEM_RECIPE = ("model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and "
                     "model.maxpool = nn.Identity()")
DETECTRON2_PREFIX = "backbone.bottom_up."  # build_resnet_fpn_backbone's FPN.bottom_up
DETECTRON2_AUTHOR = "caedfkd-jax"


def bundle_state_dict(directory: str | os.PathLike
                      ) -> tuple[dict[str, np.ndarray], bundle_lib.ModelSpec]:
  """The bundle's variables as the source zoo's state dict (numpy), and its spec."""
  loaded = bundle_lib.load_bundle(os.fspath(directory))
  spec = loaded.spec
  state_dict = convert.variables_to_state_dict(
      loaded.variables, spec.arch, spec.num_classes,
      prefix=spec.extra.get("key_prefix", ""), image_size=spec.image_size)
  return state_dict, spec


# ---------------------------------------------------------------------------
# torchvision and detectron2 key layouts.


def torchvision_depth(arch: str) -> int:
  """torchvision's ResNet depth with the layout of `arch`; a one-line refusal for the rest."""
  model = models.create_model(arch, 1)
  if isinstance(model, resnet_cifar.CifarResNet):
    w = model.width
    raise ValueError(
        f"{arch} has no torchvision or detectron2 layout: it is an akamaster CIFAR ResNet, 3 "
        f"stages of {w}/{2 * w}/{4 * w} channels whose option-A shortcut subsamples and "
        "zero-pads with no parameters, while torchvision's ResNet has 4 stages of 64..512 "
        "channels and a 1x1 conv + BN downsample (a fixed 1x1 conv could restate the pad, "
        "not the widths); export it with --format torch and load it into its own network.")
  depth = None
  if isinstance(model, resnet.ResNet) and model.width == 64:
    depth = _TORCHVISION_DEPTH.get((model.block_cls, tuple(model.stage_sizes)))
  if depth is None:
    raise ValueError(
        f"{arch} has no torchvision or detectron2 layout: those take ResNet backbones with "
        "torchvision's widths (here resnet18, resnet34, resnet50); export it with --format "
        "torch or safetensors instead.")
  return depth


def has_cifar_stem(arch: str) -> bool:
  """A 3x3 stride-1 stem without max-pool (DFKD zoo), not torchvision's 7x7/2 + max-pool."""
  model = models.create_model(arch, 1)
  return isinstance(model, resnet.ResNet) and not model.imagenet_stem


def torchvision_state_dict(variables: Mapping, spec: bundle_lib.ModelSpec
                           ) -> dict[str, np.ndarray]:
  """The bundle's variables in torchvision's `ResNet` keys (no `module.` prefix).

  The zoo's keys already follow torchvision's but for the DFKD zoo's names of the
  shortcut (`shortcut.{0,1}` -> `downsample.{0,1}`) and the classifier (`linear` -> `fc`).
  """
  torchvision_depth(spec.arch)
  zoo = convert.variables_to_state_dict(variables, spec.arch, spec.num_classes,
                                        image_size=spec.image_size)
  return {re.sub(r"^linear\.", "fc.", key.replace(".shortcut.", ".downsample.")): value
          for key, value in zoo.items()}


# torchvision key (less layerN.M.) -> detectron2's, per detectron2/checkpoint/c2_model_loading.py
# and tools/convert-torchvision-to-d2.py: bnK is convK's norm, downsample.0/1 the shortcut.
_DETECTRON2_BLOCK_RULES = (
    (re.compile(r"conv(\d)\.weight"), r"conv\1.weight"),
    (re.compile(r"bn(\d)\.(weight|bias|running_mean|running_var)"), r"conv\1.norm.\2"),
    (re.compile(r"downsample\.0\.weight"), "shortcut.weight"),
    (re.compile(r"downsample\.1\.(weight|bias|running_mean|running_var)"), r"shortcut.norm.\1"),
)


def detectron2_key(torchvision_key: str) -> str | None:
  """detectron2's name of a torchvision ResNet key; None for those its backbone has not
  (the classifier `fc.*` and every `num_batches_tracked`)."""
  if torchvision_key.startswith("fc.") or torchvision_key.endswith(convert.NUM_BATCHES_TRACKED):
    return None
  if torchvision_key == "conv1.weight":
    return DETECTRON2_PREFIX + "stem.conv1.weight"
  match = re.fullmatch(r"bn1\.(weight|bias|running_mean|running_var)", torchvision_key)
  if match:
    return DETECTRON2_PREFIX + f"stem.conv1.norm.{match.group(1)}"
  match = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", torchvision_key)
  if match:
    stage, block, rest = match.groups()
    for pattern, replacement in _DETECTRON2_BLOCK_RULES:
      if pattern.fullmatch(rest):
        return DETECTRON2_PREFIX + f"res{int(stage) + 1}.{block}." + pattern.sub(replacement, rest)
  raise ValueError(f"no detectron2 name for the torchvision key {torchvision_key!r}; "
                   "only ResNet backbones export to detectron2.")


def detectron2_state_dict(torchvision: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torchvision ResNet keys -> detectron2's (`backbone.bottom_up.res2.0.conv1.norm.weight`)."""
  renamed = {}
  for key, value in torchvision.items():
    new = detectron2_key(key)
    if new is not None:
      if new in renamed:
        raise ValueError(f"two tensors map to the detectron2 key {new}; this is a bug.")
      renamed[new] = value
  return renamed


def pixel_stats_255(spec: bundle_lib.ModelSpec) -> tuple[list[float], list[float]]:
  """The bundle's input mean/std on the 0-255 RGB scale (detectron2 PIXEL_MEAN/STD, mmdet)."""
  return ([round(255 * m, 3) for m in spec.mean], [round(255 * s, 3) for s in spec.std])


def layout_notes(layout: str, spec: bundle_lib.ModelSpec, out: str) -> list[str]:
  """What the user sets on their side to load the file and feed the network its inputs."""
  depth = torchvision_depth(spec.arch)
  cifar = has_cifar_stem(spec.arch)
  mean, std = pixel_stats_255(spec)
  if layout == "torchvision":
    notes = [f"build model = torchvision.models.resnet{depth}(num_classes={spec.num_classes})"
             + (f", then set {CIFAR_STEM_RECIPE} (this network's CIFAR stem)" if cifar else "")
             + "; a detection backbone (resnet_fpn_backbone's body) loads it without fc.*",
             f"inputs: RGB in [0, 1] normalised with mean {list(spec.mean)}, std "
             f"{list(spec.std)} (torchvision detection: image_mean/image_std; mmdet/mmseg "
             f"data_preprocessor: mean={mean}, std={std}, bgr_to_rgb=True)"]
  else:
    notes = [f"detectron2 config: MODEL.WEIGHTS {out} MODEL.RESNETS.DEPTH {depth} "
             + ("MODEL.RESNETS.RES2_OUT_CHANNELS 64 " if depth < 50 else
                "MODEL.RESNETS.STRIDE_IN_1X1 False ")
             + f"MODEL.PIXEL_MEAN \"{mean}\" MODEL.PIXEL_STD \"{std}\" INPUT.FORMAT RGB"]
    if cifar:
      notes.append("this network's stem is a 3x3 stride-1 conv without max-pool; detectron2's "
                   "BasicStem is 7x7/2 + max-pool: register a backbone whose stem.conv1 is "
                   "Conv2d(3, 64, 3, 1, 1, norm) with no max-pool, or detectron2 skips "
                   "stem.conv1.weight with a shape warning")
  return notes


# ---------------------------------------------------------------------------
# Files.


def save_state_dict(state_dict: Mapping[str, np.ndarray], fmt: str, out: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None) -> str:
  """Writes `state_dict` as `fmt` to `out` (atomically, mode 0666 less the umask) and returns
  the path; a file already at `out` is replaced (the command refuses that without --overwrite)."""
  if fmt not in FORMATS:
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  out = os.path.abspath(os.fspath(out))
  # Not np.ascontiguousarray: it turns the 0-d num_batches_tracked into shape (1,).
  arrays = {k: np.asarray(v, order="C") for k, v in state_dict.items()}
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


def save_detectron2(state_dict: Mapping[str, np.ndarray], out: str | os.PathLike) -> str:
  """torch.save of {"model", "__author__", "matching_heuristics": False}: what detectron2's
  DetectionCheckpointer loads from a .pth with torch.load, names used as they are."""
  torch = convert.import_torch()
  out = os.path.abspath(os.fspath(out))
  model = {k: torch.from_numpy(np.array(v, order="C", copy=True)) for k, v in state_dict.items()}
  with atomic_files.replacing(out) as tmp:
    torch.save({"model": model, "__author__": DETECTRON2_AUTHOR, "matching_heuristics": False},
               tmp)
  return out


def _metadata(spec: bundle_lib.ModelSpec, layout: str | None = None) -> dict[str, str]:
  # "format": "pt" tells safetensors readers the layout is PyTorch's.
  metadata = {"format": "pt", "arch": spec.arch, "num_classes": str(spec.num_classes)}
  if layout:
    metadata["layout"] = layout
  return metadata


def _write(variables: Mapping, spec: bundle_lib.ModelSpec, layout: str, container: str,
           out: str | os.PathLike) -> tuple[str, int]:
  """Writes the bundle's variables in `layout` ("zoo" or one of LAYOUTS) as `container`;
  returns the path and the number of tensors."""
  if layout == "zoo":
    state_dict = convert.variables_to_state_dict(
        variables, spec.arch, spec.num_classes, prefix=spec.extra.get("key_prefix", ""),
        image_size=spec.image_size)
    return save_state_dict(state_dict, container, out, _metadata(spec)), len(state_dict)
  state_dict = torchvision_state_dict(variables, spec)
  if layout == "detectron2":
    state_dict = detectron2_state_dict(state_dict)
    return save_detectron2(state_dict, out), len(state_dict)
  return save_state_dict(state_dict, container, out, _metadata(spec, layout)), len(state_dict)


def export_bundle(directory: str | os.PathLike, fmt: str, out: str | os.PathLike) -> str:
  """Bundle -> state dict file in `fmt` (FORMATS, or a layout of LAYOUTS whose file format
  follows the suffix of `out`); returns the path written."""
  layout, container = ("zoo", fmt) if fmt in FORMATS else _layout_and_container(
      os.fspath(out), fmt)
  loaded = bundle_lib.load_bundle(os.fspath(directory))
  return _write(loaded.variables, loaded.spec, layout, container, out)[0]


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


def _layout_and_container(out: str, fmt: str | None) -> tuple[str, str]:
  """(key layout: "zoo" or one of LAYOUTS, file format: one of FORMATS) for --format/--out."""
  if fmt not in LAYOUTS:
    return "zoo", _format_for(out, fmt)
  stem, suffix = os.path.splitext(out)
  container = _SUFFIX_FORMAT.get(suffix.lower())
  if fmt == "detectron2" and container != "torch":
    raise ValueError(f"--format detectron2 writes a torch.save file, which detectron2 reads "
                     f"only from a name it hands to torch.load: give --out {stem}.pth.")
  if container is None:
    raise ValueError(f"cannot tell the file format of {out} from its suffix; give --out "
                     "NAME.pth (torch.save) or NAME.safetensors.")
  return fmt, container


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("bundle", metavar="DIR", help="model bundle directory")
  parser.add_argument(
      "--format", choices=FORMATS + LAYOUTS, default=None,
      help="torch (torch.save of the state dict) or safetensors, in the source zoo's keys; "
      "default: from the suffix of --out (.safetensors, .pt/.pth/.th/.bin), which must not "
      "name the other format. torchvision: a ResNet backbone (resnet18/34/50) in torchvision's "
      "ResNet keys, torch.save or safetensors by the suffix; the DFKD-zoo resnet18/34 keep "
      "their CIFAR stem: build torchvision's resnet18()/resnet34() as model and set "
      + CIFAR_STEM_RECIPE + ". "
      "detectron2: the same backbone in detectron2's names (backbone.bottom_up.res2...) as a "
      ".pth, and the config lines it needs (depth, pixel mean/std, INPUT.FORMAT RGB). The "
      "akamaster CIFAR ResNets, WRNs and VGGs have neither layout and are refused.")
  parser.add_argument("--out", required=True, metavar="FILE",
                      help="file to write (refused if it exists, unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the file already at --out (refused otherwise)")
  parser.epilog = ("Detection and segmentation recipes (torchvision, mmdetection/mmsegmentation, "
                   "detectron2): docs/usage.md.")


def run(args: argparse.Namespace) -> int:
  layout, container = _layout_and_container(args.out, args.format)
  atomic_files.refuse_existing(args.out, args.overwrite)
  if os.path.isdir(args.out):
    raise ValueError(f"--out {args.out} is a directory; give the path of the file to write, "
                     f"e.g. {os.path.join(args.out, 'model.' + container.replace('torch', 'pt'))}.")
  loaded = bundle_lib.load_bundle(os.fspath(args.bundle))
  spec = loaded.spec
  if layout != "zoo":
    torchvision_depth(spec.arch)  # refuse before writing anything
  warning = bundle_lib.untrained_warning(spec)
  if warning is not None:
    print(f"{args.bundle}: {warning}", file=sys.stderr)
  out, count = _write(loaded.variables, spec, layout, container, args.out)
  prefix = spec.extra.get("key_prefix", "") if layout == "zoo" else ""
  described = container if layout == "zoo" else f"{layout} ({container} file)"
  print(f"exported {args.bundle} ({spec.arch}, {spec.num_classes} classes) as {described}: "
        f"{count} tensors" + (f", keys prefixed {prefix!r}" if prefix else ""))
  print(f"  written to {out}")
  if layout != "zoo":
    for note in layout_notes(layout, spec, out):
      print(f"  {note}")
  return 0
