"""NYUv2's dense-task metrics as LibMTL computes them (examples/nyu/utils.py), in numpy.

Each batch's predictions are fetched to the host and folded into an accumulator; `result()`
scores the whole split. Arrays are NHWC as our models emit them (LibMTL's are NCHW): labels
BxHxW, depth BxHxWx1 (or BxHxW), normals BxHxWx3. Sums are float64.
"""

import numpy as np

IGNORE_LABEL = -1                      # NYUv2 (MTAN's preprocessing): unlabelled pixels.
ANGLE_THRESHOLDS = (11.25, 22.5, 30.0)  # Degrees; the shares strictly below them, as LibMTL.


class SegmentationMetric:
  """mIoU and pixel accuracy from one split-wide confusion matrix (LibMTL's SegMetric).

  confusion[t, p] counts the pixels of true class t predicted as p, over the pixels whose label
  is neither -1 nor `ignore_index` (ADE20K-style data: 255). pixel_acc = trace / total and
  IoU_c = confusion[c, c] / (row_c + col_c - confusion[c, c]), as LibMTL.

  LibMTL's mIoU is the plain mean over all C classes, NaN as soon as one class is absent from
  both ground truth and prediction (0 / 0). Here `miou` averages over the classes present in
  either (a class predicted but never true counts, with IoU 0) and `classes_counted` says how
  many that was; where every class occurs (NYUv2's full test split) the two agree.
  """

  def __init__(self, num_classes: int, ignore_index: int | None = None):
    if num_classes < 1:
      raise ValueError(f"num_classes={num_classes}: need at least one class.")
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.reset()

  def reset(self) -> None:
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)

  def update(self, pred: np.ndarray, labels: np.ndarray) -> None:
    """Adds a batch. `pred`: class ids shaped like `labels`, or scores with a trailing class axis
    (argmax taken, as LibMTL's softmax-argmax). `labels`: integer-valued (float as stored)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    c = self.num_classes
    if pred.shape == labels.shape + (c,):
      pred = pred.argmax(-1)
    elif pred.shape != labels.shape:
      raise ValueError(f"pred shape {pred.shape} fits neither labels {labels.shape} nor "
                       f"{labels.shape + (c,)} scores: pass class ids or {c} scores a pixel.")
    true, guess = labels.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    keep = true != IGNORE_LABEL
    if self.ignore_index is not None:
      keep &= true != self.ignore_index
    true, guess = true[keep], guess[keep]
    bad = (true < 0) | (true >= c)
    if bad.any():
      raise ValueError(f"label {true[bad][0]} is outside [0, {c}) and not ignored: check "
                       f"num_classes={c}, or pass the void label as ignore_index.")
    if ((guess < 0) | (guess >= c)).any():
      raise ValueError(f"predicted ids span [{guess.min()}, {guess.max()}], outside [0, {c}): "
                       "pass argmax class ids or per-class scores.")
    self.confusion += np.bincount(c * true + guess, minlength=c * c).reshape(c, c)

  def iou(self) -> np.ndarray:
    """Per-class IoU, float64; NaN for a class absent from both ground truth and prediction."""
    h = self.confusion.astype(np.float64)
    union = h.sum(0) + h.sum(1) - np.diag(h)
    with np.errstate(invalid="ignore", divide="ignore"):
      return np.diag(h) / union

  def result(self) -> dict[str, float]:
    total = self.confusion.sum()
    if total == 0:
      raise ValueError("no labelled pixel seen: update() with batches that have labels other "
                       "than ignored ones before result().")
    iou = self.iou()
    counted = ~np.isnan(iou)
    return {"miou": float(iou[counted].mean()),
            "pixel_acc": float(np.trace(self.confusion) / total),
            "classes_counted": int(counted.sum())}


def _same_shape(pred: np.ndarray, target: np.ndarray, what: str) -> None:
  if pred.shape != target.shape:
    raise ValueError(f"{what}: pred shape {pred.shape} != ground truth {target.shape}; "
                     "pass both in one layout (NHWC).")


class DepthMetric:
  """Absolute and relative error over pixels with ground truth (depth != 0), LibMTL's DepthMetric.

  LibMTL takes each batch's error as the mean over that batch's valid pixels and weights it in
  the split average by `pred.size()[0]` read after `masked_select`: the batch's count of valid
  pixels, not of images. Its weighted mean of batch means is thus the mean over every valid
  pixel of the split, which is what these sums give. A batch with no valid pixel adds nothing
  (in LibMTL its 0 / 0 would make the split's result NaN).
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.abs_sum, self.rel_sum, self.count = 0.0, 0.0, 0

  def update(self, pred: np.ndarray, depth: np.ndarray) -> None:
    pred, depth = np.asarray(pred, np.float64), np.asarray(depth, np.float64)
    _same_shape(pred, depth, "depth")
    valid = depth != 0
    err = np.abs(pred[valid] - depth[valid])
    self.abs_sum += float(err.sum())
    self.rel_sum += float((err / depth[valid]).sum())
    self.count += int(valid.sum())

  def result(self) -> dict[str, float]:
    if self.count == 0:
      raise ValueError("no pixel with depth != 0 seen: update() with ground truth before result().")
    return {"abs_err": self.abs_sum / self.count, "rel_err": self.rel_sum / self.count}


class NormalMetric:
  """Angular error of surface normals in degrees, LibMTL's NormalMetric.

  The prediction is divided by its L2 norm (no epsilon: an all-zero vector gives NaN, as in
  LibMTL); a pixel counts where the ground truth's components do not sum to 0 (LibMTL's mask:
  missing normals are (0, 0, 0); a unit normal summing to exactly 0 is skipped too). The
  ground truth is taken as unit, as NYUv2's is. error = degrees(arccos(clip(<pred, gt>, -1, 1))).

  LibMTL concatenates every pixel's error over the split before taking the mean, the median and
  the shares below ANGLE_THRESHOLDS; the median needs them all, so they are kept as float32
  (4 bytes a pixel: about 290 MB for NYUv2's 654 test images at 288x384). The mean and the
  shares are float64 sums and counts made per batch.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self.errors: list[np.ndarray] = []
    self.angle_sum = 0.0
    self.within = np.zeros(len(ANGLE_THRESHOLDS), np.int64)

  def update(self, pred: np.ndarray, normal: np.ndarray) -> None:
    pred, normal = np.asarray(pred, np.float64), np.asarray(normal, np.float64)
    _same_shape(pred, normal, "normal")
    if pred.shape[-1] != 3:
      raise ValueError(f"normal arrays end in {pred.shape[-1]} channels: pass xyz last (NHWC).")
    valid = normal.sum(-1) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
      unit = pred[valid] / np.linalg.norm(pred[valid], axis=-1, keepdims=True)
    angle = np.degrees(np.arccos(np.clip(np.sum(unit * normal[valid], -1), -1.0, 1.0)))
    self.errors.append(angle.astype(np.float32))
    self.angle_sum += float(angle.sum())
    self.within += [int((angle < t).sum()) for t in ANGLE_THRESHOLDS]

  def result(self) -> dict[str, float]:
    count = sum(len(e) for e in self.errors)
    if count == 0:
      raise ValueError("no pixel with a ground-truth normal seen: update() before result().")
    out = {"mean_angle": self.angle_sum / count,
           "median_angle": float(np.median(np.concatenate(self.errors)))}
    for t, n in zip(ANGLE_THRESHOLDS, self.within):
      out[f"within_{t:g}"] = float(n / count)
    return out
