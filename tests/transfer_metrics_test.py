"""NYUv2's dense metrics (transfer/metrics.py) against float64 loops that restate LibMTL's
examples/nyu/utils.py, over several batches of different sizes, and on cases small enough to
check on paper."""

import math

import numpy as np
import pytest

from caedfkd_jax.transfer import metrics

BATCH_SIZES = (3, 1, 2)


def _batches(shape_hw=(5, 7)):
  return [(b, *shape_hw) for b in BATCH_SIZES]


# Segmentation.


def _seg_reference(batches, num_classes, ignore=(-1,)):
  """LibMTL's SegMetric in loops: one confusion matrix, IoU = tp / (row + col - tp); the mean
  over the classes whose union is not empty."""
  confusion = np.zeros((num_classes, num_classes))
  for pred, labels in batches:
    for p, t in zip(pred.ravel(), labels.ravel()):
      if int(t) not in ignore:
        confusion[int(t), int(p)] += 1
  ious = []
  for c in range(num_classes):
    union = confusion[c, :].sum() + confusion[:, c].sum() - confusion[c, c]
    if union > 0:
      ious.append(confusion[c, c] / union)
  return {"miou": sum(ious) / len(ious), "pixel_acc": np.trace(confusion) / confusion.sum(),
          "classes_counted": len(ious)}


def test_segmentation_matches_a_loop_over_batches_with_ignored_pixels_and_an_absent_class():
  rng = np.random.default_rng(0)
  num_classes, absent = 5, 3
  present = [c for c in range(num_classes) if c != absent]
  batches = []
  for shape in _batches():
    labels = rng.choice(present + [-1], shape).astype(np.float32)   # Stored as float, -1 ignored.
    scores = rng.normal(size=shape + (num_classes,))
    scores[..., absent] = -10                                       # Never predicted either.
    batches.append((scores, labels))
  metric = metrics.SegmentationMetric(num_classes)
  from_ids = metrics.SegmentationMetric(num_classes)
  for scores, labels in batches:
    metric.update(scores, labels)
    from_ids.update(scores.argmax(-1), labels)
  want = _seg_reference([(s.argmax(-1), t) for s, t in batches], num_classes)
  got = metric.result()
  assert got["classes_counted"] == num_classes - 1 == want["classes_counted"]
  np.testing.assert_allclose([got["miou"], got["pixel_acc"]], [want["miou"], want["pixel_acc"]],
                             rtol=1e-12)
  assert from_ids.result() == got
  assert np.isnan(metric.iou()[absent]) and np.isnan(np.mean(metric.iou()))   # LibMTL's mean.


def test_segmentation_ignore_index_for_ade20k_style_labels():
  rng = np.random.default_rng(1)
  metric = metrics.SegmentationMetric(4, ignore_index=255)
  batches = []
  for shape in _batches():
    labels = rng.choice([0, 1, 2, 3, 255, -1], shape)
    pred = rng.integers(0, 4, shape)
    metric.update(pred, labels)
    batches.append((pred, labels))
  want = _seg_reference(batches, 4, ignore=(-1, 255))
  got = metric.result()
  np.testing.assert_allclose([got["miou"], got["pixel_acc"]], [want["miou"], want["pixel_acc"]],
                             rtol=1e-12)
  with pytest.raises(ValueError, match="label 255 is outside"):
    metrics.SegmentationMetric(4).update(np.zeros((1, 2)), np.array([[0, 255]]))


def test_segmentation_by_hand_on_2x2_images():
  # Class 2 only predicted on the ignored pixel: absent, not counted (LibMTL's mean: NaN).
  metric = metrics.SegmentationMetric(3)
  metric.update(np.array([[[0, 1], [0, 2]]]), np.array([[[0, 1], [1, -1]]]))
  # confusion [[1, 0, 0], [1, 1, 0], [0, 0, 0]]: IoU_0 = 1 / (1 + 2 - 1), IoU_1 = 1 / (2 + 1 - 1).
  assert metric.result() == {"miou": 0.5, "pixel_acc": 2 / 3, "classes_counted": 2}
  # Class 2 predicted once but never true: counted, with IoU 0.
  metric = metrics.SegmentationMetric(3)
  metric.update(np.array([[[0, 1], [2, 1]]]), np.array([[[0, 1], [1, 1]]]))
  # IoU_0 = 1, IoU_1 = 2 / (3 + 2 - 2), IoU_2 = 0.
  got = metric.result()
  assert got["classes_counted"] == 3 and got["pixel_acc"] == 0.75
  assert got["miou"] == pytest.approx((1 + 2 / 3 + 0) / 3, rel=1e-15)


def test_segmentation_rejects_bad_inputs():
  metric = metrics.SegmentationMetric(3)
  with pytest.raises(ValueError, match="pred shape"):
    metric.update(np.zeros((1, 2, 2, 4)), np.zeros((1, 2, 2)))
  with pytest.raises(ValueError, match="predicted ids"):
    metric.update(np.full((1, 2), 3), np.zeros((1, 2)))
  with pytest.raises(ValueError, match="no labelled pixel"):
    metric.update(np.zeros((1, 2)), np.full((1, 2), -1))
    metric.result()


# Depth.


