"""ImageNet-1K and Tiny-ImageNet folders as data specs, with human-readable class names.

Both are recognised by their wnid folders (`n` + 8 digits) and read whole into memory like
every other spec of `data.load_dataset`:

- Tiny-ImageNet, the official `tiny-imagenet-200` folder (or a folder holding it):
  `wnids.txt`, `words.txt`, `train/<wnid>/images/*.JPEG` and `val/images/*.JPEG` labelled by
  `val/val_annotations.txt`. Splits `train` and `val` (its `test` is unlabelled). 64x64, read
  as is.
- ImageNet-1K folders: `train/<wnid>/*.JPEG`, and `val/<wnid>/*.JPEG` or a flat `val/*.JPEG`
  labelled by Kaggle's `LOC_val_solution.csv` or a `val_labels.txt` of `FILENAME WNID` lines.
  Kaggle's download folder (with `ILSVRC/Data/CLS-LOC/`) and a split folder of wnid folders
  (`ROOT/val`) work too. The photos differ in size, so they go through torchvision's evaluation
  transform, `resize_center_crop`: what torchvision's ImageNet weights were scored with.

Class k is the k-th wnid in sorted order (torchvision's ImageFolder on `train/`); its name is
the first synonym of the words file (`words.txt`; `LOC_synset_mapping.txt` or
`synset_words.txt`), made unique with the wnid where two share it (ImageNet's two `crane`s).
"""

import collections
import csv
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from caedfkd_jax.io import data as data_lib

