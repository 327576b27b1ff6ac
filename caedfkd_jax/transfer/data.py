"""The data side of `caedfkd transfer` (issue 27): dense datasets read whole into memory, and the
training step's augmentation as jittable JAX functions on NHWC batches.

Two layouts, both held in memory like every evaluation set of `io.data` (a split is read once):

- NYUv2 in MTAN's preprocessed layout, as LibMTL's `examples/nyu/create_dataset.py` reads it:
  `ROOT/{train,val}/{image,label,depth,normal}/N.npy`, N = 0..count-1 (LibMTL counts the `*.npy`
  files and reads 0..count-1 by name, so there is no other order), image H x W x 3 float RGB in
  [0, 1], label H x W float with -1 = unlabelled, depth H x W x 1 metres with 0 = missing, normal
  H x W x 3 unit vectors with (0, 0, 0) = missing; `ROOT/classes.txt` (a name a line) where it
  exists. Arrays stay NHWC (LibMTL moves the channels first for PyTorch). NYUv2's 795 train and
  654 val images at 288 x 384 take 2.8 + 2.3 GB as float32 with their labels, depth and normals
  (the images alone 1.9 GB), so a split is refused when it would not fit in the free memory.
- ADE20K-style segmentation folders: `ADEChallengeData2016/images/{training,validation}/*.jpg`
  beside `annotations/{training,validation}/*.png`, paired by file name; or any such
  `images/SPLIT` + `annotations/SPLIT` pair with a class list file. With `reduce_zero_label`
  (mmsegmentation's ADE20K setting) mask 0 is ignored and 1..K become 0..K-1. Images of
  different sizes are resized (shorter side) and centre-cropped to one `size`, masks with
  nearest-neighbour; images stay uint8 (ADE20K's 20,210 train images at 512 px are 16 GB so,
  63 GB as float32).

Labels are int32 with -1 = ignore everywhere, what `transfer.losses` and `transfer.metrics` skip.
A batch is a dict with "image" and the targets named as `losses.multitask_loss` names them:
"segmentation" (B x H x W), "depth" (B x H x W x 1), "normal" (B x H x W x 3).

tfds has no dataset of either kind: `nyu_depth_v2` has depth only (no labels, no normals), and
`scene_parse150` is built from ChallengeData2017's instance annotations, not the 150-class
semantic masks ADE20K is scored on; both are refused with the layout to use instead.
"""

import concurrent.futures
import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from caedfkd_jax.io import data as data_lib
from caedfkd_jax.io import imagenet_layouts

IGNORE_LABEL = -1
TASKS = ("segmentation", "depth", "normal")   # The batch keys beside "image", as the losses'.

# NYUv2 (MTAN's preprocessing, LibMTL's reader).
NYU_KINDS = ("image", "label", "depth", "normal")
NYU_SPLITS = ("train", "val")
NYU_SPLIT_ALIASES = {"test": "val", "validation": "val"}   # MTAN's val is NYUv2's test split.
NYU_NUM_CLASSES = 13
NYU_SCALES = (1.0, 1.2, 1.5)   # LibMTL's RandomScaleCrop.
NYU_LAYOUT = ("ROOT/{train,val}/{image,label,depth,normal}/N.npy (MTAN's preprocessed NYUv2, "
              "as LibMTL's examples/nyu reads it)")
NYU_CHANNELS = {"image": 3, "label": None, "depth": 1, "normal": 3}   # None: H x W.
NYU_BYTES_PER_PIXEL = 4 * (3 + 1 + 1 + 3)   # float32 image, depth, normal; int32 label.
IMAGE_TOLERANCE = 1e-3      # MTAN's images are in [0, 1]; allow rounding, not 0..255.
NORMAL_TOLERANCE = 0.1      # |1 - |n|| of a present normal ...
NORMAL_OFF_SHARE = 0.01     # ... may exceed this for at most this share of them (resampling).

# ADE20K-style folders (mmsegmentation's ADE20KDataset).
ADE_NAME = "ADEChallengeData2016"
ADE_NUM_CLASSES = 150
ADE_OBJECT_INFO = "objectInfo150.txt"   # In the official zip: Idx, Ratio, Train, Val, Name.
ADE_SPLIT_ALIASES = {"train": "training", "val": "validation"}
SEG_LAYOUT = ("ROOT/images/SPLIT/*.{jpg,jpeg,png} with ROOT/annotations/SPLIT/*.png of the same "
              "names (ADEChallengeData2016's layout)")
MASK_EXTENSION = ".png"
MASK_IGNORE = 255           # mmsegmentation's ignore_index in the mask files.
SEG_BYTES_PER_PIXEL = 3 + 4   # uint8 image, int32 label.
SEG_RATIO_RANGE = (0.5, 2.0)  # mmsegmentation's RandomResize for ADE20K.
DECODE_THREADS = 16

