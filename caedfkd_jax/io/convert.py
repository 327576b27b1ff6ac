"""`caedfkd convert`: a PyTorch checkpoint of a zoo network -> a model bundle.

One naming rule covers every arch (see caedfkd_jax/models): a PyTorch module
path with numeric segments merged into the previous one with "_" is the Flax
module path (`layer1.0.conv1` <-> `layer1_0/conv1`). The mapping is driven by
the Flax model's own variable tree, so a new arch needs no code here, and any
difference between checkpoint and model is reported in full, never guessed.

Checkpoints are pickles: they are only ever read with
`torch.load(..., weights_only=True)`, which refuses anything that would run code.
"""

import argparse
import dataclasses
import functools
import hashlib
import os
import pickle
import re
import warnings
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax import models
from caedfkd_jax.io import atomic_files, bundle as bundle_lib, class_names as class_names_lib

DATA_PARALLEL_PREFIX = "module."
NUM_BATCHES_TRACKED = "num_batches_tracked"
MAX_LISTED = 10  # longer lists of differing keys are cut to this many + a count

TORCH_EXTRA_HINT = "pip install 'caedfkd-jax[torch]'"


# ---------------------------------------------------------------------------
# Presets: how the source zoo normalised its inputs.


@dataclasses.dataclass(frozen=True)
class Normalization:
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  image_size: int


@dataclasses.dataclass(frozen=True)
class Preset:
  """A source zoo. `by_num_classes` picks the dataset's statistics; key None = any."""
  name: str
  description: str
  by_num_classes: Mapping[int | None, Normalization]
  default_class_names: Mapping[int, Sequence[str]] = dataclasses.field(
      default_factory=dict)

  def normalization(self, num_classes: int) -> Normalization:
    if num_classes in self.by_num_classes:
      return self.by_num_classes[num_classes]
    if None in self.by_num_classes:
      return self.by_num_classes[None]
    known = ", ".join(str(n) for n in self.by_num_classes)
    raise ValueError(
        f"preset {self.name!r} knows the input statistics of datasets with {known} "
        f"classes, not {num_classes}. Pick the preset whose input statistics the "
        "network was trained with (akamaster and torchvision: ImageNet's).")


_IMAGENET_32 = Normalization(bundle_lib.IMAGENET_MEAN, bundle_lib.IMAGENET_STD, 32)
PRESETS: dict[str, Preset] = {
    "akamaster": Preset(
        "akamaster", "akamaster/pytorch_resnet_cifar10: ImageNet statistics, 32x32",
        {None: _IMAGENET_32}, {10: class_names_lib.CIFAR10}),
    "dfkd": Preset(
        "dfkd", "Fast/CMI/NAYER zoo: CIFAR-10/100 statistics (Tiny-ImageNet 0.5/0.5)",
        {10: Normalization(bundle_lib.CIFAR10_MEAN, bundle_lib.CIFAR10_STD, 32),
         100: Normalization(bundle_lib.CIFAR100_MEAN, bundle_lib.CIFAR100_STD, 32),
         200: Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 64)},
        {10: class_names_lib.CIFAR10, 100: class_names_lib.CIFAR100}),
    "torchvision": Preset(
        "torchvision", "torchvision ImageNet models: ImageNet statistics, 224x224",
        {None: Normalization(bundle_lib.IMAGENET_MEAN, bundle_lib.IMAGENET_STD, 224)}),
}


