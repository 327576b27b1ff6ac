"""Tiny-ImageNet and ImageNet folders as data specs: labels, readable class names, the eval
transform and the refusals, on tiny layouts written in tmp_path (3 classes, 2 images each)."""

import pathlib
import shutil
import sys
import types

import numpy as np
import pytest
from PIL import Image

from caedfkd_jax.io import class_names, data, imagenet_layouts

TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
TINY_WORDS = {"n01443537": "goldfish, Carassius auratus",
              "n01629819": "European fire salamander, Salamandra salamandra",
              "n01641577": "bullfrog, Rana catesbeiana",
              "n00001740": "entity"}
# Sorted: tench, then the bird and the machine that are both "crane" in ImageNet.
IN_WNIDS = ["n01440764", "n02012849", "n03126707"]
IN_WORDS = {"n01440764": "tench, Tinca tinca", "n02012849": "crane",
            "n03126707": "crane"}
IN_NAMES = ["tench", "crane (n02012849)", "crane (n03126707)"]
SIZES = [(20, 30), (30, 20), (25, 25), (18, 22), (22, 18), (26, 19)]   # (width, height)
SMALL = {"image_size": 12, "resize": 16}


def _save(path: pathlib.Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
  """A seeded random JPEG, as the datasets ship them."""
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
  Image.fromarray(pixels).convert(mode).save(path, format="JPEG", quality=95)


def _tiny(tmp_path: pathlib.Path) -> pathlib.Path:
  """The official layout: images/ under each train class, flat val/ with its annotations."""
  root = tmp_path / "tiny-imagenet-200"
  (root / "train").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(TINY_WNIDS[::-1]) + "\n")   # unsorted on purpose
  (root / "words.txt").write_text("".join(f"{w}\t{t}\n" for w, t in TINY_WORDS.items()))
  rows = []
  for k, wnid in enumerate(TINY_WNIDS):
    for i in range(2):
      _save(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (8, 8), 10 * k + i,
            mode="L" if (k, i) == (1, 0) else "RGB")   # Tiny-ImageNet has grayscale JPEGs
      _save(root / "val" / "images" / f"val_{2 * k + i}.JPEG", (8, 8), 100 + 10 * k + i)
      rows.append(f"val_{2 * k + i}.JPEG\t{wnid}\t0\t0\t7\t7\n")
    (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
  (root / "val" / "val_annotations.txt").write_text("".join(rows[::-1]))
  (root / "test" / "images").mkdir(parents=True)
  return root


def _imagenet(root: pathlib.Path, val: str = "folders", words: bool = True) -> pathlib.Path:
  """train/<wnid>/*.JPEG of mixed sizes; val as class folders, or flat with a label file
  (`csv`, `csv_in_val`, `txt`, `none`)."""
  for k, wnid in enumerate(IN_WNIDS):
    for i in range(2):
      _save(root / "train" / wnid / f"{wnid}_{i}.JPEG", SIZES[2 * k + i], 10 * k + i)
      name = f"ILSVRC2012_val_{2 * k + i + 1:08d}.JPEG"
      folder = root / "val" / wnid if val == "folders" else root / "val"
      _save(folder / name, SIZES[-1 - 2 * k - i], 100 + 10 * k + i)
  labelled = [(f"ILSVRC2012_val_{2 * k + i + 1:08d}", w) for k, w in enumerate(IN_WNIDS)
              for i in range(2)][::-1]
  if val in ("csv", "csv_in_val"):
    where = root if val == "csv" else root / "val"
    (where / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        + "".join(f"{n},{w} 1 2 3 4 {w} 5 6 7 8\n" for n, w in labelled))
  elif val == "txt":
    (root / "val" / "val_labels.txt").write_text("".join(f"{n}.JPEG {w}\n" for n, w in labelled))
  if words:
    (root / "LOC_synset_mapping.txt").write_text(
        "".join(f"{w} {t}\n" for w, t in IN_WORDS.items()))
  return root


def _by_image(ds: data.Dataset) -> dict[bytes, int]:
  """label of each image, whatever the order it was read in."""
  return {image.tobytes(): int(label) for image, label in zip(ds.images, ds.labels)}


# --- Tiny-ImageNet ---


def test_tiny_train_and_val_labels_and_names(tmp_path):
  root = _tiny(tmp_path)
  for spec in (root, tmp_path):   # the folder itself, or the folder holding it
    train = data.load_dataset(str(spec), "train")
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
    assert train.class_names == ["goldfish", "European fire salamander", "bullfrog"]
    assert train.images.shape == (6, 8, 8, 3)
  gray = train.images[2]
  assert (gray[..., 0] == gray[..., 2]).all()   # grayscale file, RGB array
  val = data.load_dataset(str(root), "val")
  np.testing.assert_array_equal(val.labels, [0, 0, 1, 1, 2, 2])   # val_0 .. val_5
  assert data.load_dataset(str(root), "validation").class_names == train.class_names
  assert class_names.resolve_classes(str(root)) == train.class_names


def test_tiny_refusals(tmp_path):
  root = _tiny(tmp_path)
  with pytest.raises(ValueError, match=r"test split is unlabelled.*--split val.*eval_split=val"):
    data.load_dataset(str(root), "test")
  annotations = root / "val" / "val_annotations.txt"
  text = annotations.read_text()
  annotations.write_text(text.replace(TINY_WNIDS[0], "n09999999", 1))
  with pytest.raises(ValueError, match=r"val_annotations.txt line \d+ .* n09999999, which has no "
                     r"train folder"):
    data.load_dataset(str(root), "val")
  annotations.write_text(text + "val_9.JPEG\tn01443537\t0\t0\t7\t7\n")
  with pytest.raises(FileNotFoundError, match=r"lists val_9.JPEG, but .*images has no such"):
    data.load_dataset(str(root), "val")
  annotations.unlink()
  with pytest.raises(FileNotFoundError, match=r"val_annotations.txt is missing.*extract"):
    data.load_dataset(str(root), "val")
  shutil.rmtree(root / "train" / TINY_WNIDS[1] / "images")
  (root / "train" / TINY_WNIDS[1] / "images").mkdir()
  with pytest.raises(ValueError, match=rf"{TINY_WNIDS[1]}/images holds no images"):
    data.load_dataset(str(root), "train")


def test_tiny_without_words_file_names_are_wnids(tmp_path):
  root = _tiny(tmp_path)
  (root / "words.txt").unlink()
  assert data.load_dataset(str(root), "train").class_names == TINY_WNIDS
  assert class_names.resolve_classes(str(root)) == TINY_WNIDS


# --- ImageNet ---


def test_imagenet_train_is_resized_and_named(tmp_path):
  root = _imagenet(tmp_path / "imagenet")
  layout = imagenet_layouts.find_layout(str(root))
  train = imagenet_layouts.load_layout(layout, "train", **SMALL)
  assert train.images.shape == (6, 12, 12, 3)
  np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 2, 2])
  assert train.class_names == IN_NAMES
  with Image.open(root / "train" / IN_WNIDS[0] / f"{IN_WNIDS[0]}_0.JPEG") as img:
    np.testing.assert_array_equal(train.images[0], imagenet_layouts.resize_center_crop(img, 12, 16))
  assert class_names.resolve_classes(str(root)) == IN_NAMES
  (root / "LOC_synset_mapping.txt").unlink()
  assert class_names.resolve_classes(str(root)) == IN_WNIDS
  with pytest.raises(ValueError, match="not a Tiny-ImageNet or ImageNet root"):
    class_names.resolve_classes(str(tmp_path))