TFDS_PREFIX = data_lib.TFDS_PREFIX
TFDS_REFUSALS = {
    "nyu_depth_v2": ("has depth only (no semantic labels, no surface normals), at 480 x 640; "
                     f"use MTAN's preprocessed NYUv2 instead, {NYU_LAYOUT}"),
    "scene_parse150": ("holds masks built from ChallengeData2017's instance annotations, not the "
                       "150-class semantic masks ADE20K is scored on; use the official "
                       f"{ADE_NAME}.zip instead, {SEG_LAYOUT}"),
}


@dataclasses.dataclass
class DenseDataset:
  """One split in memory. `labels` index `class_names` (when known), -1 = ignore; `depth` and
  `normal` are None where the dataset has no such task (segmentation folders)."""
  images: np.ndarray                 # float32 NxHxWx3 in [0, 1] (NYUv2) or uint8 (photos)
  labels: np.ndarray                 # int32 NxHxW
  num_classes: int
  depth: np.ndarray | None = None    # float32 NxHxWx1, 0 = missing
  normal: np.ndarray | None = None   # float32 NxHxWx3, (0, 0, 0) = missing
  class_names: list[str] | None = None
  source: str = ""                   # where it came from, for messages

  def __post_init__(self):
    where = self.source or "dataset"
    if (self.images.ndim != 4 or self.images.shape[-1] != 3
        or self.images.dtype not in (np.float32, np.uint8)):
      raise ValueError(f"{where}: images must be float32 or uint8 NxHxWx3, got "
                       f"{self.images.dtype} {self.images.shape}.")
    n, h, w = self.images.shape[:3]
    expected = {"labels": ((n, h, w), np.int32), "depth": ((n, h, w, 1), np.float32),
                "normal": ((n, h, w, 3), np.float32)}
    for name, (shape, dtype) in expected.items():
      array = getattr(self, name)
      if array is not None and (array.shape != shape or array.dtype != dtype):
        raise ValueError(f"{where}: {name} must be {np.dtype(dtype)} {shape} to match the images, "
                         f"got {array.dtype} {array.shape}.")
    if self.class_names is not None and len(self.class_names) != self.num_classes:
      raise ValueError(f"{where}: {len(self.class_names)} class names for num_classes="
                       f"{self.num_classes}; give one name a class.")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, int]:
    return tuple(self.images.shape[1:3])

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(t for t, a in zip(TASKS, (self.labels, self.depth, self.normal)) if a is not None)

  def batch(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
    """The examples at `indices` as a batch dict: "image" and the tasks' targets."""
    targets = dict(zip(TASKS, (self.labels, self.depth, self.normal)))
    out = {"image": self.images[indices]}
    out.update({task: targets[task][indices] for task in self.tasks})
    return out


def check_size(height: int, width: int, total_stride: int) -> None:
  """Refuses an input size the backbone's output stride does not divide: its feature maps would
  be rounded, and the heads' upsampled logits would no longer line up with the label pixels."""
  if total_stride < 1:
    raise ValueError(f"total_stride={total_stride}: a backbone's output stride is at least 1.")
  if height % total_stride or width % total_stride:
    fit_h, fit_w = (max(n // total_stride, 1) * total_stride for n in (height, width))
    raise ValueError(f"images of {height}x{width} (HxW): the backbone's output stride "
                     f"{total_stride} must divide both sides; crop or resize the data to a "
                     f"multiple of {total_stride} (e.g. {fit_h}x{fit_w}).")


def load_dense(spec: str, split: str, *, num_classes: int | None = None,
               class_names_file: str | None = None, reduce_zero_label: bool = True,
               size: int | None = None) -> DenseDataset:
  """Reads split `split` of the dense dataset a spec names: an NYUv2 MTAN folder or a
  segmentation folder pair (module docstring). `num_classes` is NYUv2's (13 unless given), the
  others are `load_segmentation`'s. tfds specs are refused with the layout to use."""
  if spec.startswith(TFDS_PREFIX):
    name = spec[len(TFDS_PREFIX):]
    base = name.split("[")[0].split(":")[0].split("/")[0].strip().lower()
    if base in TFDS_REFUSALS:
      raise ValueError(f"data {spec!r}: tfds's {base} {TFDS_REFUSALS[base]}.")
    raise ValueError(f"data {spec!r}: dense transfer reads folders, not tfds datasets; use "
                     f"{NYU_LAYOUT}, or {SEG_LAYOUT}.")
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"data {spec!r}: {path} is not a directory; dense data is "
                            f"{NYU_LAYOUT}, or {SEG_LAYOUT}.")
  layout = find_dense_layout(path)
  if layout == "nyu":
    return load_nyu(path, split, NYU_NUM_CLASSES if num_classes is None else num_classes)
  if layout == "segmentation":
    return load_segmentation(path, split, class_names_file, reduce_zero_label, size)
  raise ValueError(f"data {spec!r}: {path} is neither {NYU_LAYOUT}, nor {SEG_LAYOUT}.")


def find_dense_layout(path: str) -> str | None:
  """"nyu" or "segmentation" when `path` holds that layout (folders only are looked at)."""
  if any(os.path.isdir(os.path.join(path, s, k)) for s in NYU_SPLITS for k in NYU_KINDS):
    return "nyu"
  return "segmentation" if _segmentation_root(path) else None


# ---------------------------------------------------------------------------
# NYUv2, MTAN's layout.


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _few(items: Sequence, limit: int = 3) -> str:
  """The first `limit` items, and how many more there are."""
  shown = ", ".join(str(i) for i in items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _npy_indices(folder: str) -> list[int]:
  """The N of the folder's N.npy files, sorted by number (LibMTL reads 0..count-1 by name)."""
  names = sorted(f for f in os.listdir(folder) if f.endswith(".npy"))
  bad = [f for f in names if not (f[:-4].isdigit() and str(int(f[:-4])) == f[:-4])]
  if bad:
    raise ValueError(f"{folder} holds {_few(bad)}, not named N.npy: LibMTL reads the files "
                     "0.npy, 1.npy, ... of each folder by name; rename or remove them.")
  return sorted(int(f[:-4]) for f in names)


def _check_fits(nbytes: int, what: str, where: str) -> None:
  """Refuses a split that would not fit in the free memory, before reading it."""
  available = imagenet_layouts.available_memory_bytes()
  if available is not None and nbytes > available:
    raise ValueError(f"{where}: {what} take {nbytes / 1e9:.1f} GB in memory, more than the "
                     f"{available / 1e9:.1f} GB free; a split is held in memory whole (NYUv2's "
                     "train split takes 2.8 GB at 288 x 384): free memory, or use a machine "
                     "with more.")


def _load_npy(path: str) -> np.ndarray:
  try:
    array = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"cannot read {path} as a .npy array ({e}): write it with numpy.save "
                     "from a numeric array.") from None
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"{path} holds {array.dtype} values: MTAN's arrays are numbers (float32); "
                     "write it from a numeric array.")
  return array


def _check_nyu_values(kind: str, array: np.ndarray, path: str, num_classes: int) -> None:
  """Refuses values that cannot be this kind (a swapped folder, 0..255 images, a depth map as
  labels): each check is what MTAN's data always satisfies."""
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{path} holds NaN or infinite values: MTAN's {kind} arrays are finite; "
                     "mark missing pixels with 0 (depth, normal) or -1 (label).")
  if kind == "image":
    lo, hi = float(array.min()), float(array.max())
    if lo < -IMAGE_TOLERANCE or hi > 1 + IMAGE_TOLERANCE:
      raise ValueError(f"{path}: image values span [{lo:g}, {hi:g}], but MTAN's images are RGB "
                       "in [0, 1]: divide 0..255 images by 255 (undo any mean/std "
                       "normalisation) when writing them.")
  elif kind == "label":
    if np.any(array != np.round(array)):
      raise ValueError(f"{path}: labels must be whole class ids (-1 = unlabelled), but some are "
                       "fractional: this is not a label map (a depth or image array?).")
    bad = (array < IGNORE_LABEL) | (array >= num_classes)
    if bad.any():
      raise ValueError(f"{path}: label {int(array[bad][0])} is outside [-1, {num_classes}) "
                       f"(-1 = unlabelled): pass the dataset's class count (--num-classes; "
                       f"NYUv2 has {NYU_NUM_CLASSES}) or fix the label map.")
  elif kind == "depth":
    if array.min() < 0:
      raise ValueError(f"{path}: depth {float(array.min()):g} is negative, but MTAN's depths "
                       "are metres >= 0 (0 = missing): this is not a depth map.")
  elif kind == "normal":
    norms = np.linalg.norm(array.astype(np.float64), axis=-1)
    present = norms > 0
    off = np.abs(norms[present] - 1) > NORMAL_TOLERANCE
    if present.any() and off.mean() > NORMAL_OFF_SHARE:
      raise ValueError(f"{path}: {off.mean():.0%} of the normals are not unit vectors (lengths "
                       f"{norms[present].min():.2f}..{norms[present].max():.2f}), but MTAN's are "
                       "unit (0, 0, 0 = missing): this is not a normal map (an image?).")


