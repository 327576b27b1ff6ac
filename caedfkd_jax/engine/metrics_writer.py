"""Where a run's numbers and pictures go: TensorBoard events, JSON lines, PNG grids."""

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from caedfkd_jax.io import atomic_files


class MetricsWriter:
  """Writes each epoch's scalars to `metrics.jsonl` and TensorBoard event files.

  A resumed run passes the epoch of its checkpoint: rows of later epochs were
  logged by the killed invocation after that checkpoint and will be logged again,
  so they are dropped (TensorBoard: purged) to keep one row per epoch.
  """

  def __init__(self, workdir: str, enabled: bool = True, keep_through_epoch: int = 0):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    _drop_rows_after(path, keep_through_epoch)
    self._jsonl = open(path, "a")
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=keep_through_epoch + 1)
    except ImportError:  # TensorBoard files are a nicety; JSON lines always exist.
      self._tb = None

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"epoch": step, **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _drop_rows_after(path: str, epoch: int) -> None:
  """Keeps the rows of epochs <= `epoch` (and no half-written last line), atomically."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut by a kill.
      if row.get("epoch", 0) <= epoch:
        kept.append(json.dumps(row) + "\n")
  atomic_files.write_text(path, "".join(kept))


def image_grid(images01_BxHxWxC: np.ndarray, labels_B: np.ndarray, num_classes: int,
               per_class: int, pad: int = 2, rows: Sequence[int] | None = None) -> np.ndarray:
  """One row per class (of `rows`; None: all), `per_class` images each (blank where a class
  has fewer)."""
  _, h, w, c = images01_BxHxWxC.shape
  rows = range(num_classes) if rows is None else rows
  grid = np.ones((len(rows) * (h + pad) + pad, per_class * (w + pad) + pad, c), np.float32)
  for row, k in enumerate(rows):
    for j, i in enumerate(np.flatnonzero(labels_B == k)[:per_class]):
      y, x = pad + row * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = images01_BxHxWxC[i]
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


RIGHT, WRONG = (0, 160, 0), (220, 0, 0)   # the teacher agrees with the row's class or not
TILE, FRAME, CAPTION, NAME_WIDTH = 96, 2, 12, 84   # pixels


def tile_shape(h: int, w: int) -> tuple[int, int]:
  """Small images grow by a whole factor (crisp pixels) and large ones shrink, to about TILE
  px: the grid is written every epoch, so 224-px images must not make it tens of megapixels."""
  side = max(h, w)
  scale = TILE // side if side <= TILE else TILE / side
  return max(1, round(h * scale)), max(1, round(w * scale))


def _cut(text: str, suffix: str, fits: Callable[[str], bool]) -> str:
  """`text` + `suffix`, the text shortened (to 3 characters at least) until `fits` says so."""
  n = len(text)
  while n > 3 and not fits(text[:n] + suffix):
    n -= 1
  return text[:n] + suffix


def grid_captions(labels_B: np.ndarray, predicted_B: np.ndarray, confidence_B: np.ndarray | None,
                  class_names: list[str], fits: Callable[[str], bool] = lambda s: len(s) <= 14
                  ) -> tuple[list[str], np.ndarray]:
  """Each image's caption ("cat 93%": the teacher's guess and its softmax probability) and
  whether the guess is the row's intended class; names are cut until `fits` (the tile's width)."""
  predicted = np.asarray(predicted_B).tolist()
  confidence = ([None] * len(predicted) if confidence_B is None
                else np.asarray(confidence_B).tolist())
  captions = []
  for pred, conf in zip(predicted, confidence):
    guess = class_names[pred] if 0 <= pred < len(class_names) else str(pred)
    captions.append(_cut(guess, "" if conf is None else f" {conf * 100:.0f}%", fits))
  return captions, np.asarray(predicted_B) == np.asarray(labels_B)


def labelled_image_grid(images01_BxHxWxC: np.ndarray, labels_B: np.ndarray,
                        class_names: list[str], per_class: int, predicted_B: np.ndarray | None,
                        confidence_B: np.ndarray | None = None,
                        rows: Sequence[int] | None = None) -> Image.Image:
  """The grid a person reads (the paper's Figure 2 idea): each row named by its intended class,
  each image framed and captioned in green where the teacher predicts that class and in red
  where not, the caption giving the teacher's guess and confidence (no guesses: names only)."""
  from PIL import ImageDraw
  _, h, w, _ = images01_BxHxWxC.shape
  th, tw = tile_shape(h, w)
  cell_w, cell_h = tw + 2 * FRAME, th + 2 * FRAME + CAPTION
  rows = range(len(class_names)) if rows is None else rows
  canvas = Image.new("RGB", (NAME_WIDTH + per_class * (cell_w + 2), len(rows) * (cell_h + 2)),
                     "white")
  draw = ImageDraw.Draw(canvas)   # PIL's default font: no font files needed.
  if predicted_B is not None:
    captions, right = grid_captions(labels_B, predicted_B, confidence_B, class_names,
                                    fits=lambda s: draw.textlength(s) <= cell_w - 2)
  resample = Image.NEAREST if th >= h else Image.BILINEAR
  for row, k in enumerate(rows):
    top = row * (cell_h + 2)
    row_name = _cut(class_names[k], "", lambda s: draw.textlength(s) <= NAME_WIDTH - 6)
    draw.text((2, top + cell_h // 2 - 6), row_name, fill="black")
    for j, i in enumerate(np.flatnonzero(labels_B == k)[:per_class]):
      left = NAME_WIDTH + j * (cell_w + 2)
      image = Image.fromarray((np.clip(images01_BxHxWxC[i], 0, 1) * 255).round().astype(np.uint8).squeeze())
      if predicted_B is not None:
        colour = RIGHT if right[i] else WRONG
        draw.rectangle([left, top, left + cell_w - 1, top + th + 2 * FRAME - 1], fill=colour)
        draw.text((left + 1, top + th + 2 * FRAME), captions[i], fill=colour)
      canvas.paste(image.convert("RGB").resize((tw, th), resample), (left + FRAME, top + FRAME))
  return canvas


def save_image_grid(path: str, images01_BxHxWxC: np.ndarray, labels_B: np.ndarray,
                    num_classes: int, per_class: int, enabled: bool = True,
                    class_names: list[str] | None = None, predicted_B: np.ndarray | None = None,
                    confidence_B: np.ndarray | None = None,
                    rows: Sequence[int] | None = None) -> None:
  """Writes the grid; labelled (see `labelled_image_grid`) when class names or the teacher's
  predictions are given, else plain (one row per class, pixels doubled). `rows`: the classes
  that get a row (None: all K; a run that samples classes shows those its batch holds)."""
  if not enabled or per_class <= 0:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  if predicted_B is not None or class_names:
    names = list(class_names or [str(k) for k in range(num_classes)])
    labelled_image_grid(images01_BxHxWxC, labels_B, names, per_class, predicted_B,
                        confidence_B, rows).save(path)
    return
  grid = image_grid(images01_BxHxWxC, labels_B, num_classes, per_class, rows=rows)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
