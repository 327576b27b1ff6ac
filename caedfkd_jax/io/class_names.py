"""Class names in label order: the text the category embeddings are made from.

The order is the label order of the datasets (and of every teacher trained on
them), so row k of an embedding table is class k. A custom list is a text file
with one name per line; a Tiny-ImageNet or ImageNet root gives its words file's names.
"""

import os
import re
from collections.abc import Callable, Sequence

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# CIFAR-100 fine labels, alphabetical as in the dataset's official `meta` file.
CIFAR100 = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]

# scikit-learn's 8x8 digits (labels 0-9), used by `caedfkd demo`.
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

BUILTIN = {"cifar10": CIFAR10, "cifar100": CIFAR100, "digits": DIGITS}


def read_class_file(path: str) -> list[str]:
  """Reads `FILE.txt`, one class name per line in label order; blank lines are skipped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Class list {path} does not exist; give a text file with one class "
                            f"name per line, or one of {', '.join(BUILTIN)}.")
  with open(path, encoding="utf-8") as f:
    names = [line.strip() for line in f]
  names = [n for n in names if n]
  if not names:
    raise ValueError(f"Class list {path} is empty; write one class name per line.")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"Class list {path} names {duplicates} more than once; each class needs "
                     "exactly one line.")
  return names


def resolve_classes(classes: str) -> list[str]:
  """A built-in dataset name (`cifar10`, `cifar100`, `digits`), the path of a class list, or a
  Tiny-ImageNet / ImageNet dataset root (its readable names, in the label order its Dataset has:
  one command makes a 200- or 1000-class embedding table)."""
  if classes in BUILTIN:
    return list(BUILTIN[classes])
  if os.path.isdir(classes):
    from caedfkd_jax.io import imagenet_layouts  # pylint: disable=g-import-not-at-top
    names = imagenet_layouts.layout_class_names(classes)
    if names is None:
      raise ValueError(f"Classes {classes!r} is a directory but not a Tiny-ImageNet or ImageNet "
                       "root (tiny-imagenet-200, or ROOT/train/<wnid> folders): give such a root, "
                       f"a FILE.txt with one class name per line, or one of {', '.join(BUILTIN)}.")
    return names
  if not classes.endswith(".txt") and not os.path.exists(classes):
    raise ValueError(f"Unknown classes {classes!r}: use one of {', '.join(BUILTIN)}, the path "
                     "of a FILE.txt with one class name per line, or a Tiny-ImageNet or ImageNet "
                     "dataset root.")
  return read_class_file(classes)


# --- Where data meets a model: are its labels the model's classes? ---

_INDEX_PREFIX = re.compile(r"^(\d+)[_\- ](.+)$")


def name_key(name: str) -> str:
  """"Lawn_Mower", "lawn mower" -> "lawn mower": data and bundles spell names either way."""
  return " ".join(name.replace("_", " ").lower().split())


def _data_key(name: str, label: int) -> str:
  """A folder named "3_cat" for label 3 (the prefix that keeps sorted order = label order, as
  `caedfkd demo` writes) is the class "cat"."""
  match = _INDEX_PREFIX.match(name)
  if match and int(match.group(1)) == label:
    name = match.group(2)
  return name_key(name)


def shown(names: Sequence[str], limit: int = 10) -> str:
  """The first `limit` names for a message, and how many there are in all."""
  return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_class_names(model_names: list[str] | None, data_names: list[str], where: str,
                      override: str, allow: bool = False,
                      say: Callable[[str], None] = print) -> None:
  """Refuses data whose label k is not the model's class k (compared ignoring case and `_`/space):
  scored, its accuracy would be silently wrong (a shuffled folder order scored 25% where the
  model scores 84%). `override` names the flag that lets it through (`allow`), with a warning.

  Names that are only label indices ("0", "1", ...) and a model without names cannot be
  compared: the data's label order is taken as the model's, and `say` says so.
  """
  if not model_names:
    say(f"Note: the model records no class names, so {where}'s labels are taken as its classes in "
        "label order (give `caedfkd convert --class-names` to have them checked).")
    return
  if len(model_names) != len(data_names):
    return   # A count mismatch has its own error (evaluate.check_fits).
  data_keys = [_data_key(n, k) for k, n in enumerate(data_names)]
  if all(key.isdigit() and int(key) == k for k, key in enumerate(data_keys)):
    say(f"Note: {where} names its classes only by index, so its label k is taken as the model's "
        f"class k ({shown(model_names, 3)}).")
    return
  model_keys = [name_key(n) for n in model_names]
  if data_keys == model_keys:
    return
  if sorted(data_keys) == sorted(model_keys):
    differ = [k for k in range(len(data_keys)) if data_keys[k] != model_keys[k]]
    what = ("holds the model's classes in another order: "
            + "; ".join(f"label {k} is {data_names[k]!r} but the model's class {k} is "
                        f"{model_names[k]!r}" for k in differ[:3])
            + (f"; and {len(differ) - 3} more" if len(differ) > 3 else ""))
  else:
    what = (f"has other classes than the model: the data's are {shown(data_names)}; the model's "
            f"are {shown(model_names)}")
  message = (f"{where} {what}. Scores would be silently wrong: use data whose classes are the "
             f"model's in label order (an image folder's class k is its k-th folder in sorted "
             f"order; prefix the names with their index, e.g. 0_airplane, to fix the order), or "
             f"pass {override} if the labels are right whatever the names say.")
  if not allow:
    raise ValueError(message)
  say(f"Warning ({override}): {message}")