def test_imagenet_val_layouts_give_the_same_labels(tmp_path):
  folders = _imagenet(tmp_path / "folders")

  def load(path: pathlib.Path, split: str = "val") -> data.Dataset:
    return imagenet_layouts.load_layout(imagenet_layouts.find_layout(str(path)), split, **SMALL)

  expected = _by_image(load(folders))
  assert sorted(expected.values()) == [0, 0, 1, 1, 2, 2]
  assert _by_image(load(folders / "val")) == expected   # the split folder given as the spec
  for val in ("csv", "csv_in_val", "txt"):
    ds = load(_imagenet(tmp_path / val, val=val))
    assert _by_image(ds) == expected, val
    assert ds.class_names == IN_NAMES
  kaggle = tmp_path / "kaggle"   # Kaggle's download: label files above ILSVRC/Data/CLS-LOC
  _imagenet(kaggle / "ILSVRC" / "Data" / "CLS-LOC", val="none", words=False)
  (tmp_path / "csv" / "LOC_val_solution.csv").rename(kaggle / "LOC_val_solution.csv")
  (tmp_path / "csv" / "LOC_synset_mapping.txt").rename(kaggle / "LOC_synset_mapping.txt")
  ds = load(kaggle, "validation")
  assert _by_image(ds) == expected and ds.class_names == IN_NAMES


