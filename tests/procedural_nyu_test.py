"""The procedural NYUv2-layout scenes (transfer/procedural_nyu.py): the MTAN layout, exact
geometry, determinism. Scenes are textured with the shared CIFAR-10 JPEGs."""

import os

import numpy as np
import pytest

from caedfkd_jax.transfer import procedural_nyu as pn

H, W = 32, 48


@pytest.fixture
def made(tmp_path, cifar10_dir):
  root = str(tmp_path / "nyu")
  return root, str(cifar10_dir), pn.make_dataset(root, 6, 3, H, W, str(cifar10_dir), seed=0)


def _load(root, split, n):
  return {kind: np.load(os.path.join(root, split, kind, f"{n}.npy")) for kind in pn.KINDS}


def test_layout_dtypes_and_ground_truth_conventions(made):
  root, _, names = made
  with open(os.path.join(root, "classes.txt")) as f:
    assert f.read().split("\n")[:-1] == names
  assert len(names) == 11 and names[-1] == pn.BACKGROUND and names[0] == "airplane"
  for split, count in (("train", 6), ("val", 3)):
    for kind in pn.KINDS:
      assert sorted(os.listdir(os.path.join(root, split, kind))) == [f"{n}.npy" for n in range(count)]
    for n in range(count):
      s = _load(root, split, n)
      assert {k: (a.shape, a.dtype) for k, a in s.items()} == {
          "image": ((H, W, 3), np.float32), "label": ((H, W), np.float32),
          "depth": ((H, W, 1), np.float32), "normal": ((H, W, 3), np.float32)}
      assert 0 <= s["image"].min() and s["image"].max() <= 1
      label, depth, normal = s["label"], s["depth"][..., 0], s["normal"]
      assert np.all(label == np.round(label)) and -1 <= label.min() and label.max() < len(names)
      missing = depth == 0
      assert 1 <= missing.sum() <= 0.05 * H * W and np.all(depth >= 0)
      assert np.all(normal[missing] == 0) and np.all(label[missing] == -1)
      np.testing.assert_allclose(np.linalg.norm(normal[~missing], axis=-1), 1, atol=1e-6)
      assert np.all(normal[~missing][:, 2] > 0)                       # Facing the camera.
      assert np.all(depth[~missing] >= pn.MIN_DEPTH - 1e-6)
      assert np.all(label[~missing] >= 0) and (label == len(names) - 1).any()   # Background.


def test_same_seed_same_bytes_and_scenes_do_not_depend_on_the_counts(made, tmp_path):
  root, cifar, _ = made
  pn.make_dataset(str(tmp_path / "a"), 3, 1, H, W, cifar, seed=0)
  pn.make_dataset(str(tmp_path / "b"), 3, 1, H, W, cifar, seed=1)
  for split, count in (("train", 3), ("val", 1)):
    for n in range(count):
      want, same, other = (_load(r, split, n) for r in (root, tmp_path / "a", tmp_path / "b"))
      for kind in pn.KINDS:
        assert want[kind].tobytes() == same[kind].tobytes()
      assert not np.array_equal(want["depth"], other["depth"])
  with pytest.raises(FileExistsError, match="holds a dataset already"):
    pn.make_dataset(str(tmp_path / "a"), 1, 1, H, W, cifar, seed=0)


def test_fronto_parallel_patch_over_a_tilted_background():
  grey, field = np.full((4, 4, 3), 0.5), np.random.default_rng(0).uniform(size=(3, 4, 3))
  slope = (0.2, 0.4)
  planes = [pn.Plane(2, field, 6.0, slope),
            pn.Plane(1, grey, 2.0, center=(0.5, 0.0), half_size=(0.6, 0.5), angle=0.3)]
  s = pn.render(planes, H, W)
  patch = s["surface"] == 1
  assert patch.sum() > 50 and np.all(s["label"][patch] == 1) and np.all(s["label"][~patch] == 2)
  np.testing.assert_allclose(s["depth"][patch], 2.0, rtol=1e-7)
  np.testing.assert_array_equal(s["normal"][patch], np.broadcast_to([0, 0, 1], (patch.sum(), 3)))
  # The constant grey under light (0, 0, 1) through the haze: 0.5 t + HAZE_LEVEL (1 - t).
  t = np.exp(-2.0 / pn.HAZE_DEPTH)
  np.testing.assert_allclose(s["image"][patch], 0.5 * t + pn.HAZE_LEVEL * (1 - t), rtol=1e-6)
  # The background: normal (gx, gy, 1) / |.|, depth rising by gx a pixel rightwards, gy upwards.
  n = np.array([*slope, 1.0]) / np.linalg.norm([*slope, 1.0])
  np.testing.assert_allclose(s["normal"][~patch], np.broadcast_to(n, ((~patch).sum(), 3)), rtol=1e-6)
  x, y = pn.pixel_coordinates(H, W)
  want = 6.0 + slope[0] * x + slope[1] * y
  np.testing.assert_allclose(s["depth"][..., 0][~patch], want[~patch], rtol=1e-6)
  assert s["depth"][0, 0, 0] > s["depth"][-1, 0, 0] and s["depth"][-1, -1, 0] > s["depth"][-1, 0, 0]


def test_random_scenes_depth_gradients_agree_with_their_normals(made):
  _, cifar, names = made
  pitch = pn.SCENE_WIDTH / W
  textures = pn._texture_files(cifar, "train", names[:-1])
  for seed in range(4):
    planes, light = pn.random_scene(np.random.default_rng(seed), H, W, textures)
    s = pn.render(planes, H, W, light)
    depth, normal, surface = s["depth"][..., 0].astype(np.float64), s["normal"], s["surface"]
    assert np.all(surface >= 0) and len(planes) >= 3
    assert np.array_equal(s["label"], np.array([p.label for p in planes])[surface])
    # A plane's depth rises by gx pitch a column rightwards and falls by gy pitch a row down,
    # with (gx, gy) = (nx, ny) / nz.
    right = surface[:, 1:] == surface[:, :-1]
    down = surface[1:, :] == surface[:-1, :]
    gx, gy = normal[..., 0] / normal[..., 2], normal[..., 1] / normal[..., 2]
    np.testing.assert_allclose(np.diff(depth, axis=1)[right], (gx[:, :-1] * pitch)[right], atol=2e-5)
    np.testing.assert_allclose(np.diff(depth, axis=0)[down], (-gy[:-1] * pitch)[down], atol=2e-5)
