"""CMI's contrastive term (Fang et al., Contrastive Model Inversion, IJCAI 2021), as pure pieces.

CMI makes every synthetic image distinguishable from the others: the teacher's
per-instance BN-input means of a local view (random resized crop) and a global
view (padded crop) of the same image are projected by a small head and must
pick each other out among the current batch and a memory of past batches.

Checked against the authors' `datafree/synthesis/contrastive.py` (CMISynthesizer,
MLPHead, MemoryBank) and `datafree/hooks.py` (InstanceMeanHook). Matches:
  * features: instance means over H, W of the input of every teacher BN layer,
    concatenated in module order (CMI hooks `teacher.modules()`; our order is
    the forward order, the same for the zoo);
  * head: Linear(D, D) - ReLU - Linear(D, 256), L2-normalised (eps 1e-12), with
    PyTorch's default Linear init; one pass over [local; cached local; global;
    cached global];
  * logits = head(local_all) . stop_gradient(head(global_all))^T / T, so the
    generator and the head learn through the local view only; cross-entropy
    against the diagonal, mean over current rows + mean over cached rows (the
    current mean alone while the memory is empty);
  * the memory stores raw features (local || global, not projected), the head
    is re-applied to them each step; negatives are drawn without replacement.
Deliberate differences:
  * fixed shapes for jit: the memory is a ring buffer of `capacity` rows, the
    n_neg negatives are padded and masked; a masked row takes no part in the
    softmax (its logit column is -1e9) nor in the cached mean, so the loss
    equals CMI's computed on the valid rows alone;
  * CMI's bank samples only slots [0, ptr) while `n_updates == max_size`
    exactly (an empty draw: a NaN mean), and asserts max_size % batch == 0;
    ours samples every filled slot and wraps writes at any batch size;
  * CMI's ResNet-34 teacher uses the inputs of layer1..4 instead of BN inputs;
    `teacher_instance_features` always takes BN inputs.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct, traverse_util

from caedfkd_jax.models.layers import BN_INSTANCE_MEANS, BN_STATS, linear

PyTree = Any

HEAD_DIM = 256      # CMI's head_dim as datafree_kd.py passes it.
_MASKED_LOGIT = -1e9  # exp() underflows to 0: a masked column leaves the softmax.


class ContrastHead(nn.Module):
  """CMI's MLPHead: Linear(D, hidden) - ReLU - Linear(hidden, features), then L2 normalisation."""
  features: int = HEAD_DIM
  hidden: int | None = None  # D, the input width, when None (as CMI).

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    d = x_BxD.shape[-1]
    hidden = self.hidden or d
    x = nn.relu(linear(hidden, d, name="fc1")(x_BxD))
    x = linear(self.features, hidden, name="fc2")(x)
    norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.maximum(norm, 1e-12)  # F.normalize(p=2, eps=1e-12)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_head_params(rng: jax.Array, feature_dim: int, features: int) -> PyTree:
  # Jitted once per shape: an eager init compiles each of its small ops on first use.
  head = ContrastHead(features=features)
  return head.init(rng, jnp.zeros((1, feature_dim), jnp.float32))["params"]


def init_head(rng: jax.Array, feature_dim: int, features: int = HEAD_DIM
              ) -> tuple[ContrastHead, PyTree]:
  """A head for D = `feature_dim` inputs and its params (PyTorch's default init)."""
  return ContrastHead(features=features), _init_head_params(rng, feature_dim, features)


def instance_mean_layers(instance_means: PyTree) -> list[tuple[tuple[str, ...], jax.Array]]:
  """(module path, B x C_l means) of every BN layer, in the order the forward pass sowed them.

  Flax inserts each sown value into its collection as the layer runs and
  `flatten_dict` walks dicts in insertion order; jax.tree would sort the names
  instead (layer1_10 before layer1_2).
  """
  flat = traverse_util.flatten_dict(instance_means)
  return [(path[:-1], value) for path, value in flat.items()]


def teacher_instance_features(teacher: nn.Module, teacher_vars: PyTree, x_BxHxWxC: jax.Array
                              ) -> tuple[jax.Array, jax.Array, PyTree]:
  """One eval-mode teacher pass: (logits, B x sum(C_l) instance features, bn_stats).

  The features are CMI's contrastive features; bn_stats is the batch-level
  collection that the BN loss compares with `batch_stats`. Under jit, XLA drops
  whichever of the three the caller ignores.
  """
  (logits, _), state = teacher.apply(teacher_vars, x_BxHxWxC, train=False,
                                     mutable=[BN_STATS, BN_INSTANCE_MEANS])
  layers = instance_mean_layers(state[BN_INSTANCE_MEANS])
  features = jnp.concatenate([means for _, means in layers], axis=-1)
  return logits, features, state[BN_STATS]


