"""The per-epoch sample grid: rows named by class, every image marked with the teacher's guess."""

import numpy as np
from PIL import Image

from caedfkd_jax import metrics_writer as mw

NAMES = ["airplane", "automobile", "bird"]


def _cell_origin(k: int, j: int, h: int = 8, w: int = 8) -> tuple[int, int]:
  cell_w, cell_h = w * mw.SCALE + 2 * mw.FRAME, h * mw.SCALE + 2 * mw.FRAME + mw.CAPTION
  return mw.NAME_WIDTH + j * (cell_w + 2), k * (cell_h + 2)


def test_frames_say_whether_the_teacher_agrees_with_the_row(tmp_path):
  images = np.full((6, 8, 8, 3), 0.5, np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2])
  predicted = np.array([0, 2, 2, 1, 1, 0])          # right, wrong, right, wrong, right, wrong
  confidence = np.linspace(0.1, 0.9, 6)
  path = tmp_path / "grid.png"
  mw.save_image_grid(str(path), images, labels, 3, 2, class_names=NAMES, predicted_B=predicted,
                     confidence_B=confidence)
  grid = np.asarray(Image.open(path).convert("RGB"))
  for i, (k, pred) in enumerate(zip(labels, predicted)):
    x, y = _cell_origin(k, i // 3)
    assert tuple(grid[y, x]) == (mw.RIGHT if pred == k else mw.WRONG), (i, k, pred)
    inside = grid[y + mw.FRAME + 4, x + mw.FRAME + 4]
    assert tuple(inside) == (128, 128, 128)          # the image itself, scaled
    caption = grid[y + 8 * mw.SCALE + 2 * mw.FRAME:y + 8 * mw.SCALE + 2 * mw.FRAME + mw.CAPTION,
                   x:x + 8 * mw.SCALE]
    assert (caption < 100).any(), "the teacher's guess is written under the image"
  names = grid[:, :mw.NAME_WIDTH - 4]
  assert (names < 100).any() and (names[:, :, 0] == names[:, :, 1]).all(), "row names in black"


def test_without_the_teachers_guesses_the_plain_grid_is_written(tmp_path):
  images = np.random.default_rng(0).uniform(size=(4, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 0, 1])
  path = tmp_path / "plain.png"
  mw.save_image_grid(str(path), images, labels, 2, 2)
  grid = np.asarray(Image.open(path))
  expected = mw.image_grid(images, labels, 2, 2)
  np.testing.assert_array_equal(grid[::2, ::2], expected)
