"""Dense-transfer data (transfer/data.py): the NYUv2 MTAN layout round trip on procedural scenes,
every refusal, ADE20K-style folders of tiny PNGs, and the augmentation's invariants (and its
match to PyTorch's F.interpolate, as LibMTL's RandomScaleCrop calls it)."""

import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from caedfkd_jax.io import imagenet_layouts
from caedfkd_jax.transfer import data as td
from caedfkd_jax.transfer import procedural_nyu as pn

H, W = 16, 24


# ---------------------------------------------------------------------------
# NYUv2, MTAN's layout.


def test_nyu_round_trip_on_procedural_scenes(tmp_path, cifar10_dir):
  root = str(tmp_path / "nyu")
  names = pn.make_dataset(root, 3, 2, H, W, str(cifar10_dir), seed=0)
  for split, count in (("train", 3), ("val", 2)):
    ds = td.load_nyu(root, split, num_classes=len(names))
    assert len(ds) == count and ds.class_names == names and ds.tasks == td.TASKS
    assert (ds.images.dtype, ds.labels.dtype, ds.depth.dtype, ds.normal.dtype) == (
        np.float32, np.int32, np.float32, np.float32)
    assert (ds.images.shape, ds.labels.shape, ds.depth.shape, ds.normal.shape) == (
        (count, H, W, 3), (count, H, W), (count, H, W, 1), (count, H, W, 3))
    for n in range(count):
      files = {k: np.load(os.path.join(root, split, k, f"{n}.npy")) for k in pn.KINDS}
      np.testing.assert_array_equal(ds.images[n], files["image"])
      np.testing.assert_array_equal(ds.labels[n], files["label"].astype(np.int32))
      np.testing.assert_array_equal(ds.depth[n], files["depth"])
      np.testing.assert_array_equal(ds.normal[n], files["normal"])
    assert (ds.labels == -1).any()   # The missing pixels stay ignored.
  by_spec = td.load_dense(root, "test", num_classes=len(names))   # MTAN's val is NYUv2's test.
  np.testing.assert_array_equal(by_spec.labels, td.load_nyu(root, "val", len(names)).labels)
  batch = by_spec.batch([1, 0])
  assert set(batch) == {"image", *td.TASKS} and batch["segmentation"].shape == (2, H, W)


def _write_nyu(root: pathlib.Path, count: int = 2, splits=("train", "val"), h: int = 4,
               w: int = 6) -> pathlib.Path:
  """A valid tiny MTAN layout: grey images, label 1, depth 2 m, normals facing the camera."""
  arrays = {"image": np.full((h, w, 3), 0.5, np.float32), "label": np.ones((h, w), np.float32),
            "depth": np.full((h, w, 1), 2.0, np.float32),
            "normal": np.tile(np.float32([0, 0, 1]), (h, w, 1))}
  for split in splits:
    for kind, array in arrays.items():
      (root / split / kind).mkdir(parents=True, exist_ok=True)
      for n in range(count):
        np.save(root / split / kind / f"{n}.npy", array)
  return root


def _put(root, kind, n, array, split="train"):
  np.save(root / split / kind / f"{n}.npy", np.asarray(array))


def test_nyu_tiny_layout_reads(tmp_path):
  ds = td.load_nyu(str(_write_nyu(tmp_path)), "train")
  assert ds.num_classes == 13 and ds.class_names is None and len(ds) == 2
  assert np.all(ds.labels == 1) and np.all(ds.depth == 2)