def test_imagenet_refusals(tmp_path, monkeypatch):
  root = _imagenet(tmp_path / "flat", val="none")
  layout = imagenet_layouts.find_layout(str(root))
  with pytest.raises(FileNotFoundError, match=r"no label file.*LOC_val_solution.csv.*"
                     r"val_labels.txt of `FILENAME WNID` lines"):
    imagenet_layouts.load_layout(layout, "val", **SMALL)
  with pytest.raises(ValueError, match=r"ImageNet's test split is unlabelled.*--split val"):
    imagenet_layouts.load_layout(layout, "test", **SMALL)
  (root / "val" / "val_labels.txt").write_text("ILSVRC2012_val_00000001.JPEG n09999999\n")
  with pytest.raises(ValueError, match=r"val_labels.txt line 1 labels .* n09999999, which has "
                     "no train folder"):
    imagenet_layouts.load_layout(layout, "val", **SMALL)
  (root / "val" / "val_labels.txt").write_text("ILSVRC2012_val_00000099.JPEG n01440764\n")
  with pytest.raises(FileNotFoundError, match=r"lists ILSVRC2012_val_00000099.JPEG, but"):
    imagenet_layouts.load_layout(layout, "val", **SMALL)
  with monkeypatch.context() as patch:   # checked before any decoding: 6 x 224 px > 100 kB
    patch.setattr(imagenet_layouts, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(ValueError, match=r"6 images at 224x224 take .* GB as uint8, more than "
                       r"the .* GB of free memory; a split is held in memory whole.*streaming"):
      data.load_dataset(str(root), "train")
  for f in (root / "train" / IN_WNIDS[2]).iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=rf"class folder .*{IN_WNIDS[2]} holds no images"):
    imagenet_layouts.load_layout(layout, "train", **SMALL)


def test_pre_resized_square_copy_is_not_blown_up(tmp_path):
  root = tmp_path / "imagenet64"
  for k, wnid in enumerate(IN_WNIDS):
    for i in range(2):
      _save(root / "val" / wnid / f"{i}.JPEG", (8, 8), 10 * k + i)
  ds = imagenet_layouts.load_layout(imagenet_layouts.find_layout(str(root)), "val", **SMALL)
  assert ds.images.shape == (6, 8, 8, 3)


# --- The eval transform ---


def test_resize_center_crop_matches_a_hand_computation():
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (21, 33, 3), dtype=np.uint8)   # 33 wide, 21 high
  # Shorter side 21 -> 16; the long side int(16 * 33 / 21) = int(25.14) = 25. The crop starts
  # round((16 - 12) / 2) = 2 from the top and round((25 - 12) / 2) = round(6.5) = 6 (half to even)
  # from the left, as torchvision's CenterCrop.
  resized = np.asarray(Image.fromarray(pixels).resize((25, 16), Image.BILINEAR))
  got = imagenet_layouts.resize_center_crop(pixels, image_size=12, resize=16)
  np.testing.assert_array_equal(got, resized[2:14, 6:18])
  portrait = np.ascontiguousarray(pixels.transpose(1, 0, 2))   # 21 wide, 33 high
  resized = np.asarray(Image.fromarray(portrait).resize((16, 25), Image.BILINEAR))
  np.testing.assert_array_equal(imagenet_layouts.resize_center_crop(portrait, 12, 16),
                                resized[6:18, 2:14])
  exact = rng.integers(0, 256, (20, 16, 1), dtype=np.uint8)   # shorter side already 16: no resize
  np.testing.assert_array_equal(imagenet_layouts.resize_center_crop(exact, 12, 16),
                                np.repeat(exact[4:16, 2:14], 3, axis=-1))


def test_readable_names_rules():
  words = {"n1": "crane", "n2": "crane, derrick", "n3": "maillot", "n4": "maillot, tank suit",
           "n5": "goldfish, Carassius auratus"}
  assert imagenet_layouts.readable_names(["n1", "n2", "n3", "n4", "n5", "n6"], words) == [
      "crane (n1)", "crane (n2)", "maillot (n3)", "maillot (n4)", "goldfish", "n6"]


def _fake_tfds(monkeypatch, images: list[np.ndarray]) -> None:
  """A stand-in for tensorflow_datasets' random-access source (no TensorFlow, no prepared data)."""
  class Source:
    dataset_info = types.SimpleNamespace(
        features={"image": None, "label": types.SimpleNamespace(names=["a", "b"])})

    def __len__(self):
      return len(images)

    def __getitem__(self, i):
      return {"image": images[i], "label": i % 2}

  fake = types.ModuleType("tensorflow_datasets")
  fake.data_source = lambda name, split, download: Source()
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_tfds_resizes_only_when_sizes_differ(monkeypatch):
  rng = np.random.default_rng(1)
  # The first is already 224 x 224: it is transformed all the same, once the sizes differ.
  mixed = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in [(224, 224), *SIZES[:3]]]
  _fake_tfds(monkeypatch, mixed)
  ds = data._load_tfds("imagenet2012", "validation")   # pylint: disable=protected-access
  assert ds.images.shape == (4, 224, 224, 3)
  for image, raw in zip(ds.images, mixed):
    np.testing.assert_array_equal(image, imagenet_layouts.resize_center_crop(raw))
  fixed = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
  _fake_tfds(monkeypatch, fixed)
  ds = data._load_tfds("cifar10", "test")   # pylint: disable=protected-access
  np.testing.assert_array_equal(ds.images, np.stack(fixed))
  np.testing.assert_array_equal(ds.labels, [0, 1, 0])