def get_preset(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
  return PRESETS[name]


# ---------------------------------------------------------------------------
# Reading PyTorch checkpoints safely.


def import_torch():
  """torch, or an error saying how to install it (it is an optional extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        f"reading/writing PyTorch checkpoints needs torch: {TORCH_EXTRA_HINT}") from e
  return torch


def _refused_global(error: BaseException) -> str | None:
  """The global a weights-only load refused, if that is why it failed."""
  for e in (error, error.__cause__, error.__context__):
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(e or ""))
    if match:
      return match.group(1)
  return None


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a checkpoint: a bare state dict or one under `state_dict`/`model`.

  Only `torch.load(weights_only=True)` touches the file, so nothing in it runs.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file).")
  torch = import_torch()
  try:
    with warnings.catch_warnings():  # torch's note on unusual pickle protocols
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    refused = _refused_global(e)
    if refused is not None:
      raise ValueError(
          f"{path} was refused: loading it would import and call {refused}, i.e. "
          "execute code stored in the file, and it was never run. Only state dicts "
          "of tensors are accepted; if you trust the file, re-save it as "
          "torch.save(model.state_dict(), path).") from None
    # Not torch's advice to retry with weights_only=False: that would run the file.
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
    raise ValueError(
        f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another "
        f"format; nothing in it was run): "
        f"{detail.group(1) if detail else _first_line(e)}") from None
  except Exception as e:  # noqa: BLE001 - every other failure means the same to the user
    raise ValueError(
        f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another "
        f"format): {type(e).__name__}: {_first_line(e)}") from None

  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict.")
  state_dict = obj
  for wrapper_key in ("state_dict", "model"):
    if isinstance(obj.get(wrapper_key), Mapping):
      state_dict = obj[wrapper_key]
      break
  arrays = {}
  for key, value in state_dict.items():
    if isinstance(key, str) and isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:  # numpy has no bfloat16
        value = value.float()
      arrays[key] = np.array(value.numpy(), copy=True)
  if not arrays:
    raise ValueError(
        f"{path} holds no tensors: expected a state dict, or a dict with one under "
        f"'state_dict' or 'model'; its top-level entries are {listed(map(str, obj))}.")
  return arrays


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  if not text:
    return "the file ends too early" if isinstance(e, EOFError) else "(no message)"
  return text.splitlines()[0]


def split_key_prefix(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """Strips DataParallel's `module.` when every key has it; returns (dict, prefix)."""
  prefix = ""
  state_dict = dict(state_dict)
  n = len(DATA_PARALLEL_PREFIX)
  while state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
    state_dict = {k[n:]: v for k, v in state_dict.items()}
    prefix += DATA_PARALLEL_PREFIX
  return state_dict, prefix


# ---------------------------------------------------------------------------
# The naming rule.

# (collection, Flax leaf) -> PyTorch leaf
_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_COLLECTIONS = ("params", "batch_stats")
_TRAILING_INDICES = re.compile(r"(.*?)((?:_\d+)+)")


def torch_module_path(flax_path: Sequence[str]) -> list[str]:
  """Flax module names -> PyTorch path segments (`layer1_0` -> `layer1`, `0`)."""
  segments = []
  for name in flax_path:
    match = _TRAILING_INDICES.fullmatch(name)
    if match:
      base, indices = match.groups()
      segments += ([base] if base else []) + indices[1:].split("_")
    else:
      segments.append(name)
  return segments


def _kernel_to_torch_axes(ndim: int) -> tuple[int, ...]:
  """HWIO -> OIHW for convs (any spatial rank), (in, out) -> (out, in) for Dense."""
  return (ndim - 1, ndim - 2, *range(ndim - 2))


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One Flax variable and the PyTorch tensor it corresponds to."""
  torch_key: str
  collection: str | None  # None: num_batches_tracked (PyTorch only)
  flax_path: tuple[str, ...]
  flax_shape: tuple[int, ...]
  dtype: Any
  to_torch_axes: tuple[int, ...] | None  # None: no transpose

  @property
  def torch_shape(self) -> tuple[int, ...]:
    if self.to_torch_axes is None:
      return self.flax_shape
    return tuple(self.flax_shape[a] for a in self.to_torch_axes)

  def to_torch(self, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if self.to_torch_axes is not None:
      value = np.transpose(value, self.to_torch_axes)
    return np.array(value, order="C", copy=True)  # writable: torch.from_numpy wants that

  def to_flax(self, value: np.ndarray) -> np.ndarray:
    if self.to_torch_axes is not None:
      value = np.transpose(value, np.argsort(self.to_torch_axes))
    return np.ascontiguousarray(value, dtype=self.dtype)


def _module_walk(tree: Mapping[str, Any], path: tuple[str, ...] = ()
                 ) -> Iterator[tuple[tuple[str, ...], dict[str, Any]]]:
  """(module path, its own leaves) in creation order, parents before children."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
  if leaves:
    yield path, leaves
  for name, child in tree.items():
    if isinstance(child, Mapping):
      yield from _module_walk(child, path + (name,))


@functools.lru_cache(maxsize=64)
def torch_layout(arch: str, num_classes: int, image_size: int = 32) -> tuple[_Entry, ...]:
  """Every tensor of the PyTorch state dict of `arch`, in PyTorch's order.

  Read off the Flax model's own variables (shapes only, nothing is computed);
  the order is module creation order, which matches the PyTorch zoos.
  """
  model = models.create_model(arch, num_classes)
  creation_order = []

  def init():
    variables = model.init(jax.random.key(0),
                           jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                           train=False)
    # jax re-sorts dict keys on the way out; keep the order modules were made in.
    creation_order.extend(_module_walk(variables.get("params", {})))
    return {c: variables.get(c, {}) for c in _COLLECTIONS}

  shapes = jax.eval_shape(init)
  entries = []
  for module_path, _ in creation_order:
    prefix = ".".join(torch_module_path(module_path))
    for collection in _COLLECTIONS:
      node = shapes[collection]
      for name in module_path:
        node = node.get(name, {}) if isinstance(node, Mapping) else {}
      own = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
      for leaf, shape in sorted(own.items(), key=lambda kv: kv[0] not in ("kernel", "scale")):
        if (collection, leaf) not in _TORCH_LEAF:
          raise ValueError(
              f"arch {arch}: no PyTorch name for the variable {collection}/"
              f"{'/'.join(module_path + (leaf,))}; the converter knows "
              f"{sorted(set(k for _, k in _TORCH_LEAF))}.")
        axes = _kernel_to_torch_axes(len(shape.shape)) if leaf == "kernel" else None
        entries.append(_Entry(f"{prefix}.{_TORCH_LEAF[collection, leaf]}", collection,
                              module_path + (leaf,), tuple(shape.shape), shape.dtype, axes))
      if collection == "batch_stats" and "mean" in own:
        entries.append(_Entry(f"{prefix}.{NUM_BATCHES_TRACKED}", None, module_path,
                              (), np.int64, None))
  keys = [e.torch_key for e in entries]
  if len(set(keys)) != len(keys):
    clashes = sorted({k for k in keys if keys.count(k) > 1})
    raise ValueError(f"arch {arch}: Flax names that map to the same PyTorch key "
                     f"{clashes}; module names must not end in _<digits> but by the rule.")
  # Modules that own batch_stats but no params would have been skipped above.
  missing = set(_leaf_paths(shapes["batch_stats"])) - {
      e.flax_path for e in entries if e.collection == "batch_stats"}
  if missing:
    raise ValueError(f"arch {arch}: batch_stats without params are not supported: "
                     f"{sorted(missing)}")
  return tuple(entries)


def _leaf_paths(tree: Mapping[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple]:
  for name, child in tree.items():
    if isinstance(child, Mapping):
      yield from _leaf_paths(child, path + (name,))
    else:
      yield path + (name,)


def listed(items, limit: int = MAX_LISTED) -> str:
  """The first `limit` items, comma-separated, and how many more (converters' key lists)."""
  items = list(items)
  shown = ", ".join(items[:limit])
  return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _classifier_keys(entries: Sequence[_Entry], num_classes: int) -> set[str]:
  """PyTorch keys of Dense layers with num_classes outputs (weight and bias)."""
  modules = {e.flax_path[:-1] for e in entries
             if e.collection == "params" and e.flax_path[-1] == "kernel"
             and len(e.flax_shape) == 2 and e.flax_shape[-1] == num_classes}
  return {e.torch_key for e in entries
          if e.collection == "params" and e.flax_path[:-1] in modules}


def _fits(entries: Sequence[_Entry], shapes: Mapping[str, tuple], num_classes: int,
          ignore_classes: bool) -> bool:
  expected = {e.torch_key: e.torch_shape for e in entries if e.collection}
  if set(expected) != set(shapes):
    return False
  loose = _classifier_keys(entries, num_classes) if ignore_classes else set()
  return all(shapes[k] == s or (k in loose and shapes[k][1:] == s[1:])
             for k, s in expected.items())


def _fitting_archs(shapes: Mapping[str, tuple], num_classes: int, image_size: int,
                   skip: str) -> list[str]:
  """Zoo archs whose keys and shapes (class count aside) are those of the checkpoint."""
  fitting = []
  for arch in sorted(models.ARCHS):
    if arch == skip:
      continue
    try:
      if _fits(torch_layout(arch, num_classes, image_size), shapes, num_classes, True):
        fitting.append(arch)
    except Exception:  # noqa: BLE001 - a hint only; an arch that cannot build is no fit
      continue
  return fitting


def _mismatch_report(entries: Sequence[_Entry], shapes: Mapping[str, tuple],
                     arch: str, num_classes: int, image_size: int) -> str | None:
  """None if the checkpoint fits; else one line: the fix first (the class count or the arch
  that fits), then every difference."""
  expected = {e.torch_key: e.torch_shape for e in entries if e.collection}
  missing = [k for k in expected if k not in shapes]
  unexpected = [k for k in shapes if k not in expected]
  differ = [k for k in expected if k in shapes and shapes[k] != expected[k]]
  if not (missing or unexpected or differ):
    return None
  parts = []
  classifier = _classifier_keys(entries, num_classes)
  wrong_classes = [k for k in differ if k in classifier
                   and shapes[k][1:] == expected[k][1:] and len(shapes[k]) > 0]
  if wrong_classes:
    k = sorted(wrong_classes, key=lambda k: -len(expected[k]))[0]
    parts.append(f"the checkpoint has {shapes[k][0]} classes, not the --num-classes "
                 f"{num_classes} given ({k} has shape {shapes[k]}): pass --num-classes "
                 f"{shapes[k][0]}")
  other = missing or unexpected or set(differ) - set(wrong_classes)
  if other:
    fitting = _fitting_archs(shapes, num_classes, image_size, skip=arch)
    if fitting:
      parts.append(f"the checkpoint fits --arch {' or '.join(fitting)}")
  if missing:
    parts.append(f"missing from the checkpoint ({len(missing)}): {listed(missing)}")
  if unexpected:
    parts.append(f"not in the model ({len(unexpected)}): {listed(unexpected)}")
  if differ and other:  # shapes that only differ in the class count are said above
    parts.append(f"shapes differ ({len(differ)}; checkpoint vs model): " + listed(
        f"{k} {shapes[k]} vs {expected[k]}" for k in differ))
  return (f"the checkpoint does not fit --arch {arch} with --num-classes {num_classes}: "
          + "; ".join(parts) + ".")


# ---------------------------------------------------------------------------
# State dict <-> Flax variables.


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], arch: str,
                            num_classes: int, image_size: int = 32) -> dict[str, Any]:
  """A PyTorch state dict (numpy arrays) -> {"params", "batch_stats"} for `arch`.

  Raises one ValueError listing every missing, unexpected or misshapen tensor.
  """
  models.create_model(arch, num_classes)  # unknown arch: the zoo's own message
  state_dict, _ = split_key_prefix(state_dict)
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()
                if k.rsplit(".", 1)[-1] != NUM_BATCHES_TRACKED}
  entries = torch_layout(arch, num_classes, image_size)
  shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
  report = _mismatch_report(entries, shapes, arch, num_classes, image_size)
  if report:
    raise ValueError(report)
  not_float = [e.torch_key for e in entries if e.collection
               and not np.issubdtype(state_dict[e.torch_key].dtype, np.floating)]
  if not_float:
    raise ValueError(f"the checkpoint holds non-float tensors where the model has "
                     f"weights: {listed(not_float)}")
  variables: dict[str, Any] = {c: {} for c in _COLLECTIONS}
  for e in entries:
    if e.collection is None:
      continue
    node = variables[e.collection]
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = e.to_flax(state_dict[e.torch_key])
  return variables


