"""Where a run's numbers and pictures go: TensorBoard events, JSON lines, PNG grids."""

import json
import os

import numpy as np
from PIL import Image

from caedfkd_jax import atomic_files


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
               per_class: int, pad: int = 2) -> np.ndarray:
  """One row per class, `per_class` images each (blank where a class has fewer)."""
  _, h, w, c = images01_BxHxWxC.shape
  grid = np.ones((num_classes * (h + pad) + pad, per_class * (w + pad) + pad, c), np.float32)
  for k in range(num_classes):
    for j, i in enumerate(np.flatnonzero(labels_B == k)[:per_class]):
      y, x = pad + k * (h + pad), pad + j * (w + pad)
      grid[y:y + h, x:x + w] = images01_BxHxWxC[i]
  return (np.clip(grid, 0, 1) * 255).round().astype(np.uint8)


RIGHT, WRONG = (0, 160, 0), (220, 0, 0)   # frame colours: the teacher agrees with the row or not
SCALE, FRAME, CAPTION, NAME_WIDTH = 3, 2, 12, 84   # pixels


def labelled_image_grid(images01_BxHxWxC: np.ndarray, labels_B: np.ndarray,
                        class_names: list[str], per_class: int, predicted_B: np.ndarray,
                        confidence_B: np.ndarray) -> Image.Image:
  """The grid a person reads (the paper's Figure 2 idea): each row named by its intended class,
  each image framed green where the teacher predicts that class and red where not, and captioned
  with the teacher's prediction and confidence."""
  from PIL import ImageDraw
  _, h, w, _ = images01_BxHxWxC.shape
  cell_w, cell_h = w * SCALE + 2 * FRAME, h * SCALE + 2 * FRAME + CAPTION
  canvas = Image.new("RGB", (NAME_WIDTH + per_class * (cell_w + 2), len(class_names) * (cell_h + 2)),
                     "white")
  draw = ImageDraw.Draw(canvas)
  for k, name in enumerate(class_names):
    top = k * (cell_h + 2)
    draw.text((2, top + cell_h // 2 - 6), name[:13], fill="black")
    for j, i in enumerate(np.flatnonzero(labels_B == k)[:per_class]):
      left = NAME_WIDTH + j * (cell_w + 2)
      pred = int(predicted_B[i])
      draw.rectangle([left, top, left + cell_w - 1, top + cell_w - 1], fill=RIGHT if pred == k else WRONG)
      image = Image.fromarray((np.clip(images01_BxHxWxC[i], 0, 1) * 255).round().astype(np.uint8).squeeze())
      canvas.paste(image.convert("RGB").resize((w * SCALE, h * SCALE), Image.NEAREST),
                   (left + FRAME, top + FRAME))
      guess = class_names[pred] if 0 <= pred < len(class_names) else str(pred)
      fits = max(3, cell_w // 6 - 5)   # PIL's default font is about 6 px a character
      draw.text((left + 1, top + cell_w), f"{guess[:fits]} {confidence_B[i] * 100:.0f}%", fill="black")
  return canvas


def save_image_grid(path: str, images01_BxHxWxC: np.ndarray, labels_B: np.ndarray,
                    num_classes: int, per_class: int, enabled: bool = True,
                    class_names: list[str] | None = None, predicted_B: np.ndarray | None = None,
                    confidence_B: np.ndarray | None = None) -> None:
  """Writes the grid; labelled (see `labelled_image_grid`) when the teacher's predictions are given."""
  if not enabled or per_class <= 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  if predicted_B is not None:
    names = list(class_names or [str(k) for k in range(num_classes)])
    labelled_image_grid(images01_BxHxWxC, labels_B, names, per_class, predicted_B,
                        confidence_B).save(path)
    return
  grid = image_grid(images01_BxHxWxC, labels_B, num_classes, per_class)
  if grid.shape[-1] == 1:
    grid = grid[..., 0]
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
