"""NYUv2's task losses against LibMTL's formulas, restated with torch (issue 27)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caedfkd_jax.transfer import losses


def _batch(seed=0, b=2, h=5, w=6, c=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(b, h, w, c)).astype(np.float32)
  labels = rng.integers(-1, c, size=(b, h, w))
  depth = rng.uniform(0.5, 3, size=(b, h, w, 1)).astype(np.float32)
  depth[rng.random((b, h, w)) < 0.3] = 0.0                     # Missing depth.
  pred_depth = rng.uniform(0.5, 3, size=(b, h, w, 1)).astype(np.float32)
  normal = rng.normal(size=(b, h, w, 3))
  normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
  normal[depth[..., 0] == 0] = 0.0                             # Missing normals.
  pred_normal = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  return logits, labels, depth, pred_depth, normal.astype(np.float32), pred_normal


def _nchw(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x, np.float64), -1, 1))


def test_each_loss_is_libmtls():
  logits, labels, depth, pred_depth, normal, pred_normal = _batch()
  # LibMTL's SegLoss, DepthLoss, NormalLoss (examples/nyu/utils.py), in float64.
  seg = torch.nn.CrossEntropyLoss(ignore_index=-1)(_nchw(logits), torch.from_numpy(labels))
  gt, pred = _nchw(depth), _nchw(pred_depth)
  mask = (torch.sum(gt, dim=1) != 0).double().unsqueeze(1)
  dep = torch.sum(torch.abs(pred - gt) * mask) / torch.nonzero(mask, as_tuple=False).size(0)
  gt, pred = _nchw(normal), _nchw(pred_normal)
  pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
  mask = (torch.sum(gt, dim=1) != 0).double().unsqueeze(1)
  nor = 1 - torch.sum((pred * gt) * mask) / torch.nonzero(mask, as_tuple=False).size(0)
  np.testing.assert_allclose(float(losses.segmentation_loss(logits, labels)), seg.item(), rtol=1e-5)
  np.testing.assert_allclose(float(losses.depth_loss(pred_depth, depth)), dep.item(), rtol=1e-5)
  np.testing.assert_allclose(float(losses.normal_loss(pred_normal, normal)), nor.item(), rtol=1e-5)
  total, terms = losses.multitask_loss(
      {"segmentation": logits, "depth": pred_depth, "normal": pred_normal},
      {"segmentation": labels, "depth": depth, "normal": normal})
  np.testing.assert_allclose(float(total), seg.item() + dep.item() + nor.item(), rtol=1e-5)
  assert set(terms) == {"segmentation", "depth", "normal"}


def test_no_valid_pixel_gives_zero_and_gradients_stay_finite():
  logits, labels, depth, pred_depth, normal, pred_normal = _batch(1)
  assert float(losses.segmentation_loss(logits, np.full_like(labels, -1))) == 0.0
  assert float(losses.depth_loss(pred_depth, np.zeros_like(depth))) == 0.0
  assert float(losses.normal_loss(pred_normal, np.zeros_like(normal))) == 1.0   # 1 - 0
  grads = jax.grad(losses.normal_loss)(jnp.zeros_like(pred_normal), normal)
  assert np.isfinite(np.asarray(grads)).all()
  with pytest.raises(ValueError, match="Unknown tasks \\['edges'\\]"):
    losses.multitask_loss({"edges": logits}, {"edges": labels})