@struct.dataclass
class FeatureMemory:
  """CMI's bank of past best features: a ring of `capacity` rows of (local || global)."""
  features: jax.Array  # float32, capacity x 2D
  size: jax.Array      # int32 scalar: filled rows (rows 0..size-1)
  next: jax.Array      # int32 scalar: the row the next write starts at

  @property
  def capacity(self) -> int:
    return self.features.shape[0]

  @property
  def feature_dim(self) -> int:
    return self.features.shape[1] // 2


def create(capacity: int, feature_dim: int) -> FeatureMemory:
  """An empty memory for D = `feature_dim` features per view (CMI: capacity 40960)."""
  if capacity < 1:
    raise ValueError(f"Feature memory capacity must be at least 1, got {capacity}.")
  return FeatureMemory(jnp.zeros((capacity, 2 * feature_dim), jnp.float32),
                       jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def add(memory: FeatureMemory, local_BxD: jax.Array, global_BxD: jax.Array) -> FeatureMemory:
  """Writes a batch at the ring pointer, overwriting the oldest rows once full.

  Gradients are stopped: cached rows are constants for later rounds (CMI
  stores `.detach()`ed features).
  """
  b, d = local_BxD.shape
  if global_BxD.shape != (b, d) or d != memory.feature_dim:
    raise ValueError(f"Expected local and global features of shape (B, {memory.feature_dim}), "
                     f"got {local_BxD.shape} and {global_BxD.shape}.")
  if b > memory.capacity:
    raise ValueError(f"A batch of {b} features does not fit a memory of {memory.capacity}.")
  rows = jax.lax.stop_gradient(jnp.concatenate([local_BxD, global_BxD], axis=1))
  slots = (memory.next + jnp.arange(b)) % memory.capacity
  return memory.replace(
      features=memory.features.at[slots].set(rows.astype(jnp.float32), unique_indices=True),
      size=jnp.minimum(memory.size + b, memory.capacity),
      next=(memory.next + b) % memory.capacity)


def sample_negatives(memory: FeatureMemory, rng: jax.Array, n_neg: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Up to `n_neg` distinct filled rows, uniformly: (local n_neg x D, global n_neg x D, valid mask).

  A uniformly random subset without replacement (CMI's random.sample): the
  top-n_neg of i.i.d. uniform scores over the filled rows. Rows past the
  filled count, or past the capacity, are zeros with mask False.
  """
  if n_neg < 0:
    raise ValueError(f"n_neg={n_neg} is negative.")
  k = min(n_neg, memory.capacity)
  filled = jnp.arange(memory.capacity) < memory.size
  scores = jnp.where(filled, jax.random.uniform(rng, (memory.capacity,)), -1.0)
  _, index = jax.lax.top_k(scores, k)
  mask = jnp.arange(n_neg) < jnp.minimum(memory.size, k)
  rows = jnp.pad(memory.features[index], ((0, n_neg - k), (0, 0)))
  rows = jnp.where(mask[:, None], rows, 0.0)
  d = memory.feature_dim
  return rows[:, :d], rows[:, d:], mask


def contrastive_loss(head_params: PyTree, head: ContrastHead, local_BxD: jax.Array,
                     global_BxD: jax.Array, memory_local_NxD: jax.Array,
                     memory_global_NxD: jax.Array, memory_mask_N: jax.Array,
                     temperature: float) -> jax.Array:
  """CMI's L_cr: each local view must find its own global view among current and cached rows.

  logits = head(local_all) . stop_gradient(head(global_all))^T / T over
  *_all = [current; cached]; cross-entropy against the diagonal, averaged over
  the B current rows plus averaged over the valid cached rows (0 when none).
  Invalid cached rows leave both the softmax and the average.
  """
  b = local_BxD.shape[0]
  mask = memory_mask_N.astype(bool)
  local_all = jnp.concatenate([local_BxD, memory_local_NxD], axis=0)
  global_all = jnp.concatenate([global_BxD, memory_global_NxD], axis=0)
  projected = head.apply({"params": head_params}, jnp.concatenate([local_all, global_all], axis=0))
  proj_local, proj_global = jnp.split(projected, 2, axis=0)
  logits = proj_local @ jax.lax.stop_gradient(proj_global).T / temperature
  valid = jnp.concatenate([jnp.ones((b,), bool), mask])
  logits = jnp.where(valid[None, :], logits, _MASKED_LOGIT)
  ce = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  cached_ce = jnp.where(mask, ce[b:], 0.0)
  n_cached = jnp.sum(mask.astype(jnp.float32))
  return jnp.mean(ce[:b]) + jnp.sum(cached_ce) / jnp.maximum(n_cached, 1.0)
