"""Labelled image datasets for evaluation: whole splits as uint8 arrays in memory.

CAE-DFKD never trains on real data; real images only measure teachers and
students. Evaluation sets are small (CIFAR's 10,000 test images are 30 MB as
uint8), so a split is read once into one array. A data spec is one of:

- an image folder `ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}`, or the split folder
  `ROOT/SPLIT` itself. Class k is the k-th folder name in sorted order.
- the official CIFAR python batches, `cifar-10-batches-py` or `cifar-100-python`
  (fine labels). They are pickles, read with an unpickler that builds nothing
  but numpy arrays, so a tampered file cannot run code.
- the official Tiny-ImageNet folder `tiny-imagenet-200` (splits train, val) and
  ImageNet-1K folders `ROOT/{train,val}/<wnid>/*.JPEG` (or a flat `val/` with
  `LOC_val_solution.csv` or `val_labels.txt`), with their words files' class names
  and, for ImageNet, torchvision's evaluation transform: `imagenet_layouts`.
- `tfds:NAME`, a TensorFlow Datasets dataset prepared in array_record format,
  read through `tfds.data_source` (random access, no TensorFlow import). Images
  of different sizes (imagenet2012) get the same evaluation transform.
"""

import concurrent.futures
import dataclasses
import importlib
import os
import pickle
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TFDS_PREFIX = "tfds:"
DECODE_THREADS = 16   # Pillow releases the GIL while decoding; threads beat processes here.
DECODE_CHUNK = 256    # Images per thread-pool task: amortises the per-task overhead.

SPEC_HELP = ("a data spec is an image folder ROOT/SPLIT/CLASS/*.{jpg,jpeg,png} (or the folder "
             "ROOT/SPLIT itself), the official CIFAR python batches directory "
             "(cifar-10-batches-py or cifar-100-python), a tiny-imagenet-200 or ImageNet "
             "ROOT/{train,val}/<wnid> folder, or tfds:NAME")


@dataclasses.dataclass
class Dataset:
  """One split in memory; `labels[i]` indexes `class_names`."""
  images: np.ndarray        # uint8 NxHxWx3
  labels: np.ndarray        # int32 N
  class_names: list[str]
  source: str = ""          # where it came from, for messages

  def __post_init__(self):
    if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
      raise ValueError(f"{self.source or 'dataset'}: images must be uint8 NxHxWx3, "
                       f"got {self.images.dtype} {self.images.shape}.")
    self.labels = np.asarray(self.labels, np.int32)
    if self.labels.shape != (len(self.images),):
      raise ValueError(f"{self.source or 'dataset'}: {len(self.images)} images but labels "
                       f"of shape {self.labels.shape}.")
    if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
      raise ValueError(f"{self.source or 'dataset'}: labels span [{self.labels.min()}, "
                       f"{self.labels.max()}] but there are {self.num_classes} class names.")

  def __len__(self) -> int:
    return len(self.images)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int]:
    return tuple(self.images.shape[1:3])


def epoch_order(seed: int, epoch: int, num_examples: int, batch: int, *,
                salt: Sequence[int] = ()) -> np.ndarray:
  """Epoch `epoch`'s batches (steps x batch indices): a permutation from (seed, epoch, *salt),
  the last incomplete batch left out (a loader's drop_last), so a resumed epoch sees the same
  batches. `salt` keeps one trainer's orders apart from another's on the same seed."""
  steps = num_examples // batch
  order = np.random.default_rng([seed, epoch, *salt]).permutation(num_examples)
  return order[:steps * batch].reshape(steps, batch)


def load_dataset(spec: str, split: str = "test", progress: bool = False) -> Dataset:
  """Reads split `split` of the dataset named by `spec` (see the module docstring)."""
  if spec.startswith(TFDS_PREFIX):
    return _load_tfds(spec[len(TFDS_PREFIX):], split)
  path = os.path.abspath(os.path.expanduser(spec))
  if not os.path.exists(path):
    raise FileNotFoundError(f"data {spec!r}: {path} does not exist; {SPEC_HELP}.")
  if not os.path.isdir(path):
    raise ValueError(f"data {spec!r}: {path} is a file, not a directory; {SPEC_HELP}.")
  cifar = _find_cifar_batches(path)
  if cifar is not None:
    return _load_cifar_batches(cifar, split)
  from caedfkd_jax.io import imagenet_layouts  # pylint: disable=g-import-not-at-top
  layout = imagenet_layouts.find_layout(path)
  if layout is not None:
    return imagenet_layouts.load_layout(layout, split, progress)
  return _load_image_folder(path, split, progress)


