"""NYUv2's three task losses as LibMTL's `examples/nyu/utils.py` computes them, in JAX.

Equally weighted in the multi-task sum (LibMTL's EW). Arrays are NHWC. A pixel is valid for
depth and normals where its ground truth, summed over channels, is not 0 (LibMTL's
`binary_mask`); segmentation ignores label -1. Where a batch has no valid pixel these return
0, where LibMTL's division by a zero count would give NaN or inf.
"""

import jax
import jax.numpy as jnp

IGNORE_LABEL = -1


def _valid_pixels(gt_BxHxWxC: jax.Array) -> jax.Array:
  """LibMTL's mask: the ground truth's channel sum is not 0 (B x H x W x 1, float32)."""
  return (jnp.sum(gt_BxHxWxC, axis=-1, keepdims=True) != 0).astype(jnp.float32)


def segmentation_loss(logits_BxHxWxC: jax.Array, labels_BxHxW: jax.Array,
                      ignore_index: int = IGNORE_LABEL) -> jax.Array:
  """Cross-entropy averaged over the pixels whose label is not `ignore_index`
  (`nn.CrossEntropyLoss(ignore_index=-1)`)."""
  labels = labels_BxHxW.astype(jnp.int32)
  valid = labels != ignore_index
  log_probs = jax.nn.log_softmax(logits_BxHxWxC.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def depth_loss(pred_BxHxWx1: jax.Array, gt_BxHxWx1: jax.Array) -> jax.Array:
  """L1 over the pixels with a depth (`DepthLoss`): sum |pred - gt| over them / their count."""
  mask = _valid_pixels(gt_BxHxWx1)
  error = jnp.abs(pred_BxHxWx1.astype(jnp.float32) - gt_BxHxWx1) * mask
  return jnp.sum(error) / jnp.maximum(jnp.sum(mask), 1)


def normal_loss(pred_BxHxWx3: jax.Array, gt_BxHxWx3: jax.Array, eps: float = 1e-12) -> jax.Array:
  """1 - the mean cosine between the normalised prediction and the (unit) ground truth over
  the valid pixels (`NormalLoss`). The normalisation adds `eps` under the root, so an all-zero
  prediction has a finite gradient."""
  pred = pred_BxHxWx3.astype(jnp.float32)
  pred = pred * jax.lax.rsqrt(jnp.sum(pred * pred, axis=-1, keepdims=True) + eps)
  mask = _valid_pixels(gt_BxHxWx3)
  return 1.0 - jnp.sum(pred * gt_BxHxWx3 * mask) / jnp.maximum(jnp.sum(mask), 1)


def multitask_loss(outputs: dict[str, jax.Array], targets: dict[str, jax.Array]
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The equally weighted sum over the tasks present in `outputs` ("segmentation", "depth",
  "normal"), and each task's loss."""
  fns = {"segmentation": segmentation_loss, "depth": depth_loss, "normal": normal_loss}
  unknown = sorted(set(outputs) - set(fns))
  if unknown:
    raise ValueError(f"Unknown tasks {unknown}; the tasks are {', '.join(fns)}.")
  terms = {task: fns[task](outputs[task], targets[task]) for task in outputs}
  return sum(terms.values()), terms