def _break(kind):
  """Edits that make a valid tiny layout invalid, and words its refusal must hold."""
  rng = np.random.default_rng(0)
  return {
      "no_split": (lambda r: shutil.rmtree(r / "train"),
                   ["train", "does not exist", "{train,val}/{image,label,depth,normal}"]),
      "no_subfolder": (lambda r: shutil.rmtree(r / "train" / "depth"),
                       ["no depth folder", "N.npy"]),
      "indices_differ": (lambda r: os.remove(r / "train" / "normal" / "1.npy"),
                         ["image/ and normal/", "only image/ has 1.npy"]),
      "gap": (lambda r: [os.rename(r / "train" / k / "1.npy", r / "train" / k / "2.npy")
                         for k in pn.KINDS], ["1.npy is missing", "0..count-1"]),
      "bad_name": (lambda r: os.rename(r / "train" / "image" / "1.npy",
                                       r / "train" / "image" / "01.npy"), ["01.npy", "N.npy"]),
      "label_vs_image": (lambda r: [_put(r, "label", n, np.ones((4, 5))) for n in (0, 1)],
                         ["(4, 5)", "label must be (4, 6)"]),
      "between_files": (lambda r: _put(r, "depth", 1, np.ones((4, 7, 1), np.float32)),
                        ["1.npy is (4, 7, 1)", "0.npy is (4, 6, 1)", "share one shape"]),
      "label_range": (lambda r: _put(r, "label", 1, np.full((4, 6), 13.0, np.float32)),
                      [os.path.join("label", "1.npy"), "label 13", "[-1, 13)", "--num-classes"]),
      "label_fractional": (lambda r: _put(r, "label", 0, np.full((4, 6), 2.5, np.float32)),
                           ["fractional", "not a label map"]),
      "image_0_255": (lambda r: _put(r, "image", 0, np.full((4, 6, 3), 128.0, np.float32)),
                      ["[128, 128]", "[0, 1]", "divide 0..255"]),
      "negative_depth": (lambda r: _put(r, "depth", 0, np.full((4, 6, 1), -1.0, np.float32)),
                         ["negative", "not a depth map"]),
      "image_as_normal": (lambda r: _put(r, "normal", 0, rng.uniform(0, 1, (4, 6, 3))),
                          ["not unit vectors", "not a normal map"]),
      "nan": (lambda r: _put(r, "depth", 0, np.full((4, 6, 1), np.nan, np.float32)),
              ["NaN"]),
      "pickled": (lambda r: np.save(r / "train" / "image" / "0.npy",
                                    np.array([{"a": 1}], dtype=object), allow_pickle=True),
                  ["cannot read", "numpy.save"]),
      "strings": (lambda r: _put(r, "label", 0, np.full((4, 6), "x")), ["<U1", "numbers"]),
      "classes_txt": (lambda r: (r / "classes.txt").write_text("a\nb\n"),
                      ["classes.txt lists 2 classes", "--num-classes 2"]),
  }[kind]


@pytest.mark.parametrize("kind", [
    "no_split", "no_subfolder", "indices_differ", "gap", "bad_name", "label_vs_image",
    "between_files", "label_range", "label_fractional", "image_0_255", "negative_depth",
    "image_as_normal", "nan", "pickled", "strings", "classes_txt"])
def test_nyu_refusals(tmp_path, kind):
  root = _write_nyu(tmp_path)
  edit, words = _break(kind)
  edit(root)
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    td.load_nyu(str(root), "train")
  message = str(info.value)
  assert "\n" not in message
  for word in words:
    assert word in message, (word, message)


def test_nyu_refuses_what_does_not_fit_in_memory(tmp_path, monkeypatch):
  root = _write_nyu(tmp_path)
  monkeypatch.setattr(imagenet_layouts, "available_memory_bytes", lambda: 1000)
  with pytest.raises(ValueError, match=r"2 examples at 4 x 6 .* take 0.0 GB .* held in memory"):
    td.load_nyu(str(root), "train")


