"""A PNG of a few validation images: each task's prediction beside its ground truth."""

from typing import Any

import numpy as np
from PIL import Image

from caedfkd_jax.io import atomic_files

MIN_TILE = 96          # Pixels: small scenes are enlarged (nearest) to at least this height.
GAP = 2                # Pixels of white between tiles.
IGNORED = (0, 0, 0)    # Colour of ignored labels and missing depth / normals.


def palette(num_classes: int) -> np.ndarray:
  """num_classes distinct colours (golden-angle hues), uint8 num_classes x 3."""
  hue = (np.arange(num_classes) * 0.618033988749895) % 1.0
  k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6.0) % 6.0
  rgb = 1.0 - 0.85 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
  return (rgb * 255).astype(np.uint8)


def colour_labels(labels_HxW: np.ndarray, num_classes: int) -> np.ndarray:
  out = palette(num_classes)[np.clip(labels_HxW, 0, num_classes - 1)]
  out[labels_HxW < 0] = IGNORED
  return out


def colour_depth(depth_HxWx1: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """Near bright, far dark, on one scale for prediction and ground truth; 0 (missing) black."""
  d = depth_HxWx1[..., 0]
  grey = 1.0 - np.clip((d - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
  out = np.repeat((55 + 200 * grey)[..., None], 3, axis=-1).astype(np.uint8)
  out[d == 0] = IGNORED
  return out


def colour_normals(normal_HxWx3: np.ndarray) -> np.ndarray:
  """The usual (n + 1) / 2 as RGB; missing (0, 0, 0) black."""
  out = ((np.clip(normal_HxWx3, -1, 1) + 1) * 127.5).astype(np.uint8)
  out[np.all(normal_HxWx3 == 0, axis=-1)] = IGNORED
  return out


def as_rgb(image: np.ndarray) -> np.ndarray:
  if image.dtype == np.uint8:
    return image
  return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def tile_row(dataset, outputs: dict[str, np.ndarray], i: int, j: int) -> list[np.ndarray]:
  """image | seg truth, prediction | depth truth, prediction | normal truth, prediction, for
  example i of the dataset and row j of `outputs`."""
  tiles = [as_rgb(dataset.images[i])]
  tiles += [colour_labels(dataset.labels[i], dataset.num_classes),
            colour_labels(outputs["segmentation"][j], dataset.num_classes)]
  if dataset.depth is not None:
    truth = dataset.depth[i]
    valid = truth[truth > 0]
    lo, hi = (float(valid.min()), float(valid.max())) if valid.size else (0.0, 1.0)
    tiles += [colour_depth(truth, lo, hi), colour_depth(outputs["depth"][j], lo, hi)]
  if dataset.normal is not None:
    tiles += [colour_normals(dataset.normal[i]), colour_normals(outputs["normal"][j])]
  return tiles


def save_predictions_png(path: str, trainer: Any, state: Any, dataset, count: int = 4) -> None:
  """The first `count` validation examples, one a row (columns as `tile_row`)."""
  rows = []
  for idx, out in trainer.predictions(state, dataset):
    rows += [tile_row(dataset, out, i, j) for j, i in enumerate(idx)]
    if len(rows) >= count:
      break
  rows = rows[:count]
  h, w = rows[0][0].shape[:2]
  zoom = max(1, -(-MIN_TILE // h))
  th, tw = h * zoom, w * zoom
  cols = len(rows[0])
  canvas = np.full((len(rows) * (th + GAP) - GAP, cols * (tw + GAP) - GAP, 3), 255, np.uint8)
  for r, tiles in enumerate(rows):
    for c, tile in enumerate(tiles):
      big = np.repeat(np.repeat(tile, zoom, axis=0), zoom, axis=1)
      canvas[r * (th + GAP):r * (th + GAP) + th, c * (tw + GAP):c * (tw + GAP) + tw] = big
  with atomic_files.replacing(path) as tmp:
    Image.fromarray(canvas).save(tmp, format="PNG")