# ---------------------------------------------------------------------------
# Image folders.


def _image_files(directory: str) -> list[str]:
  return sorted(f for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
                and os.path.isfile(os.path.join(directory, f)))


def _class_dirs(directory: str) -> list[str]:
  return sorted(d for d in os.listdir(directory)
                if not d.startswith(".") and os.path.isdir(os.path.join(directory, d)))


def _split_dir(root: str, split: str) -> str:
  """ROOT/SPLIT, or ROOT when it is a split folder itself (class folders of images)."""
  candidate = os.path.join(root, split)
  if os.path.isdir(candidate):
    return candidate
  classes = _class_dirs(root)
  if any(_image_files(os.path.join(root, c)) for c in classes):
    return root
  layout = "ROOT/SPLIT/CLASS/*.{jpg,jpeg,png}"
  if classes:
    raise FileNotFoundError(
        f"{root} has no split {split!r} ({candidate} does not exist); its folders "
        f"{', '.join(classes[:10])} hold no images, so it is not a split folder either. "
        f"Expected the layout {layout}; pick the split (evaluate: --split; probe: --train-split, "
        "--test-split; distill: --config.eval_split; train: --config.train_split).")
  raise ValueError(f"{root} is empty: {SPEC_HELP}.")


def _load_image_folder(root: str, split: str, progress: bool) -> Dataset:
  split_dir = _split_dir(root, split)
  classes = _class_dirs(split_dir)
  if not classes:
    raise ValueError(f"{split_dir} has no class folders: expected {split_dir}/CLASS/"
                     "*.{jpg,jpeg,png}, one folder per class.")
  paths, labels, empty = [], [], []
  for label, name in enumerate(classes):
    files = _image_files(os.path.join(split_dir, name))
    if not files:
      empty.append(name)
    paths += [os.path.join(split_dir, name, f) for f in files]
    labels += [label] * len(files)
  if empty:
    raise ValueError(
        f"{split_dir}: the class folders {', '.join(empty[:10])} hold no "
        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images; every class folder needs at "
        "least one (class k is the k-th folder in sorted order, so none can be dropped).")
  images = decode_images(paths, progress=progress)
  return Dataset(images, np.asarray(labels, np.int32), classes, source=split_dir)


def _decode_rgb(path: str) -> np.ndarray:
  try:
    with Image.open(path) as img:
      return np.asarray(img.convert("RGB"))
  except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
    raise ValueError(f"cannot decode image {path}: {e}") from None


def decode_images(paths: Sequence[str], progress: bool = False,
                  threads: int = DECODE_THREADS,
                  decode: Callable[[str], np.ndarray] | None = None) -> np.ndarray:
  """Decodes image files to one uint8 NxHxWx3 array; all must share one size. `decode` (a path
  to uint8 HxWx3; default: the file as RGB) is how ImageNet's photos are resized on the way."""
  if not paths:
    raise ValueError("no image files to decode.")
  decode = decode or _decode_rgb
  first = decode(paths[0])
  images = np.empty((len(paths), *first.shape), np.uint8)

  def decode_chunk(start: int) -> int:
    for i in range(start, min(start + DECODE_CHUNK, len(paths))):
      image = decode(paths[i])
      if image.shape != first.shape:
        raise ValueError(
            f"{paths[i]} is {image.shape[1]}x{image.shape[0]}, but {paths[0]} is "
            f"{first.shape[1]}x{first.shape[0]}: all images of a split must share one "
            "size (resize them to the network's input size first).")
      images[i] = image
    return min(start + DECODE_CHUNK, len(paths)) - start

  bar = _progress_bar(len(paths), "decoding", progress)
  with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
    for n in pool.map(decode_chunk, range(0, len(paths), DECODE_CHUNK)):
      bar.update(n)
  bar.close()
  return images