def load_nyu(root: str, split: str, num_classes: int = NYU_NUM_CLASSES) -> DenseDataset:
  """Reads split `split` ("train" or "val") of NYUv2 in MTAN's layout whole (module docstring),
  refusing layouts, shapes and values that LibMTL's reader would misread or crash on."""
  if num_classes < 1:
    raise ValueError(f"num_classes={num_classes}: need at least one class (NYUv2 has "
                     f"{NYU_NUM_CLASSES}).")
  root = os.path.abspath(os.path.expanduser(root))
  split = NYU_SPLIT_ALIASES.get(split, split)
  if split not in NYU_SPLITS:
    raise ValueError(f"split {split!r}: MTAN's NYUv2 has the splits train and val; pick one.")
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"{split_dir} does not exist: expected {NYU_LAYOUT}.")
  missing = [k for k in NYU_KINDS if not os.path.isdir(os.path.join(split_dir, k))]
  if missing:
    raise FileNotFoundError(f"{split_dir} has no {', '.join(missing)} folder: expected "
                            f"{NYU_LAYOUT}.")
  indices = {k: _npy_indices(os.path.join(split_dir, k)) for k in NYU_KINDS}
  first = indices["image"]
  if not first:
    raise ValueError(f"{os.path.join(split_dir, 'image')} holds no N.npy files: expected "
                     f"{NYU_LAYOUT}.")
  for kind in NYU_KINDS[1:]:
    if indices[kind] != first:
      only_image = sorted(set(first) - set(indices[kind]))
      only_kind = sorted(set(indices[kind]) - set(first))
      raise ValueError(
          f"{split_dir}: image/ and {kind}/ hold different files ("
          + "; ".join(s for s in (only_image and f"only image/ has {_few(only_image)}.npy",
                                  only_kind and f"only {kind}/ has {_few(only_kind)}.npy") if s)
          + "): every example needs all four arrays under one N; copy the dataset again.")
  if first != list(range(len(first))):
    gaps = sorted(set(range(first[-1] + 1)) - set(first))
    raise ValueError(f"{split_dir}: the files run to {first[-1]}.npy but "
                     f"{_few([f'{g}.npy' for g in gaps])} {'is' if len(gaps) == 1 else 'are'} "
                     "missing: LibMTL reads 0..count-1 by name; renumber them or copy the "
                     "dataset again.")
  count = len(first)
  paths = {k: [os.path.join(split_dir, k, f"{n}.npy") for n in range(count)] for k in NYU_KINDS}
  shapes = {}
  for kind in NYU_KINDS:   # Headers only: refuse before reading gigabytes.
    try:
      shapes[kind] = np.load(paths[kind][0], mmap_mode="r", allow_pickle=False).shape
    except (OSError, ValueError, EOFError):
      _load_npy(paths[kind][0])   # Raises the one-line refusal.
      raise
  h, w = shapes["image"][:2]
  expected = {k: (h, w) if c is None else (h, w, c) for k, c in NYU_CHANNELS.items()}
  if len(shapes["image"]) != 3 or shapes["image"][2] != 3:
    raise ValueError(f"{paths['image'][0]} is {shapes['image']}, but MTAN's images are H x W x 3.")
  for kind in NYU_KINDS[1:]:
    if shapes[kind] != expected[kind]:
      raise ValueError(f"{paths[kind][0]} is {shapes[kind]}, but its image is {shapes['image']}: "
                       f"{kind} must be {expected[kind]} (MTAN's layout: label H x W, depth "
                       "H x W x 1, normal H x W x 3).")
  _check_fits(count * h * w * NYU_BYTES_PER_PIXEL,
              f"its {count} examples at {h} x {w} (images, labels, depth, normals as float32)",
              split_dir)
  out = {k: np.empty((count, *expected[k]), np.int32 if k == "label" else np.float32)
         for k in NYU_KINDS}
  for kind in NYU_KINDS:
    for n, path in enumerate(paths[kind]):
      array = _load_npy(path)
      if array.shape != expected[kind]:
        raise ValueError(f"{path} is {array.shape}, but {paths[kind][0]} is {expected[kind]}: "
                         f"every {kind} array of a split must share one shape.")
      _check_nyu_values(kind, array, path, num_classes)
      out[kind][n] = array
  names_file = os.path.join(root, "classes.txt")
  names = _read_lines(names_file) if os.path.isfile(names_file) else None
  if names is not None and len(names) != num_classes:
    raise ValueError(f"{names_file} lists {len(names)} classes but num_classes={num_classes}: "
                     f"pass --num-classes {len(names)} (or fix the file, a name a line).")
  return DenseDataset(out["image"], out["label"], num_classes, out["depth"], out["normal"],
                      names, source=split_dir)