IMAGE_SIZE = 224   # torchvision's evaluation transform: CenterCrop(224) ...
RESIZE = 256       # ... after Resize(256), the shorter side, bilinear.
WNID = re.compile(r"^n\d{8}$")
TINY_NAME = "tiny-imagenet-200"
KAGGLE_IMAGES = os.path.join("ILSVRC", "Data", "CLS-LOC")  # under Kaggle's download folder
IMAGENET_WORDS = ("LOC_synset_mapping.txt", "synset_words.txt")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
PLAIN_VAL_LABELS = "val_labels.txt"
SPLIT_ALIASES = {"validation": "val"}   # the tfds name, as configs/train_imagenet_resnet50 uses
SIZE_SAMPLE = 1000   # image headers read to tell photos of many sizes from a pre-resized copy
UNLABELLED_TEST = ("pick the labelled val split instead (evaluate: --split val; probe: "
                   "--test-split val; distill: --config.eval_split=val; train: "
                   "--config.test_split=val)")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a recognised dataset lies."""
  kind: str                   # "tiny-imagenet" or "imagenet"
  root: str                   # the folder holding train/ and val/
  meta_dirs: tuple[str, ...]  # where the words and label files are looked for
  split_folder: str = ""      # set when the spec is one split folder of wnid folders


def find_layout(path: str) -> Layout | None:
  """The Tiny-ImageNet or ImageNet layout at (or directly under) `path`, or None."""
  for root in (path, os.path.join(path, TINY_NAME)):
    if _is_tiny(root):
      return Layout("tiny-imagenet", root, (root,))
  for root in (path, os.path.join(path, KAGGLE_IMAGES)):
    meta = _unique((root, path))
    if any(_wnid_dirs(os.path.join(root, s), limit=1) for s in ("train", "val")):
      return Layout("imagenet", root, meta)
    if _image_files(os.path.join(root, "val"), limit=1) and _val_label_file(root, meta):
      return Layout("imagenet", root, meta)
  if _wnid_dirs(path, limit=1) and not any(
      os.path.isdir(os.path.join(path, s)) for s in ("train", "val", "test")):
    parent = os.path.dirname(path.rstrip(os.sep))
    return Layout("imagenet", parent, _unique((path, parent)), split_folder=path)
  return None


def load_layout(layout: Layout, split: str, progress: bool = False, *,
                image_size: int = IMAGE_SIZE, resize: int = RESIZE) -> data_lib.Dataset:
  """Reads split `split`; ImageNet photos are resized to `resize` then centre-cropped to
  `image_size` (torchvision's evaluation transform)."""
  if layout.kind == "tiny-imagenet":
    paths, labels, source = _tiny_split(layout, split)
    decode, shape = None, None
  else:
    paths, labels, source = _imagenet_split(layout, split)
    if image_size > resize:
      raise ValueError(f"image_size={image_size} is more than resize={resize}: the centre crop "
                       "must fit in the resized image.")
    decode, shape = _imagenet_decoder(paths, image_size, resize)
  if shape is None:
    shape = _header_size(paths[0])
  check_fits_in_memory(len(paths), shape, source)
  images = data_lib.decode_images(paths, progress=progress, decode=decode)
  return data_lib.Dataset(images, np.asarray(labels, np.int32), class_names_for(layout),
                          source=source)


def layout_class_names(path: str) -> list[str] | None:
  """The class names of the dataset root `path` in label order (as its Dataset has them), or
  None when `path` is neither a Tiny-ImageNet nor an ImageNet root. Lists folders only."""
  layout = find_layout(os.path.abspath(os.path.expanduser(path)))
  return None if layout is None else class_names_for(layout)


def class_names_for(layout: Layout) -> list[str]:
  """Readable names of the layout's wnids, or the wnids without a words file."""
  if layout.kind == "tiny-imagenet":
    words = os.path.join(layout.root, "words.txt")
    return readable_names(_tiny_wnids(layout), read_words(words) if os.path.isfile(words) else {})
  words = _first_file(layout.meta_dirs, IMAGENET_WORDS)
  return readable_names(_imagenet_wnids(layout), read_words(words) if words else {})


def read_words(path: str) -> dict[str, str]:
  """wnid -> synonyms from lines `n01443537<TAB or space>goldfish, Carassius auratus`."""
  words = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      parts = line.strip().split(None, 1)
      if len(parts) == 2 and WNID.match(parts[0]):
        words[parts[0]] = parts[1]
  return words


def readable_names(wnids: Sequence[str], words: dict[str, str]) -> list[str]:
  """The first synonym of each wnid (the wnid where it has none); a synonym two wnids share
  gets its wnid appended, `crane (n02012849)`, so that every class keeps one name."""
  first = [(words.get(w) or "").split(",")[0].strip() or w for w in wnids]
  counts = collections.Counter(first)
  return [f"{n} ({w})" if counts[n] > 1 else n for n, w in zip(first, wnids)]


def resize_center_crop(image: Image.Image | np.ndarray, image_size: int = IMAGE_SIZE,
                       resize: int = RESIZE) -> np.ndarray:
  """torchvision's `Resize(resize)` (shorter side, PIL bilinear) then `CenterCrop(image_size)`,
  as uint8 HxWx3: a torchvision ImageNet model scores what it was evaluated on."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  if image.mode != "RGB":
    image = image.convert("RGB")
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long / short)   # torchvision truncates the long side
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.BILINEAR)
  top = round((new_h - image_size) / 2.0)   # torchvision's rounding (half to even)
  left = round((new_w - image_size) / 2.0)
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)))


def stack_images(images: Iterable[np.ndarray], count: int, where: str,
                 image_size: int = IMAGE_SIZE, resize: int = RESIZE) -> np.ndarray:
  """Stacks `count` uint8 HxWxC images as they come. Once one differs in size from the first,
  all go through `resize_center_crop` (tfds:imagenet2012); fixed-size data stays as it is."""
  kept, out = [], None
  for i, image in enumerate(images):
    if out is None and kept and image.shape != kept[0].shape:
      check_fits_in_memory(count, (image_size, image_size), where)
      out = np.empty((count, image_size, image_size, 3), np.uint8)
      for j, earlier in enumerate(kept):
        out[j] = resize_center_crop(earlier, image_size, resize)
      kept = []
    if out is None:
      kept.append(image)
    else:
      out[i] = resize_center_crop(image, image_size, resize)
  if out is not None:
    return out
  if not kept:
    raise ValueError(f"{where} is empty.")
  return np.stack(kept)


def available_memory_bytes() -> int | None:
  """Free physical memory: the package's one probe (`runtime.platform`), imported here only
  when a split is sized, so reading class names does not start JAX."""
  from caedfkd_jax.runtime import platform  # pylint: disable=g-import-not-at-top
  return platform.host_memory_bytes()


def check_fits_in_memory(count: int, size: tuple[int, int], where: str) -> None:
  """Refuses a split whose uint8 array would not fit in the free memory, before decoding."""
  needed = count * size[0] * size[1] * 3
  available = available_memory_bytes()
  if available is not None and needed > available:
    raise ValueError(
        f"{where}: its {count} images at {size[1]}x{size[0]} take {needed / 1e9:.1f} GB as uint8, "
        f"more than the {available / 1e9:.1f} GB of free memory; a split is held in memory "
        "whole, and ImageNet's train split (about 190 GB at 224 px) needs a streaming loader "
        "this project does not have: evaluate on the val split (7.5 GB at 224 px, which fits "
        "a big machine) on a machine with more free memory.")


# ---------------------------------------------------------------------------
# Folders and files.


def _unique(dirs: Iterable[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(os.path.normpath(d) for d in dirs))


def _image_files(directory: str, limit: int | None = None) -> list[str]:
  if not os.path.isdir(directory):
    return []
  if limit is None:
    return data_lib._image_files(directory)  # pylint: disable=protected-access
  found = []
  with os.scandir(directory) as entries:
    for entry in entries:
      if (entry.name.lower().endswith(data_lib.IMAGE_EXTENSIONS)
          and not entry.name.startswith(".") and entry.is_file()):
        found.append(entry.name)
        if len(found) >= limit:
          break
  return found


def _wnid_dirs(directory: str, limit: int | None = None) -> list[str]:
  """Sorted wnid-named subfolders (the first `limit` found, unsorted, with a limit)."""
  if not os.path.isdir(directory):
    return []
  found = []
  with os.scandir(directory) as entries:
    for entry in entries:
      if WNID.match(entry.name) and entry.is_dir():
        found.append(entry.name)
        if limit is not None and len(found) >= limit:
          return found
  return sorted(found)


def _first_file(dirs: Sequence[str], names: Sequence[str]) -> str | None:
  for name in names:
    for directory in dirs:
      if os.path.isfile(os.path.join(directory, name)):
        return os.path.join(directory, name)
  return None


def _header_size(path: str) -> tuple[int, int]:
  """(height, width) from the file header, without decoding the pixels."""
  try:
    with Image.open(path) as img:
      return img.size[1], img.size[0]
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot decode image {path}: {e}") from None


def _normalise_split(split: str, root: str, name: str) -> str:
  split = SPLIT_ALIASES.get(split, split)
  if split == "test":
    raise ValueError(f"{root}: {name}'s test split is unlabelled, so it cannot be scored; "
                     + UNLABELLED_TEST + ".")
  return split


def _class_folder_split(split_dir: str, wnids: Sequence[str],
                        label_of: dict[str, int]) -> tuple[list[str], list[int]]:
  """`split_dir/<wnid>/*.JPEG` (or `<wnid>/images/*.JPEG`), labelled by `label_of`."""
  if not wnids:
    raise ValueError(f"{split_dir} has no <wnid> class folders (n + 8 digits): extract the "
                     "dataset's split there again.")
  paths, labels, empty = [], [], []
  for wnid in wnids:
    if wnid not in label_of:
      raise ValueError(f"{os.path.join(split_dir, wnid)} is a class the train split does not "
                       "have (no train folder of that wnid): remove it, or add its train folder.")
    directory = os.path.join(split_dir, wnid)
    if os.path.isdir(os.path.join(directory, "images")):
      directory = os.path.join(directory, "images")
    files = data_lib._image_files(directory)  # pylint: disable=protected-access
    if not files:
      empty.append(directory)
    paths += [os.path.join(directory, f) for f in files]
    labels += [label_of[wnid]] * len(files)
  if empty:
    raise ValueError(f"the class folder {empty[0]} holds no images"
                     + (f" ({len(empty) - 1} more are empty too)" if len(empty) > 1 else "")
                     + ": every wnid folder needs its images (class k is the k-th wnid in sorted "
                     "order, so none can be dropped); extract the dataset again.")
  return paths, labels


def _labelled_files(image_dir: str, rows: Iterable[tuple[int, str, str]], label_file: str,
                    label_of: dict[str, int], fix: str,
                    stem_only: bool = False) -> tuple[list[str], list[int]]:
  """(line, filename, wnid) rows of `label_file` -> the image paths and labels, sorted by name."""
  on_disk = {}
  for f in _image_files(image_dir):
    on_disk[os.path.splitext(f)[0] if stem_only else f] = f
  found = []
  for line, name, wnid in rows:
    if wnid not in label_of:
      raise ValueError(f"{label_file} line {line} labels {name} with {wnid}, which has no train "
                       f"folder: {fix}.")
    if name not in on_disk:
      raise FileNotFoundError(f"{label_file} line {line} lists {name}, but {image_dir} has no "
                              "such image: extract the images again, or use the label file "
                              "that belongs to them.")
    found.append((on_disk[name], label_of[wnid]))
  if not found:
    raise ValueError(f"{label_file} labels no images: it needs a line per image.")
  found.sort()
  return [os.path.join(image_dir, f) for f, _ in found], [label for _, label in found]


# ---------------------------------------------------------------------------
# Tiny-ImageNet.


def _is_tiny(root: str) -> bool:
  return ((os.path.isfile(os.path.join(root, "wnids.txt"))
           or os.path.isfile(os.path.join(root, "val", "val_annotations.txt")))
          and any(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")))


def _tiny_wnids(layout: Layout) -> list[str]:
  """The train folders' wnids, sorted; `wnids.txt`'s where there is no train folder."""
  wnids_file = os.path.join(layout.root, "wnids.txt")
  listed = None
  if os.path.isfile(wnids_file):
    with open(wnids_file, encoding="utf-8") as f:
      listed = sorted({w.strip() for w in f if w.strip()})
  folders = _wnid_dirs(os.path.join(layout.root, "train"))
  if folders and listed is not None and folders != listed:
    missing = sorted(set(listed) - set(folders))
    extra = sorted(set(folders) - set(listed))
    raise ValueError(
        f"{wnids_file} lists {len(listed)} wnids but {os.path.join(layout.root, 'train')} has "
        f"{len(folders)} wnid folders (" + (f"no folder for {', '.join(missing[:5])}" if missing
                                             else f"{', '.join(extra[:5])} not listed")
        + "): extract tiny-imagenet-200.zip again, so that labels follow the official classes.")
  if folders:
    return folders
  if listed:
    return listed
  raise ValueError(f"{layout.root} has neither train/<wnid> folders nor a wnids.txt: extract "
                   "tiny-imagenet-200.zip again.")


def _tiny_split(layout: Layout, split: str) -> tuple[list[str], list[int], str]:
  root = layout.root
  split = _normalise_split(split, root, "Tiny-ImageNet")
  wnids = _tiny_wnids(layout)
  label_of = {w: k for k, w in enumerate(wnids)}
  split_dir = os.path.join(root, split)
  if split not in ("train", "val"):
    raise ValueError(f"{root} (Tiny-ImageNet) has the splits train and val, not {split!r}; "
                     "pick one of those.")
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f"{split_dir} does not exist: Tiny-ImageNet's {split} split is that "
                            "folder; extract tiny-imagenet-200.zip again.")
  if split == "train" or _wnid_dirs(split_dir, limit=1):
    paths, labels = _class_folder_split(split_dir, _wnid_dirs(split_dir), label_of)
    return paths, labels, split_dir
  annotations = os.path.join(split_dir, "val_annotations.txt")
  if not os.path.isfile(annotations):
    raise FileNotFoundError(
        f"{annotations} is missing: it labels Tiny-ImageNet's val/images/*.JPEG; extract "
        "tiny-imagenet-200.zip again (or sort the images into val/<wnid>/ folders).")
  rows = []
  with open(annotations, encoding="utf-8") as f:
    for line, text in enumerate(f, 1):
      fields = text.rstrip("\n").split("\t")
      if not text.strip():
        continue
      if len(fields) < 2 or not WNID.match(fields[1]):
        raise ValueError(f"{annotations} line {line} is not `FILENAME<TAB>WNID<TAB>x0 y0 x1 y1`: "
                         "extract tiny-imagenet-200.zip again.")
      rows.append((line, fields[0], fields[1]))
  paths, labels = _labelled_files(
      os.path.join(split_dir, "images"), rows, annotations, label_of,
      "add train/<wnid> for it (class k is the k-th train folder) or extract "
      "tiny-imagenet-200.zip again")
  return paths, labels, split_dir


# ---------------------------------------------------------------------------
# ImageNet-1K.


def _val_label_file(root: str, meta_dirs: Sequence[str]) -> str | None:
  return _first_file(_unique((*meta_dirs, os.path.join(root, "val"))),
                     (KAGGLE_VAL_LABELS, PLAIN_VAL_LABELS))


def _imagenet_wnids(layout: Layout) -> list[str]:
  """Class k's wnid: train/'s folders; else the split folder's or val/'s; else the words file's;
  else the val label file's."""
  for directory in (os.path.join(layout.root, "train"),
                    layout.split_folder or os.path.join(layout.root, "val")):
    folders = _wnid_dirs(directory)
    if folders:
      return folders
  words = _first_file(layout.meta_dirs, IMAGENET_WORDS)
  if words and read_words(words):
    return sorted(read_words(words))
  label_file = _val_label_file(layout.root, layout.meta_dirs)
  if label_file:
    return sorted({wnid for _, _, wnid in _val_label_rows(label_file)})
  raise ValueError(f"{layout.root} has no train/<wnid> or val/<wnid> folders, words file or val "
                   "label file to take the classes from.")


def _val_label_rows(path: str) -> list[tuple[int, str, str]]:
  """(line, image name, wnid) of LOC_val_solution.csv (names without extension) or
  val_labels.txt (`FILENAME WNID` lines)."""
  rows = []
  with open(path, encoding="utf-8", newline="") as f:
    if os.path.basename(path) == KAGGLE_VAL_LABELS:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise ValueError(f"{path} does not start with the header ImageId,PredictionString: use "
                         "Kaggle's LOC_val_solution.csv as downloaded.")
      for line, fields in enumerate(reader, 2):
        wnid = fields[1].split()[0] if len(fields) > 1 and fields[1].split() else ""
        if not WNID.match(wnid):
          raise ValueError(f"{path} line {line}: the PredictionString does not start with a "
                           "wnid (n + 8 digits): use Kaggle's LOC_val_solution.csv as downloaded.")
        rows.append((line, fields[0].strip(), wnid))
    else:
      for line, text in enumerate(f, 1):
        fields = text.split()
        if not fields:
          continue
        if len(fields) != 2 or not WNID.match(fields[1]):
          raise ValueError(f"{path} line {line} is not `FILENAME WNID` (e.g. "
                           "ILSVRC2012_val_00000001.JPEG n01751748): write one such line per "
                           "image.")
        rows.append((line, fields[0], fields[1]))
  return rows


def _imagenet_split(layout: Layout, split: str) -> tuple[list[str], list[int], str]:
  wnids = _imagenet_wnids(layout)
  label_of = {w: k for k, w in enumerate(wnids)}
  if layout.split_folder:
    paths, labels = _class_folder_split(layout.split_folder, _wnid_dirs(layout.split_folder),
                                        label_of)
    return paths, labels, layout.split_folder
  root = layout.root
  split = SPLIT_ALIASES.get(split, split)
  split_dir = os.path.join(root, split)
  if _wnid_dirs(split_dir, limit=1):
    paths, labels = _class_folder_split(split_dir, _wnid_dirs(split_dir), label_of)
    return paths, labels, split_dir
  _normalise_split(split, root, "ImageNet")
  if not os.path.isdir(split_dir):
    splits = [s for s in ("train", "val") if os.path.isdir(os.path.join(root, s))]
    raise FileNotFoundError(f"{root} (ImageNet) has no split {split!r} ({split_dir} does not "
                            f"exist); its splits are {' and '.join(splits) or 'none'}: pick one "
                            "of those.")
  if not _image_files(split_dir, limit=1):
    raise ValueError(f"{split_dir} holds neither <wnid> class folders nor images: extract the "
                     f"ImageNet {split} split there again.")
  label_file = _val_label_file(root, layout.meta_dirs) if split == "val" else None
  if label_file is None:
    where = " or ".join(_unique((*layout.meta_dirs, split_dir)))
    raise FileNotFoundError(
        f"{split_dir} holds images but no <wnid> folders, and no label file says their classes: "
        f"put Kaggle's {KAGGLE_VAL_LABELS} (or a {PLAIN_VAL_LABELS} of `FILENAME WNID` lines) in "
        f"{where}, or sort the images into {split_dir}/<wnid>/ folders.")
  kaggle = os.path.basename(label_file) == KAGGLE_VAL_LABELS
  paths, labels = _labelled_files(
      split_dir, _val_label_rows(label_file), label_file, label_of,
      "add train/<wnid> for it (class k is the k-th train folder) or use the label file of "
      "these classes", stem_only=kaggle)
  return paths, labels, split_dir


def _imagenet_decoder(paths: Sequence[str], image_size: int, resize: int
                      ) -> tuple[Callable[[str], np.ndarray] | None, tuple[int, int] | None]:
  """The eval transform, unless the images are a pre-resized square copy no larger than
  `image_size`: a 64x64 set stays 64x64 instead of being blown up to 224, and a copy already
  cropped to 224 is not cropped twice (decided from the headers of up to SIZE_SAMPLE files)."""
  step = max(1, len(paths) // SIZE_SAMPLE)
  sizes = {_header_size(p) for p in paths[::step][:SIZE_SAMPLE]}
  if len(sizes) == 1 and len(paths) > 1:
    (h, w), = sizes
    if h == w <= image_size:
      return None, (h, w)

  def decode(path: str) -> np.ndarray:
    try:
      with Image.open(path) as img:
        return resize_center_crop(img, image_size, resize)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot decode image {path}: {e}") from None

  return decode, (image_size, image_size)