def _progress_bar(total: int, desc: str, enabled: bool):
  """A transient bar, on a terminal only: piped into a log it would stay as a stray line (and
  before an error, as a second line of it)."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit="img", disable=None if enabled else True, leave=False)


# ---------------------------------------------------------------------------
# Official CIFAR python batches.


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
  name: str
  splits: dict[str, tuple[str, ...]]
  meta: str
  labels_key: str
  names_key: str


CIFAR10_LAYOUT = _CifarLayout(
    "cifar-10-batches-py",
    {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)},
    "batches.meta", "labels", "label_names")
CIFAR100_LAYOUT = _CifarLayout(
    "cifar-100-python", {"train": ("train",), "test": ("test",)},
    "meta", "fine_labels", "fine_label_names")


def _find_cifar_batches(path: str) -> tuple[str, _CifarLayout] | None:
  """(directory, layout) if `path` is (or directly holds) an official CIFAR python dir."""
  for layout in (CIFAR10_LAYOUT, CIFAR100_LAYOUT):
    for directory in (path, os.path.join(path, layout.name)):
      if (os.path.isfile(os.path.join(directory, layout.meta))
          and any(os.path.isfile(os.path.join(directory, f))
                  for files in layout.splits.values() for f in files)):
        return directory, layout
  return None


def _numpy_attr(module: str, name: str) -> Any:
  """numpy.core.X.name / numpy._core.X.name under whichever numpy is installed."""
  submodule = module.split(".", 2)[2]
  for package in ("numpy._core", "numpy.core"):
    try:
      return getattr(importlib.import_module(f"{package}.{submodule}"), name)
    except (ImportError, AttributeError):
      continue
  raise AttributeError(f"numpy has no {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
  """`_codecs.encode` as protocol-2 pickles use it for bytes, and nothing else."""
  if encoding.lower().replace("-", "") != "latin1" or not isinstance(text, str):
    raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
  return text.encode("latin1")


# (module, name) a CIFAR batch may name -> what it resolves to. Everything here
# only builds arrays from data; any other global (os.system, builtins.eval,
# subprocess...) is how a pickle runs code, and is refused.
_NUMPY_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {}
for _core in ("numpy.core", "numpy._core"):
  _NUMPY_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = (
      lambda: _numpy_attr("numpy.core.multiarray", "_reconstruct"))
  _NUMPY_GLOBALS[(f"{_core}.multiarray", "scalar")] = (
      lambda: _numpy_attr("numpy.core.multiarray", "scalar"))
  _NUMPY_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = (
      lambda: _numpy_attr("numpy.core.numeric", "_frombuffer"))
_NUMPY_GLOBALS[("numpy", "ndarray")] = lambda: np.ndarray
_NUMPY_GLOBALS[("numpy", "dtype")] = lambda: np.dtype
_NUMPY_GLOBALS[("_codecs", "encode")] = lambda: _latin1_encode


class ArrayOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts/lists/strings/numbers and numpy arrays; refuses every other global."""

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) in _NUMPY_GLOBALS:
      return _NUMPY_GLOBALS[(module, name)]()
    raise pickle.UnpicklingError(
        f"refused to load the global {module}.{name}: only numpy arrays may be built")


def load_array_pickle(path: str) -> Any:
  """A pickle of plain data and numpy arrays (Python 2 pickles too); nothing in it runs."""
  with open(path, "rb") as f:
    try:
      return ArrayOnlyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
      if "refused to load the global" in str(e):
        raise ValueError(
            f"{path} was refused: {e}. A CIFAR batch holds only arrays, lists and "
            "strings; this file would import other code when unpickled, and nothing "
            "in it was run. Download the official batches again.") from None
      raise ValueError(f"{path} is not a readable pickle ({e}): the file is corrupt or not "
                       "a CIFAR python batch; download the official batches again.") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
      raise ValueError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}: {e}); "
                       "download the official batches again.") from None


def _str_keys(obj: Any, path: str) -> dict[str, Any]:
  if not isinstance(obj, dict):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch.")
  return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(d: dict[str, Any], key: str, path: str) -> Any:
  if key not in d:
    raise ValueError(f"{path} has no {key!r} entry (it has {sorted(d)}); is it an "
                     "official CIFAR python batch?")
  return d[key]