# ---------------------------------------------------------------------------
# ADE20K-style segmentation folders.


def _segmentation_root(path: str) -> str | None:
  """The folder holding images/ and annotations/: `path` or its ADEChallengeData2016."""
  for root in (path, os.path.join(path, ADE_NAME)):
    if all(os.path.isdir(os.path.join(root, d)) for d in ("images", "annotations")):
      return root
  return None


def _ade_class_names(root: str) -> list[str] | None:
  """Names from objectInfo150.txt (`Idx Ratio Train Val Name;synonyms` lines), the first synonym."""
  path = os.path.join(root, ADE_OBJECT_INFO)
  if not os.path.isfile(path):
    return None
  names = []
  for line in _read_lines(path):
    fields = line.split("\t") if "\t" in line else line.split(None, 4)
    if fields[0].isdigit() and len(fields) >= 5:
      names.append(fields[-1].split(";")[0].strip())
  if len(names) != ADE_NUM_CLASSES:
    raise ValueError(f"{path} lists {len(names)} classes, not {ADE_NUM_CLASSES}: use the file of "
                     f"the official {ADE_NAME}.zip, or pass a class list file.")
  return names


def _pixels(image: Image.Image, size: int | None, resample: int) -> np.ndarray:
  """The image as it is, or its shorter side resized to `size` and the centre size x size cut
  (torchvision's Resize + CenterCrop geometry, as imagenet_layouts.resize_center_crop)."""
  if size is None:
    return np.asarray(image)
  w, h = image.size
  short, long = min(w, h), max(w, h)
  new_long = int(size * long / short)
  new_w, new_h = (size, new_long) if w <= h else (new_long, size)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), resample)
  top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
  return np.asarray(image.crop((left, top, left + size, top + size)))


