"""One supervised train step: cross-entropy, SGD with momentum, weight decay, cosine learning rate.

It exists so that every plain supervised training in the library runs the same step: the demo's
teacher (`caedfkd demo`, float images in [0, 1], no augmentation), the fine-tuning probe
(`caedfkd probe --protocol finetune`, uint8 images, random crop + flip) and `caedfkd train`
(engine/train_supervised.py: any optax optimizer, crop + flip or a random resized crop, label
smoothing), instead of a copy of it in each.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from caedfkd_jax.synthesis import augment

Variables = dict[str, Any]   # {"params": ..., "batch_stats": ...}
Step = Callable[[Variables, optax.OptState, jax.Array, jax.Array, jax.Array | None],
                tuple[Variables, optax.OptState, jax.Array]]


def sgd(learning_rate: float | optax.Schedule, momentum: float, weight_decay: float,
        nesterov: bool = False) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, weight_decay, nesterov): weight_decay * params added to the
  gradient, then momentum (none at 0)."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov))


def optimizer(learning_rate: float, momentum: float, weight_decay: float,
              total_steps: int) -> optax.GradientTransformation:
  """`sgd` with a cosine decay to 0 over total_steps."""
  return sgd(optax.cosine_decay_schedule(learning_rate, total_steps), momentum, weight_decay)


AUGMENTS = ("crop_flip", "resized_crop_flip", "flip", "none")


def augment_images(rng: jax.Array | None, images01_BxHxWxC: jax.Array, kind: str,
                   padding: int = 4, scale: tuple[float, float] = (0.08, 1.0)) -> jax.Array:
  """The training augmentation `kind` (one of AUGMENTS) of images in [0, 1], drawn from `rng`.

  crop_flip: zero-padded random crop + horizontal flip (the CIFAR recipe); resized_crop_flip:
  torchvision's RandomResizedCrop(scale) + flip at the same size (the ImageNet recipe); flip:
  the flip alone; none: the images as they are (`rng` unused).
  """
  if kind == "none":
    return images01_BxHxWxC
  if kind not in AUGMENTS:
    raise ValueError(f"augment {kind!r}: use one of {', '.join(AUGMENTS)}.")
  if rng is None:
    raise ValueError(f"augment {kind!r} needs an rng for its random draws.")
  if kind == "crop_flip":
    return augment.random_crop_flip(rng, images01_BxHxWxC, padding)
  if kind == "flip":
    return augment.random_crop_flip(rng, images01_BxHxWxC, 0)
  return augment.random_resized_crop_flip(rng, images01_BxHxWxC, scale=scale)


def train_step(model: nn.Module, tx: optax.GradientTransformation, variables: Variables,
               opt_state: optax.OptState, images_BxHxWxC: jax.Array, labels_B: jax.Array,
               rng: jax.Array | None, mean: jax.Array, std: jax.Array,
               padding: int | None = None, *, augment_kind: str | None = None,
               crop_scale: tuple[float, float] = (0.08, 1.0), label_smoothing: float = 0.0) -> tuple[Variables, optax.OptState, jax.Array]:
  """One step on a batch; returns (variables, opt_state, the batch's mean cross-entropy).

  Integer (uint8) images are scaled to [0, 1], float images are taken as in [0, 1] already.
  With `padding` an int, a random crop (zero padding on each side) and horizontal flip drawn
  from `rng` follow; with None the images are not augmented and `rng` is not used.
  `augment_kind` (AUGMENTS), when given, picks the augmentation instead (`crop_scale`: the
  resized crop's area range). Then
  (x - mean) / std, and the model runs in training mode (batch statistics, updated
  running averages). The loss is computed in float32 whatever the model's dtype.
  """
  x01 = images_BxHxWxC
  if jnp.issubdtype(x01.dtype, jnp.integer):
    x01 = x01.astype(jnp.float32) / 255.0
  if augment_kind is None:
    augment_kind, padding = ("none", 0) if padding is None else ("crop_flip", padding)
  x01 = augment_images(rng, x01, augment_kind, padding or 0, crop_scale)
  x = (x01 - mean) / std

  def loss_fn(params):
    (logits, _), new = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, train=True, mutable=["batch_stats"])
    logits = logits.astype(jnp.float32)
    if label_smoothing:
      targets = optax.smooth_labels(jax.nn.one_hot(labels_B, logits.shape[-1]), label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean(), new
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels_B).mean(), new

  (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
  updates, opt_state = tx.update(grads, opt_state, variables["params"])
  return ({"params": optax.apply_updates(variables["params"], updates),
           "batch_stats": new["batch_stats"]}, opt_state, loss)


def make_step(model: nn.Module, tx: optax.GradientTransformation, mean: Sequence[float],
              std: Sequence[float], padding: int | None = None) -> Step:
  """`train_step` jitted: `(variables, opt_state, images, labels, rng) -> (variables, opt_state,
  loss)`. It donates variables and opt_state: pass buffers of your own (`jax.tree.map(jnp.array,
  ...)`) and use only the returned ones afterwards."""
  mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

  def step(variables, opt_state, images, labels, rng):
    return train_step(model, tx, variables, opt_state, images, labels, rng, mean_a, std_a, padding)

  return jax.jit(step, donate_argnums=(0, 1))