def _load_cifar_batches(found: tuple[str, _CifarLayout], split: str) -> Dataset:
  directory, layout = found
  if split not in layout.splits:
    raise ValueError(f"{directory} ({layout.name}) has the splits "
                     f"{', '.join(layout.splits)}, not {split!r}; pick one of those.")
  meta_path = os.path.join(directory, layout.meta)
  names = _field(_str_keys(load_array_pickle(meta_path), meta_path), layout.names_key,
                 meta_path)
  class_names = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
  images, labels = [], []
  for filename in layout.splits[split]:
    path = os.path.join(directory, filename)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing: split {split!r} of {layout.name} is "
                              f"the files {', '.join(layout.splits[split])}.")
    batch = _str_keys(load_array_pickle(path), path)
    data = _field(batch, "data", path)
    data = (np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray))
            else np.asarray(data))
    if data.dtype != np.uint8 or data.size % (3 * 32 * 32):
      raise ValueError(f"{path}: 'data' must be uint8 rows of 3072 values (3x32x32), "
                       f"got {data.dtype} with {data.size} values.")
    # Rows are planar: 1024 red, 1024 green, then 1024 blue values.
    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    batch_labels = np.asarray(_field(batch, layout.labels_key, path))
    if batch_labels.shape != (len(images[-1]),):
      raise ValueError(f"{path}: {len(images[-1])} images but {batch_labels.size} labels.")
    labels.append(batch_labels.astype(np.int32))
  return Dataset(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels),
                 class_names, source=f"{directory} ({split})")


# ---------------------------------------------------------------------------
# TensorFlow Datasets.


def _tfds_prepare_hint(name: str) -> str:
  return (f"prepare it once in array_record format (that needs TensorFlow, which this "
          f"project does not): `pip install tensorflow && tfds build {name} "
          f"--file_format=array_record`, or in Python `import tensorflow_datasets as tfds; "
          f"tfds.builder('{name}', file_format='array_record').download_and_prepare()`. "
          "Set TFDS_DATA_DIR if it lives elsewhere than ~/tensorflow_datasets.")


def _load_tfds(name: str, split: str) -> Dataset:
  if not name:
    raise ValueError(f"data spec {TFDS_PREFIX!r} names no dataset: write tfds:NAME, "
                     "e.g. tfds:cifar10.")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"tfds:{name} needs tensorflow-datasets: "
                      "pip install tensorflow-datasets") from e
  try:
    source = tfds.data_source(name, split=split, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"tfds:{name}: TensorFlow Datasets has no dataset {name!r}; see "
                     "https://www.tensorflow.org/datasets/catalog.") from None
  except Exception as e:  # noqa: BLE001 - tfds reports "not prepared" in many ways
    try:
      builder = tfds.builder(name)
      prepared, splits = builder.is_prepared(), list(builder.info.splits)
      data_dir = builder.data_dir
    except Exception:  # noqa: BLE001 - the first error is the one to report
      prepared, splits, data_dir = False, [], "the TFDS data directory"
    if not prepared:
      raise ValueError(f"tfds:{name} is not prepared in {data_dir}: "
                       f"{_tfds_prepare_hint(name)}") from None
    if splits and split.split("[")[0] not in splits:
      raise ValueError(f"tfds:{name} has the splits {', '.join(splits)}, not {split!r}; "
                       "pick one of those.") from None
    raise ValueError(f"tfds:{name} ({data_dir}) cannot be read by random access "
                     f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                     f"it may be prepared as tfrecord: {_tfds_prepare_hint(name)}") from None
  features = source.dataset_info.features
  for key in ("image", "label"):
    if key not in features:
      raise ValueError(f"tfds:{name} has the features {', '.join(features)}; evaluation "
                       "needs 'image' and 'label'.")
  class_names = list(features["label"].names)
  if not len(source):
    raise ValueError(f"tfds:{name} split {split!r} is empty.")
  labels = []

  def examples():
    for i in range(len(source)):
      example = source[i]
      labels.append(int(example["label"]))
      yield np.asarray(example["image"], np.uint8)

  from caedfkd_jax.io import imagenet_layouts  # pylint: disable=g-import-not-at-top
  # One size (cifar10, imagenet_resized/64x64) is kept as is; photos of many sizes
  # (imagenet2012) are resized and centre-cropped as torchvision evaluates them.
  images = imagenet_layouts.stack_images(examples(), len(source), f"tfds:{name} ({split})")
  if images.shape[-1] == 1:  # grayscale datasets (mnist...): the zoo takes RGB
    images = np.repeat(images, 3, axis=-1)
  return Dataset(images, np.asarray(labels, np.int32), class_names,
                 source=f"tfds:{name} ({split})")