def _map_mask(raw: np.ndarray, path: str, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
  """Mask values -> labels, -1 = ignore: with `reduce_zero_label` 0 and 255 are ignored and
  1..K become 0..K-1 (mmsegmentation's), else 255 is ignored and 0..K-1 kept."""
  raw = raw.astype(np.int64)
  ignore = raw == MASK_IGNORE
  if reduce_zero_label:
    ignore |= raw == 0
    labels = raw - 1
  else:
    labels = raw
  bad = ~ignore & ((labels < 0) | (labels >= num_classes))
  if bad.any():
    value = int(raw[bad][0])
    span = f"1..{num_classes}" if reduce_zero_label else f"0..{num_classes - 1}"
    raise ValueError(f"{path}: mask value {value} is beyond the {num_classes} classes (values "
                     f"{span}, {'0 and ' if reduce_zero_label else ''}{MASK_IGNORE} ignored): "
                     "pass the class list file of these masks"
                     + ("" if reduce_zero_label else ", or reduce_zero_label=True if 0 is "
                        "the unlabelled value") + ".")
  return np.where(ignore, IGNORE_LABEL, labels).astype(np.int32)


def _decode_pair(image_path: str, mask_path: str, size: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
  try:
    with Image.open(image_path) as img, Image.open(mask_path) as mask:
      if mask.mode not in ("L", "P", "I", "I;16", "1"):
        raise ValueError(f"{mask_path} is a {mask.mode} image, not a label mask: masks are "
                         "one-channel PNGs whose values are class ids (convert colour-coded "
                         "masks to ids first).")
      if img.size != mask.size:
        raise ValueError(f"{image_path} is {img.size[0]}x{img.size[1]} but its mask {mask_path} "
                         f"is {mask.size[0]}x{mask.size[1]}: a mask must cover its image pixel "
                         "for pixel.")
      if mask.mode == "1":
        mask = mask.convert("L")
      return (_pixels(img.convert("RGB"), size, Image.BILINEAR),
              _pixels(mask, size, Image.NEAREST))
  except OSError as e:  # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f"cannot decode {image_path} or {mask_path}: {e}") from None


def load_segmentation(root: str, split: str, class_names_file: str | None = None,
                      reduce_zero_label: bool = True, size: int | None = None) -> DenseDataset:
  """Reads `ROOT/images/SPLIT` and `ROOT/annotations/SPLIT` (module docstring). The classes are
  `class_names_file`'s lines, else objectInfo150.txt's, else ADE20K's 150 unnamed. Images of
  several sizes need `size`: shorter side resized to it, centre size x size crop (an evaluation
  simplification: mmsegmentation scores ADE20K on whole images, so numbers are not its)."""
  path = os.path.abspath(os.path.expanduser(root))
  seg_root = _segmentation_root(path)
  if seg_root is None:
    raise FileNotFoundError(f"{path} has no images/ and annotations/ folders: expected "
                            f"{SEG_LAYOUT}.")
  folder = split
  if not os.path.isdir(os.path.join(seg_root, "images", split)):
    folder = ADE_SPLIT_ALIASES.get(split, split)
  image_dir = os.path.join(seg_root, "images", folder)
  mask_dir = os.path.join(seg_root, "annotations", folder)
  for directory in (image_dir, mask_dir):
    if not os.path.isdir(directory):
      found = sorted(d for d in os.listdir(os.path.dirname(directory)) if not d.startswith("."))
      raise FileNotFoundError(f"{directory} does not exist (split {split!r}; "
                              f"{os.path.dirname(directory)} has {_few(found) or 'nothing'}): "
                              f"expected {SEG_LAYOUT}.")
  if class_names_file is not None:
    if not os.path.isfile(class_names_file):
      raise FileNotFoundError(f"class list file {class_names_file} does not exist: pass the "
                              "masks' class list, a name a line, class 0 first.")
    names = _read_lines(class_names_file)
    if not names:
      raise ValueError(f"{class_names_file} lists no classes: write a name a line, class 0 first.")
  else:
    names = _ade_class_names(seg_root)
    if names is None and os.path.basename(seg_root) != ADE_NAME:
      raise ValueError(f"{seg_root} is not {ADE_NAME} and has no {ADE_OBJECT_INFO}: pass a class "
                       "list file (a name a line, class 0 first), so that the class count is "
                       "known.")
  num_classes = len(names) if names is not None else ADE_NUM_CLASSES
  images = {os.path.splitext(f)[0]: f for f in data_lib._image_files(image_dir)}  # pylint: disable=protected-access
  masks = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(mask_dir))
           if f.lower().endswith(MASK_EXTENSION) and not f.startswith(".")}
  no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
  if no_mask:
    raise ValueError(f"{image_dir}: {_few([images[s] for s in no_mask])} have no mask in "
                     f"{mask_dir} (a mask is the image's name with {MASK_EXTENSION}): add the "
                     "masks or remove those images.")
  if no_image:
    raise ValueError(f"{mask_dir}: {_few([masks[s] for s in no_image])} have no image in "
                     f"{image_dir}: add the images or remove those masks.")
  stems = sorted(images)
  if not stems:
    raise ValueError(f"{image_dir} holds no images: expected {SEG_LAYOUT}.")
  pairs = [(os.path.join(image_dir, images[s]), os.path.join(mask_dir, masks[s])) for s in stems]
  if size is not None and size < 1:
    raise ValueError(f"size={size}: the evaluation crop needs a positive side.")
  h, w = (size, size) if size is not None else imagenet_layouts._header_size(pairs[0][0])  # pylint: disable=protected-access
  _check_fits(len(pairs) * h * w * SEG_BYTES_PER_PIXEL,
              f"its {len(pairs)} images at {h} x {w} (uint8 images, int32 labels)", image_dir)
  out_images = np.empty((len(pairs), h, w, 3), np.uint8)
  out_labels = np.empty((len(pairs), h, w), np.int32)

  def decode(i: int) -> None:
    image, raw = _decode_pair(*pairs[i], size)
    if image.shape[:2] != (h, w):
      raise ValueError(f"{pairs[i][0]} is {image.shape[1]}x{image.shape[0]}, but {pairs[0][0]} "
                       f"is {w}x{h}: pass size= (the evaluation crop, e.g. 512) to bring "
                       "images of several sizes to one.")
    out_images[i] = image
    out_labels[i] = _map_mask(raw, pairs[i][1], num_classes, reduce_zero_label)

  with concurrent.futures.ThreadPoolExecutor(max_workers=DECODE_THREADS) as pool:
    list(pool.map(decode, range(len(pairs))))
  return DenseDataset(out_images, out_labels, num_classes, class_names=names, source=image_dir)