def variables_to_state_dict(variables: Mapping[str, Any], arch: str, num_classes: int,
                            prefix: str = "", image_size: int = 32
                            ) -> dict[str, np.ndarray]:
  """{"params", "batch_stats"} -> a PyTorch state dict (numpy) that loads strictly.

  `prefix` (e.g. "module.") restores the source zoo's key names; every BatchNorm
  gets `num_batches_tracked` = 0, which PyTorch expects but Flax does not keep.
  """
  state_dict = {}
  missing = []
  for e in torch_layout(arch, num_classes, image_size):
    if e.collection is None:
      state_dict[prefix + e.torch_key] = np.zeros((), np.int64)
      continue
    node = variables.get(e.collection, {})
    for name in e.flax_path:
      node = node.get(name) if isinstance(node, Mapping) else None
    if node is None:
      missing.append(f"{e.collection}/{'/'.join(e.flax_path)}")
      continue
    value = np.asarray(jax.device_get(node))
    if value.shape != e.flax_shape:
      raise ValueError(f"{e.collection}/{'/'.join(e.flax_path)} has shape {value.shape}, "
                       f"but {arch} with {num_classes} classes needs {e.flax_shape}.")
    state_dict[prefix + e.torch_key] = e.to_torch(value)
  if missing:
    raise ValueError(f"the variables are not those of {arch}: missing {listed(missing)}")
  return state_dict


