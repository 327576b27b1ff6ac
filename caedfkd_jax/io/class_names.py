"""Class names in label order: the text the category embeddings are made from.

The order is the label order of the datasets (and of every teacher trained on
them), so row k of an embedding table is class k. A custom list is a text file
with one name per line.
"""

import os

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
  """A built-in dataset name (`cifar10`, `cifar100`, `digits`) or the path of a class list."""
  if classes in BUILTIN:
    return list(BUILTIN[classes])
  if not classes.endswith(".txt") and not os.path.exists(classes):
    raise ValueError(f"Unknown classes {classes!r}: use one of {', '.join(BUILTIN)} or the path "
                     "of a FILE.txt with one class name per line.")
  return read_class_file(classes)
