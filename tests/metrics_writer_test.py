"""The per-epoch sample grid: rows named by class, every image marked with the teacher's guess."""

import numpy as np
from PIL import Image

from caedfkd_jax.engine import metrics_writer as mw

NAMES = ["airplane", "automobile", "bird"]


def _cell_origin(k: int, j: int, h: int = 8, w: int = 8) -> tuple[int, int]:
  th, tw = mw.tile_shape(h, w)
  cell_w, cell_h = tw + 2 * mw.FRAME, th + 2 * mw.FRAME + mw.CAPTION
  return mw.NAME_WIDTH + j * (cell_w + 2), k * (cell_h + 2)


def test_captions_give_the_guess_and_confidence_and_whether_it_is_the_rows_class():
  captions, right = mw.grid_captions(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 7]),
                                     np.array([0.934, 0.5, 1.0, 0.051]), NAMES)
  assert captions == ["airplane 93%", "bird 50%", "bird 100%", "7 5%"]   # 7: no name, its index
  np.testing.assert_array_equal(right, [True, False, True, False])
  short, _ = mw.grid_captions(np.array([1]), np.array([1]), np.array([0.25]), NAMES,
                              fits=lambda s: len(s) <= 8)
  assert short == ["auto 25%"]                                         # cut to fit its tile
  bare, _ = mw.grid_captions(np.array([1]), np.array([1]), None, NAMES)
  assert bare == ["automobile"]


def test_tiles_grow_small_images_by_whole_factors_and_shrink_large_ones():
  assert mw.tile_shape(32, 32) == (96, 96) and mw.tile_shape(28, 28) == (84, 84)
  assert mw.tile_shape(8, 8) == (96, 96) and mw.tile_shape(224, 224) == (96, 96)


def test_frames_say_whether_the_teacher_agrees_with_the_row(tmp_path):
  images = np.full((6, 8, 8, 3), 0.5, np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2])
  predicted = np.array([0, 2, 2, 1, 1, 0])          # right, wrong, right, wrong, right, wrong
  confidence = np.linspace(0.1, 0.9, 6)
  path = tmp_path / "grid.png"
  mw.save_image_grid(str(path), images, labels, 3, 2, class_names=NAMES, predicted_B=predicted,
                     confidence_B=confidence)
  grid = np.asarray(Image.open(path).convert("RGB"))
  th, tw = mw.tile_shape(8, 8)
  cell_w, cell_h = tw + 2 * mw.FRAME, th + 2 * mw.FRAME + mw.CAPTION
  assert grid.shape == (3 * (cell_h + 2), mw.NAME_WIDTH + 2 * (cell_w + 2), 3)
  for i, (k, pred) in enumerate(zip(labels, predicted)):
    x, y = _cell_origin(k, i // 3)
    colour = mw.RIGHT if pred == k else mw.WRONG
    assert tuple(grid[y, x]) == colour, (i, k, pred)
    inside = grid[y + mw.FRAME + 4, x + mw.FRAME + 4]
    assert tuple(inside) == (128, 128, 128)          # the image itself, scaled
    caption = grid[y + th + 2 * mw.FRAME:y + th + 2 * mw.FRAME + mw.CAPTION, x:x + cell_w]
    inked = caption[(caption != 255).any(-1)].astype(int)
    darkest = inked[inked.sum(-1).argmin()]          # text may be anti-aliased against white
    assert np.abs(darkest - colour).max() < 40, ("the guess is in the frame's colour", darkest)
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


def test_names_without_guesses_label_the_rows_and_draw_no_frames(tmp_path):
  images = np.zeros((2, 8, 8, 1), np.float32)         # grayscale, as for digits
  path = tmp_path / "named.png"
  mw.save_image_grid(str(path), images, np.array([0, 2]), 3, 1, class_names=NAMES)
  grid = np.asarray(Image.open(path).convert("RGB"))
  x, y = _cell_origin(0, 0)
  assert tuple(grid[y, x]) == (255, 255, 255)                      # no frame
  assert tuple(grid[y + mw.FRAME, x + mw.FRAME]) == (0, 0, 0)      # the image
  assert (grid[:, :mw.NAME_WIDTH - 4] < 100).any()


def test_grid_of_large_images_stays_small(tmp_path):
  images = np.random.default_rng(0).uniform(size=(20, 224, 224, 3)).astype(np.float32)
  labels = np.arange(20) % 10
  path = tmp_path / "large.png"
  mw.save_image_grid(str(path), images, labels, 10, 2, predicted_B=labels,
                     confidence_B=np.ones(20))
  w, h = Image.open(path).size
  assert w * h < 400_000, (w, h)                     # 224-px tiles would be ~2.5 MP