def _depth_reference(batches):
  """LibMTL's DepthMetric as written: a batch's mean over its valid pixels, weighted by
  pred.size()[0] after masked_select, the batch's count of valid pixels."""
  values, weights = [], []
  for pred, depth in batches:
    abs_sum = rel_sum = count = 0.0
    for p, d in zip(pred.ravel().astype(np.float64), depth.ravel().astype(np.float64)):
      if d != 0:
        abs_sum, rel_sum, count = abs_sum + abs(p - d), rel_sum + abs(p - d) / d, count + 1
    values.append((abs_sum / count, rel_sum / count))
    weights.append(count)
  return [sum(v[i] * w for v, w in zip(values, weights)) / sum(weights) for i in range(2)]


def test_depth_matches_libmtl_batch_weighting_over_batches_with_missing_pixels():
  rng = np.random.default_rng(2)
  batches = []
  for shape in _batches():
    depth = rng.uniform(0.5, 8.0, shape + (1,)).astype(np.float32)
    depth[rng.random(depth.shape) < rng.uniform(0.1, 0.6)] = 0   # Batches differ in coverage.
    batches.append(((depth + rng.normal(0, 0.5, depth.shape)).astype(np.float32), depth))
  metric = metrics.DepthMetric()
  for pred, depth in batches:
    metric.update(pred, depth)
  got = metric.result()
  want = _depth_reference(batches)
  np.testing.assert_allclose([got["abs_err"], got["rel_err"]], want, rtol=1e-12)
  by_images = sum(_depth_reference([b])[0] * len(b[0]) for b in batches) / sum(BATCH_SIZES)
  assert abs(by_images - got["abs_err"]) > 1e-3   # The data tells the two weightings apart.


def test_depth_by_hand_on_two_batches():
  metric = metrics.DepthMetric()
  metric.update(np.array([[[2.0, 2.0], [5.0, 3.0]]]), np.array([[[1.0, 2.0], [0.0, 4.0]]]))
  metric.update(np.array([[[9.0, 9.0], [9.0, 1.0]]]), np.array([[[0.0, 0.0], [0.0, 2.0]]]))
  # Batch 1: 3 valid pixels, |err| 1, 0, 1, rel 1, 0, 1/4; batch 2: 1 pixel, |err| 1, rel 1/2.
  # LibMTL: (2/3 * 3 + 1 * 1) / 4 and (5/12 * 3 + 1/2 * 1) / 4; by images it would be 5/6.
  assert metric.result() == {"abs_err": 0.75, "rel_err": 0.4375}
  with pytest.raises(ValueError, match="pred shape"):
    metric.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 1)))


# Surface normals.


def _normal_reference(batches):
  """LibMTL's NormalMetric in loops: every valid pixel's angle (degrees) over all batches, then
  the mean, median and shares strictly below 11.25, 22.5 and 30."""
  angles = []
  for pred, normal in batches:
    for p, n in zip(pred.reshape(-1, 3).astype(np.float64), normal.reshape(-1, 3).astype(np.float64)):
      if n.sum() != 0:
        p = p / math.sqrt(sum(v * v for v in p))
        cos = min(1.0, max(-1.0, sum(a * b for a, b in zip(p, n))))
        angles.append(math.degrees(math.acos(cos)))
  angles = np.array(angles)
  return {"mean_angle": angles.mean(), "median_angle": np.median(angles),
          **{f"within_{t:g}": np.mean(angles < t) for t in metrics.ANGLE_THRESHOLDS}}


def test_normals_match_a_loop_over_all_pixels_of_all_batches():
  rng = np.random.default_rng(3)
  batches = []
  for shape in _batches():
    normal = rng.normal(size=shape + (3,))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[rng.random(shape) < 0.3] = 0                          # Missing.
    pred = normal * rng.uniform(0.5, 3.0, shape + (1,)) + rng.normal(0, 0.4, shape + (3,))
    batches.append((pred.astype(np.float32), normal.astype(np.float32)))
  metric = metrics.NormalMetric()
  for pred, normal in batches:
    metric.update(pred, normal)
  got, want = metric.result(), _normal_reference(batches)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)


def test_normals_by_hand_and_libmtls_mask():
  up = [0.0, 0.0, 1.0]
  metric = metrics.NormalMetric()
  # 0, 45 and 90 degrees; the fourth pixel has no ground truth.
  metric.update(np.array([[[[0, 0, 5], [1, 0, 1]], [[0, 1, 0], [1, 2, 3]]]]),
                np.array([[[up, up], [up, [0, 0, 0]]]]))
  # 20 and 180 degrees; (1, -1, 0) / sqrt(2) sums to 0, so LibMTL's mask skips it.
  t = math.radians(20)
  s = 1 / math.sqrt(2)
  metric.update(np.array([[[math.sin(t), 0, math.cos(t)], [0, 0, -1], [0, 0, 1]]]),
                np.array([[up, up, [s, -s, 0]]]))
  got = metric.result()
  # Angles 0, 45, 90, 20, 180 pooled: not the mean of the batch means (45 and 100).
  assert got["mean_angle"] == pytest.approx(67, abs=1e-9)
  assert got["median_angle"] == pytest.approx(45, abs=1e-5)
  assert [got["within_11.25"], got["within_22.5"], got["within_30"]] == [0.2, 0.4, 0.4]
  with pytest.raises(ValueError, match="channels"):
    metric.update(np.zeros((1, 2, 2)), np.zeros((1, 2, 2)))
