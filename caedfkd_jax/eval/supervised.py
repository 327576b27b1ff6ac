"""One supervised train step: cross-entropy, SGD with momentum, weight decay, cosine learning rate.

It exists so that every plain supervised training in the library runs the same step: the demo's
teacher (`caedfkd demo`, float images in [0, 1], no augmentation), the fine-tuning probe
(`caedfkd probe --protocol finetune`, uint8 images, random crop + flip) and, later,
`caedfkd train`, instead of a copy of it in each.
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


def optimizer(learning_rate: float, momentum: float, weight_decay: float,
              total_steps: int) -> optax.GradientTransformation:
  """SGD with momentum on gradient + weight_decay * params; cosine decay to 0 over total_steps."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(learning_rate, total_steps),
                               momentum=momentum))


def train_step(model: nn.Module, tx: optax.GradientTransformation, variables: Variables,
               opt_state: optax.OptState, images_BxHxWxC: jax.Array, labels_B: jax.Array,
               rng: jax.Array | None, mean: jax.Array, std: jax.Array,
               padding: int | None = None) -> tuple[Variables, optax.OptState, jax.Array]:
  """One step on a batch; returns (variables, opt_state, the batch's mean cross-entropy).

  Integer (uint8) images are scaled to [0, 1], float images are taken as in [0, 1] already.
  With `padding` an int, a random crop (zero padding on each side) and horizontal flip drawn
  from `rng` follow; with None the images are not augmented and `rng` is not used. Then
  (x - mean) / std, and the model runs in training mode (batch statistics, updated
  running averages).
  """
  x01 = images_BxHxWxC
  if jnp.issubdtype(x01.dtype, jnp.integer):
    x01 = x01.astype(jnp.float32) / 255.0
  if padding is not None:
    if rng is None:
      raise ValueError("train_step with padding needs an rng for the crop and flip draws.")
    x01 = augment.random_crop_flip(rng, x01, padding)
  x = (x01 - mean) / std

  def loss_fn(params):
    (logits, _), new = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, train=True, mutable=["batch_stats"])
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