@pytest.mark.parametrize("spec,words", [
    ("tfds:nyu_depth_v2", ["depth only", "no semantic labels", "{train,val}/{image,label"]),
    ("tfds:nyu_depth_v2/default:1.0.0", ["depth only"]),
    ("tfds:scene_parse150", ["instance annotations", "ADEChallengeData2016.zip",
                             "ROOT/images/SPLIT"]),
    ("tfds:cityscapes", ["reads folders, not tfds"]),
])
def test_tfds_specs_are_refused_with_the_layout_to_use(spec, words):
  with pytest.raises(ValueError) as info:
    td.load_dense(spec, "train")
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_a_folder_of_neither_layout_is_refused(tmp_path):
  (tmp_path / "train" / "cat").mkdir(parents=True)
  with pytest.raises(ValueError, match="is neither .*image,label,depth,normal.* nor .*annotations"):
    td.load_dense(str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    td.load_dense(str(tmp_path / "absent"), "train")


def test_check_size():
  td.check_size(288, 384, 32)
  td.check_size(288, 384, 8)
  with pytest.raises(ValueError, match=r"290x384 .* output stride 16 must .*e.g. 288x384"):
    td.check_size(290, 384, 16)
  with pytest.raises(ValueError, match="at least 1"):
    td.check_size(8, 8, 0)


# ---------------------------------------------------------------------------
# ADE20K-style folders.


def _png(path: pathlib.Path, array: np.ndarray, fmt: str = "PNG") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def _ade(tmp_path: pathlib.Path) -> pathlib.Path:
  """Three images of different sizes, their masks: 0 = unlabelled, 1..3 the classes."""
  root = tmp_path / "ADEChallengeData2016"
  rng = np.random.default_rng(0)
  halves = np.zeros((16, 32), np.uint8)
  halves[:, :16], halves[:, 16:] = 1, 2      # Left half class 1, right half class 2.
  halves[0, :] = 0                           # An unlabelled row.
  for split, stem, mask in (("training", "ADE_train_00000001", halves),
                            ("training", "ADE_train_00000002", np.full((20, 16), 3, np.uint8)),
                            ("validation", "ADE_val_00000001", np.full((16, 16), 2, np.uint8))):
    pixels = rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    _png(root / "images" / split / f"{stem}.png", pixels)
    _png(root / "annotations" / split / f"{stem}.png", mask)
  (tmp_path / "names.txt").write_text("wall\nfloor\nsky\n")
  return root


def test_ade_folders_read_resize_and_map_labels(tmp_path):
  root = _ade(tmp_path)
  names = str(tmp_path / "names.txt")
  ds = td.load_dense(str(tmp_path), "train", class_names_file=names, size=16)   # The parent works.
  assert ds.images.shape == (2, 16, 16, 3) and ds.images.dtype == np.uint8
  assert ds.class_names == ["wall", "floor", "sky"] and ds.depth is None and ds.tasks == (
      "segmentation",)
  # 16 x 32 -> shorter side already 16, centre columns 8..23: classes 1 | 2 become 0 | 1.
  expected = np.zeros((16, 16), np.int32)
  expected[:, 8:] = 1
  expected[0] = -1
  np.testing.assert_array_equal(ds.labels[0], expected)
  with Image.open(root / "images" / "training" / "ADE_train_00000001.png") as img:
    np.testing.assert_array_equal(ds.images[0], np.asarray(img)[:, 8:24])
  assert np.all(ds.labels[1] == 2)      # 20 x 16 resized to 16 x 20 (nearest), then cropped.
  val = td.load_segmentation(str(root), "val", names, size=None)   # One size: read as is.
  assert val.images.shape == (1, 16, 16, 3) and np.all(val.labels == 1)
  # Without reduce_zero_label 0 is a class and 255 ignored.
  raw = td.load_segmentation(str(root), "validation", names, reduce_zero_label=False)
  assert np.all(raw.labels == 2)


def test_ade_default_classes_from_the_folder_name(tmp_path):
  root = _ade(tmp_path)
  ds = td.load_segmentation(str(root), "val")
  assert ds.num_classes == 150 and ds.class_names is None


@pytest.mark.parametrize("kind,words", [
    ("sizes_differ", ["is 16x20", "is 32x16", "pass size="]),
    ("beyond_classes", ["ADE_val_00000001.png", "mask value 9", "3 classes", "class list file"]),
    ("image_without_mask", ["extra_a.png, extra_b.png, extra_c.png and 1 more", "have no mask"]),
    ("mask_without_image", ["lonely.png have no image"]),
    ("rgb_mask", ["is a RGB image", "one-channel"]),
    ("mask_size", ["but its mask", "pixel for pixel"]),
    ("no_split", ["does not exist", "training, validation", "ROOT/images/SPLIT"]),
    ("generic_without_classes", ["is not ADEChallengeData2016", "class list file"]),
    ("absent_class_file", ["absent.txt does not exist", "a name a line"]),
])
def test_segmentation_refusals(tmp_path, kind, words):
  root = _ade(tmp_path)
  names, split, size = str(tmp_path / "names.txt"), "val", 16
  val_images, val_masks = root / "images" / "validation", root / "annotations" / "validation"
  if kind == "sizes_differ":
    split, size = "train", None
  elif kind == "beyond_classes":
    _png(val_masks / "ADE_val_00000001.png", np.full((16, 16), 9, np.uint8))
  elif kind == "image_without_mask":
    for stem in ("extra_a", "extra_b", "extra_c", "extra_d"):
      _png(val_images / f"{stem}.png", np.zeros((16, 16, 3), np.uint8))
  elif kind == "mask_without_image":
    _png(val_masks / "lonely.png", np.zeros((16, 16), np.uint8))
  elif kind == "rgb_mask":
    _png(val_masks / "ADE_val_00000001.png", np.zeros((16, 16, 3), np.uint8))
  elif kind == "mask_size":
    _png(val_masks / "ADE_val_00000001.png", np.ones((8, 16), np.uint8))
  elif kind == "no_split":
    split = "test"
  elif kind == "absent_class_file":
    names = str(tmp_path / "absent.txt")
  elif kind == "generic_without_classes":
    root = root.rename(tmp_path / "my_masks")
    names = None
  with pytest.raises((ValueError, FileNotFoundError)) as info:
    td.load_segmentation(str(root), split, names, size=size)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


def test_ade_reads_jpeg_and_object_info_names(tmp_path):
  root = tmp_path / "ADEChallengeData2016"
  _png(root / "images" / "validation" / "a.jpg", np.full((8, 8, 3), 200, np.uint8), "JPEG")
  _png(root / "annotations" / "validation" / "a.png", np.full((8, 8), 150, np.uint8))
  lines = ["Idx\tRatio\tTrain\tVal\tName"] + [f"{k}\t0.1\t1\t1\tc{k};syn" for k in range(1, 151)]
  (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
  ds = td.load_segmentation(str(root), "val")
  assert ds.class_names[:2] == ["c1", "c2"] and len(ds.class_names) == 150
  assert np.all(ds.labels == 149) and abs(int(ds.images.mean()) - 200) <= 2


# ---------------------------------------------------------------------------
# Augmentation.


def _batch(n: int = 3, h: int = H, w: int = W, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  normal = rng.normal(size=(n, h, w, 3)).astype(np.float32)
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  return {"image": jnp.asarray(rng.uniform(0, 1, (n, h, w, 3)).astype(np.float32)),
          "segmentation": jnp.asarray(rng.integers(-1, 5, (n, h, w)).astype(np.int32)),
          "depth": jnp.asarray(rng.uniform(0.5, 8, (n, h, w, 1)).astype(np.float32)),
          "normal": jnp.asarray(normal)}


# Jitted once each and shared: the tests are mostly compiling otherwise.
crop_jit = jax.jit(td.scale_crop, static_argnames=("scales", "normal_interpolation"))
flip_jit = jax.jit(td.random_flip)
DEPTH = 3.0


def _same(a: dict, b: dict) -> None:
  assert set(a) == set(b)
  for k, value in a.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(b[k]), err_msg=k)


def _mirror(x) -> np.ndarray:
  return np.asarray(x)[:, :, ::-1]


def test_scale_one_without_flip_is_the_identity():
  batch, zeros = _batch(), np.zeros(3, np.int32)
  _same(crop_jit(batch, zeros, zeros, zeros, scales=td.NYU_SCALES), batch)   # Scale 1.0.
  _same(flip_jit(jax.random.PRNGKey(0), batch, 0.0), batch)


def test_flipping_twice_is_the_identity_and_negates_normal_x():
  batch, key = _batch(), jax.random.PRNGKey(1)
  once = flip_jit(key, batch, 1.0)
  _same(flip_jit(key, once, 1.0), batch)
  for k in ("image", "segmentation", "depth"):
    np.testing.assert_array_equal(once[k], _mirror(batch[k]), err_msg=k)
  np.testing.assert_array_equal(once["normal"][..., 0], -_mirror(batch["normal"])[..., 0])
  np.testing.assert_array_equal(once["normal"][..., 1:], _mirror(batch["normal"])[..., 1:])
  some = td.flip({"normal": batch["normal"]}, jnp.array([True, False, True]))["normal"]
  np.testing.assert_array_equal(some[1], batch["normal"][1])   # Examples are flipped apart.
  np.testing.assert_array_equal(some[2, ..., 1:], _mirror(batch["normal"])[2, ..., 1:])


def test_scale_crop_divides_depth_and_keeps_label_values():
  batch = {**_batch(), "depth": jnp.full((3, H, W, 1), DEPTH, jnp.float32)}
  index, top, left = np.array([1, 2, 2]), np.array([2, 0, 5]), np.array([3, 8, 0])
  out = crop_jit(batch, index, top, left, scales=td.NYU_SCALES)
  for b, s in enumerate(np.asarray(td.NYU_SCALES)[index]):
    np.testing.assert_allclose(out["depth"][b], np.float32(DEPTH) / np.float32(s), rtol=1e-6)
    assert set(np.unique(out["segmentation"][b])) <= set(np.unique(batch["segmentation"][b]))
    h, w = int(H / s), int(W / s)   # Nearest takes the window's pixels only.
    window = np.asarray(batch["segmentation"][b])[top[b]:top[b] + h, left[b]:left[b] + w]
    assert set(np.unique(out["segmentation"][b])) <= set(np.unique(window))
  assert out["image"].dtype == jnp.float32 and out["image"].shape == batch["image"].shape
  np.testing.assert_allclose(np.linalg.norm(out["normal"], axis=-1), 1, atol=1e-6)  # Still unit.
  # The random draw: a scale of the list, a window that fits, every example on its own.
  aug = jax.jit(td.nyu_augment)(jax.random.PRNGKey(4), batch)
  assert {k: v.shape for k, v in aug.items()} == {k: v.shape for k, v in batch.items()}
  for b in range(3):
    depths = np.unique(aug["depth"][b])
    assert len(depths) == 1 and np.isclose(DEPTH / depths[0], td.NYU_SCALES, rtol=1e-6).any()


def test_scale_crop_matches_libmtl_interpolation():
  """LibMTL's RandomScaleCrop calls F.interpolate on the window; same window, same pixels."""
  torch = pytest.importorskip("torch")
  batch, scales = _batch(), td.NYU_SCALES
  index, top, left = np.array([2, 1, 0]), np.array([5, 1, 0]), np.array([3, 4, 0])
  near = crop_jit(batch, index, top, left, scales=scales)
  lin = crop_jit(batch, index, top, left, scales=scales, normal_interpolation="bilinear")

  def resized(x, b: int, mode: str) -> np.ndarray:
    """Example b's window through F.interpolate, back to H x W x C."""
    s = scales[index[b]]
    h, w = int(H / s), int(W / s)
    chw = np.moveaxis(np.array(x[b], np.float32).reshape(H, W, -1), -1, 0)
    window = torch.from_numpy(chw[None, :, top[b]:top[b] + h, left[b]:left[b] + w].copy())
    kwargs = {"align_corners": True} if mode == "bilinear" else {}
    return np.moveaxis(torch.nn.functional.interpolate(window, size=(H, W), mode=mode,
                                                       **kwargs)[0].numpy(), 0, -1)

  for b in range(3):
    s = np.float32(scales[index[b]])
    np.testing.assert_allclose(near["image"][b], resized(batch["image"], b, "bilinear"), atol=1e-6)
    np.testing.assert_array_equal(near["segmentation"][b],
                                  resized(batch["segmentation"], b, "nearest")[..., 0])
    np.testing.assert_allclose(near["depth"][b], resized(batch["depth"], b, "nearest") / s,
                               rtol=1e-6)
    np.testing.assert_array_equal(near["normal"][b], resized(batch["normal"], b, "nearest"))
    np.testing.assert_allclose(lin["normal"][b], resized(batch["normal"], b, "bilinear"),
                               atol=1e-6)


def test_segmentation_resize_crop():
  batch = {k: v for k, v in _batch().items() if k in ("image", "segmentation")}
  zeros = np.zeros(3, np.int32)
  out = jax.jit(td.resize_crop, static_argnames=("crop_size",))(
      batch, np.array([1.0, 0.5, 0.5], np.float32), zeros, zeros, crop_size=(H, W))
  _same({k: v[:1] for k, v in out.items()}, {k: v[:1] for k, v in batch.items()})   # Ratio 1.
  half = {k: np.asarray(v[1:]) for k, v in out.items()}   # Ratio 0.5: the rest is padding.
  assert np.all(half["segmentation"][:, H // 2:] == -1) and np.all(half["image"][:, :, W // 2:] == 0)
  np.testing.assert_array_equal(half["segmentation"][:, :H // 2, :W // 2],
                                np.asarray(batch["segmentation"])[1:, ::2, ::2])
  big = jax.jit(td.segmentation_augment, static_argnames=("crop_size", "ratio_range"))(
      jax.random.PRNGKey(5), batch, crop_size=(8, 12), ratio_range=(1.5, 2.0))
  assert big["image"].shape == (3, 8, 12, 3) and big["segmentation"].shape == (3, 8, 12)
  for b in range(3):
    assert set(np.unique(big["segmentation"][b])) <= set(np.unique(batch["segmentation"][b]))
  photo = td.image_as_float(np.array([[[[0, 51, 255]]]], np.uint8))   # Photos are uint8.
  np.testing.assert_allclose(photo, [[[[0.0, 0.2, 1.0]]]], rtol=1e-6)
  with pytest.raises(ValueError, match="random_scale_crop"):
    td.resize_crop(_batch(1), jnp.ones(1), jnp.zeros(1), jnp.zeros(1), (H, W))