# ---------------------------------------------------------------------------
# Whole files.


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def convert_checkpoint(src: str | os.PathLike, arch: str, num_classes: int, preset: str,
                       out: str | os.PathLike,
                       class_names: Sequence[str] | None = None,
                       overwrite: bool = False) -> str:
  """PyTorch checkpoint -> bundle at `out` (returned), with its provenance in `extra`.

  Anything already at `out` is replaced only with `overwrite` (it may be a teacher that other
  runs name), and then only a bundle: save_bundle refuses a folder of other files.
  """
  src, out = os.fspath(src), os.fspath(out)
  atomic_files.refuse_existing(out, overwrite)
  if os.path.isfile(out):
    raise ValueError(f"--out {out} is a file, not a bundle directory; choose another --out.")
  if not overwrite and bundle_lib.bundle_exists(out):  # only in the backup a killed save left
    raise ValueError(f"--out {out} holds a model bundle (set aside by an interrupted save); "
                     "pass --overwrite to replace it (or choose another --out).")
  preset_ = get_preset(preset)
  norm = preset_.normalization(num_classes)
  models.create_model(arch, num_classes)  # fail on a bad arch before reading the file
  if class_names is None:
    class_names = preset_.default_class_names.get(num_classes)
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f"{len(class_names)} class names given for --num-classes "
                     f"{num_classes}; give one name per class, in label order.")
  state_dict, key_prefix = split_key_prefix(load_torch_state_dict(src))
  try:
    variables = state_dict_to_variables(state_dict, arch, num_classes, norm.image_size)
  except ValueError as e:
    raise ValueError(f"{src}: {e}") from None
  spec = bundle_lib.ModelSpec(
      arch=arch, num_classes=num_classes, image_size=norm.image_size,
      mean=tuple(norm.mean), std=tuple(norm.std),
      class_names=list(class_names) if class_names is not None else None,
      extra={"source": os.path.basename(src), "source_sha256": file_sha256(src),
             "preset": preset_.name, "key_prefix": key_prefix})
  return bundle_lib.save_bundle(os.fspath(out), spec, variables)