# ---------------------------------------------------------------------------
# Augmentation: jittable, on batch dicts (NHWC), with per-example random draws.


def image_as_float(images: jax.Array) -> jax.Array:
  """float32 images in [0, 1]: uint8 photos are divided by 255, float images kept."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


def _nearest_rows(n_out: int, start: jax.Array, length: jax.Array, scale: jax.Array) -> jax.Array:
  """PyTorch's mode="nearest" source indices: start + min(floor(dst * in/out), in - 1)."""
  dst = jnp.arange(n_out, dtype=jnp.float32)
  return start + jnp.minimum(jnp.floor(dst * scale).astype(jnp.int32), length - 1)


def _linear_rows(src: jax.Array, start: jax.Array, length: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bilinear taps of source positions `src` (pixels, within [0, length - 1]) of a window at
  `start`: the two indices and the second's weight, as ATen's upsample kernels compute them."""
  i0 = jnp.floor(src).astype(jnp.int32)
  i1 = i0 + (i0 < length - 1).astype(jnp.int32)
  weight = jnp.clip(src - i0, 0.0, 1.0)
  return start + i0, start + i1, weight


def _gather_nearest(x: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  return x[rows[:, None], cols[None, :]]


def _gather_bilinear(x: jax.Array, rows: tuple, cols: tuple) -> jax.Array:
  """x (H x W x C) at the taps: along the width, then the height (ATen's order)."""
  (r0, r1, wy), (c0, c1, wx) = rows, cols
  wx = wx[None, :, None]

  def along_width(r):
    return x[r[:, None], c0[None, :]] * (1 - wx) + x[r[:, None], c1[None, :]] * wx

  wy = wy[:, None, None]
  return along_width(r0) * (1 - wy) + along_width(r1) * wy


def _crop_sizes(height: int, width: int, scales: Sequence[float]) -> np.ndarray:
  """LibMTL's window a scale: (int(H / s), int(W / s))."""
  if not scales or min(scales) < 1:
    raise ValueError(f"scales={tuple(scales)}: a scale-crop zooms in, so every scale must be "
                     ">= 1 (LibMTL's are 1.0, 1.2, 1.5).")
  return np.array([(int(height / s), int(width / s)) for s in scales], np.int32)


def scale_crop(batch: dict[str, jax.Array], scale_index: jax.Array, top: jax.Array,
               left: jax.Array, scales: Sequence[float] = NYU_SCALES,
               normal_interpolation: str = "nearest") -> dict[str, jax.Array]:
  """LibMTL's RandomScaleCrop at given draws: example b's window of int(H/s) x int(W/s)
  (s = scales[scale_index[b]]) at (top[b], left[b]) resized back to H x W; the image bilinear
  (align_corners=True), labels and depth nearest, depth divided by s. Normals nearest, keeping
  them unit and missing pixels missing; "bilinear" reproduces LibMTL, which blends them."""
  if normal_interpolation not in ("nearest", "bilinear"):
    raise ValueError(f"normal_interpolation={normal_interpolation!r}: use 'nearest' or "
                     "'bilinear' (LibMTL's).")
  image = image_as_float(batch["image"])
  _, height, width, _ = image.shape
  sizes = _crop_sizes(height, width, scales)
  near = sizes.astype(np.float32) / np.array([height, width], np.float32)   # in / out, float32
  span = np.array([max(height - 1, 1), max(width - 1, 1)], np.float32)
  lin = np.where(np.array([height, width]) > 1, (sizes - 1).astype(np.float32) / span, 0)
  lin = lin.astype(np.float32)
  factor = np.asarray(scales, np.float32)

  def one(example, k, i, j):
    h, w = jnp.asarray(sizes)[k, 0], jnp.asarray(sizes)[k, 1]
    rows_n = _nearest_rows(height, i, h, jnp.asarray(near)[k, 0])
    cols_n = _nearest_rows(width, j, w, jnp.asarray(near)[k, 1])
    rows_l = _linear_rows(jnp.arange(height, dtype=jnp.float32) * jnp.asarray(lin)[k, 0], i, h)
    cols_l = _linear_rows(jnp.arange(width, dtype=jnp.float32) * jnp.asarray(lin)[k, 1], j, w)
    out = {"image": _gather_bilinear(example["image"], rows_l, cols_l)}
    if "segmentation" in example:
      out["segmentation"] = _gather_nearest(example["segmentation"], rows_n, cols_n)
    if "depth" in example:
      out["depth"] = _gather_nearest(example["depth"], rows_n, cols_n) / jnp.asarray(factor)[k]
    if "normal" in example:
      out["normal"] = (_gather_nearest(example["normal"], rows_n, cols_n)
                       if normal_interpolation == "nearest"
                       else _gather_bilinear(example["normal"], rows_l, cols_l))
    return out

  return jax.vmap(one)({**batch, "image": image}, jnp.asarray(scale_index, jnp.int32),
                       jnp.asarray(top, jnp.int32), jnp.asarray(left, jnp.int32))


def random_scale_crop(key: jax.Array, batch: dict[str, jax.Array],
                      scales: Sequence[float] = NYU_SCALES,
                      normal_interpolation: str = "nearest") -> dict[str, jax.Array]:
  """LibMTL's RandomScaleCrop, an independent draw an example: a scale uniformly from `scales`,
  then the window's top and left uniformly over every place it fits (`scale_crop`)."""
  _, height, width, _ = batch["image"].shape
  sizes = jnp.asarray(_crop_sizes(height, width, scales))
  k_scale, k_top, k_left = jax.random.split(key, 3)
  n = batch["image"].shape[0]
  index = jax.random.randint(k_scale, (n,), 0, len(scales))
  top = jax.random.randint(k_top, (n,), 0, height - sizes[index, 0] + 1)
  left = jax.random.randint(k_left, (n,), 0, width - sizes[index, 1] + 1)
  return scale_crop(batch, index, top, left, scales, normal_interpolation)


def flip(batch: dict[str, jax.Array], which: jax.Array) -> dict[str, jax.Array]:
  """Mirrors the examples where `which` (B bools) is set, left to right; their normals' x
  component is negated, since a mirrored surface faces the other way (LibMTL's flip)."""
  out = {}
  for key, x in batch.items():
    mask = jnp.reshape(which, (-1,) + (1,) * (x.ndim - 1))
    out[key] = jnp.where(mask, x[:, :, ::-1], x)
  if "normal" in out:
    sign = jnp.where(which, -1.0, 1.0).astype(out["normal"].dtype)[:, None, None]
    out["normal"] = out["normal"].at[..., 0].multiply(sign)
  return out


def random_flip(key: jax.Array, batch: dict[str, jax.Array], prob: float = 0.5
                ) -> dict[str, jax.Array]:
  """`flip` of each example with probability `prob` (LibMTL's and mmsegmentation's 0.5)."""
  return flip(batch, jax.random.bernoulli(key, prob, (batch["image"].shape[0],)))


def nyu_augment(key: jax.Array, batch: dict[str, jax.Array], scales: Sequence[float] = NYU_SCALES,
                normal_interpolation: str = "nearest") -> dict[str, jax.Array]:
  """LibMTL's NYUv2 training augmentation: the random scale-crop, then the random flip."""
  k_crop, k_flip = jax.random.split(key)
  return random_flip(k_flip, random_scale_crop(k_crop, batch, scales, normal_interpolation))


def resize_crop(batch: dict[str, jax.Array], ratio: jax.Array, top: jax.Array, left: jax.Array,
                crop_size: tuple[int, int], image_pad: float = 0.0) -> dict[str, jax.Array]:
  """mmsegmentation's Resize (example b by ratio[b], to int(H r + 0.5) x int(W r + 0.5); image
  bilinear with half-pixel centres, labels nearest, as cv2) then the crop_size window at
  (top[b], left[b]) of the resized image, padded at the bottom and right where it is smaller:
  image `image_pad` (mmsegmentation pads after normalising, so pass the mean colour to match),
  labels -1. Only the window is computed, so shapes stay static."""
  if "depth" in batch or "normal" in batch:
    raise ValueError("resize_crop is for segmentation batches; NYUv2's depth and normals take "
                     "random_scale_crop, which rescales the depth.")
  image = image_as_float(batch["image"])
  _, height, width, _ = image.shape
  crop_h, crop_w = crop_size

  def one(example, r, i, j):
    hr = jnp.floor(height * r + 0.5).astype(jnp.int32)
    wr = jnp.floor(width * r + 0.5).astype(jnp.int32)
    ys = jnp.arange(crop_h, dtype=jnp.int32) + i   # Rows of the resized image.
    xs = jnp.arange(crop_w, dtype=jnp.int32) + j
    sy, sx = height / hr.astype(jnp.float32), width / wr.astype(jnp.float32)
    rows_l = _linear_rows(jnp.clip((ys + 0.5) * sy - 0.5, 0, height - 1), 0, height)
    cols_l = _linear_rows(jnp.clip((xs + 0.5) * sx - 0.5, 0, width - 1), 0, width)
    rows_n = jnp.minimum(jnp.floor(ys * sy).astype(jnp.int32), height - 1)
    cols_n = jnp.minimum(jnp.floor(xs * sx).astype(jnp.int32), width - 1)
    inside = (ys < hr)[:, None] & (xs < wr)[None, :]
    out = {"image": jnp.where(inside[..., None], _gather_bilinear(example["image"], rows_l, cols_l),
                              image_pad)}
    if "segmentation" in example:
      out["segmentation"] = jnp.where(inside, _gather_nearest(example["segmentation"], rows_n,
                                                              cols_n), IGNORE_LABEL)
    return out

  return jax.vmap(one)({**batch, "image": image}, jnp.asarray(ratio, jnp.float32),
                       jnp.asarray(top, jnp.int32), jnp.asarray(left, jnp.int32))


def random_resize_crop(key: jax.Array, batch: dict[str, jax.Array], crop_size: tuple[int, int],
                       ratio_range: tuple[float, float] = SEG_RATIO_RANGE,
                       image_pad: float = 0.0) -> dict[str, jax.Array]:
  """mmsegmentation's RandomResize (ratio uniform in `ratio_range`, of the stored size) and
  RandomCrop (a uniform place where the resized image exceeds the crop), per example
  (`resize_crop`). Its cat_max_ratio re-draw of crops one class dominates is not done."""
  lo, hi = ratio_range
  if not 0 < lo <= hi:
    raise ValueError(f"ratio_range={ratio_range}: need 0 < low <= high (mmsegmentation's "
                     "ADE20K setting is (0.5, 2.0)).")
  n, height, width, _ = batch["image"].shape
  k_ratio, k_top, k_left = jax.random.split(key, 3)
  ratio = jax.random.uniform(k_ratio, (n,), jnp.float32, lo, hi)
  hr = jnp.floor(height * ratio + 0.5).astype(jnp.int32)
  wr = jnp.floor(width * ratio + 0.5).astype(jnp.int32)
  top = jax.random.randint(k_top, (n,), 0, jnp.maximum(hr - crop_size[0], 0) + 1)
  left = jax.random.randint(k_left, (n,), 0, jnp.maximum(wr - crop_size[1], 0) + 1)
  return resize_crop(batch, ratio, top, left, crop_size, image_pad)


def segmentation_augment(key: jax.Array, batch: dict[str, jax.Array], crop_size: tuple[int, int],
                         ratio_range: tuple[float, float] = SEG_RATIO_RANGE,
                         flip_prob: float = 0.5, image_pad: float = 0.0) -> dict[str, jax.Array]:
  """mmsegmentation's ADE20K basics: random resize, random crop, random flip (its photometric
  distortion is not done)."""
  k_crop, k_flip = jax.random.split(key)
  cropped = random_resize_crop(k_crop, batch, crop_size, ratio_range, image_pad)
  return random_flip(k_flip, cropped, flip_prob)