def param_count(variables: Mapping[str, Any]) -> int:
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))


# ---------------------------------------------------------------------------
# CLI.


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("src", help="PyTorch checkpoint (.th/.pt/.pth), read with "
                      "weights_only=True: files that would run code are refused")
  parser.add_argument("--arch", required=True,
                      help=f"network in the zoo: {', '.join(sorted(models.ARCHS))}")
  parser.add_argument("--num-classes", type=int, required=True, metavar="N",
                      help="classes the network outputs (its classifier's rows): 10 for "
                      "CIFAR-10, 100 for CIFAR-100, 1000 for ImageNet")
  parser.add_argument("--preset", default="akamaster", choices=sorted(PRESETS),
                      help="source zoo, which fixes input mean/std and size: " + "; ".join(
                          f"{p.name}: {p.description}" for p in PRESETS.values())
                      + " (default: akamaster)")
  parser.add_argument("--class-names", metavar="FILE",
                      help="class names in label order: a text file with one a line, or "
                      f"one of {', '.join(class_names_lib.BUILTIN)}; default: CIFAR-10's "
                      "(CIFAR-100's) for 10 (100) class akamaster/dfkd checkpoints")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help="bundle directory to write (refused if it exists, unless --overwrite)")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace the bundle already at --out (refused otherwise)")


def run(args: argparse.Namespace) -> int:
  class_names = (class_names_lib.resolve_classes(args.class_names)
                 if args.class_names else None)
  out = convert_checkpoint(args.src, args.arch, args.num_classes, args.preset, args.out,
                           class_names, overwrite=args.overwrite)
  loaded = bundle_lib.load_bundle(out)
  spec = loaded.spec
  print(f"converted {args.src} ({spec.arch}, {spec.num_classes} classes, "
        f"{param_count(loaded.variables):,} parameters)")
  print(f"  file sha256    {spec.extra['source_sha256']}")
  print(f"  weights sha256 {bundle_lib.weights_sha256(loaded.variables)} "
        "(what distill records as teacher_sha256)")
  print(f"  preset {spec.extra['preset']}: {spec.image_size}x{spec.image_size}, "
        f"mean {spec.mean}, std {spec.std}")
  print(f"  written to {out}")
  return 0
