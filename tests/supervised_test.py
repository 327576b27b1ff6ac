"""The shared supervised step (demo teacher, fine-tuning probe) against a hand-written one.

The step replaced two copies that had to stay numerically equal to them: SGD with momentum on
gradient + weight decay, a cosine learning rate, cross-entropy with batch statistics; uint8
images scaled to [0, 1] and cropped + flipped when given a padding, float images taken as they
are and never augmented without one.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from caedfkd_jax import models
from caedfkd_jax.eval import supervised
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.synthesis import augment

ARCH, CLASSES, SIZE = "resnet_tiny_a", 3, 8
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
LR, MOMENTUM, WD, TOTAL = 0.1, 0.9, 5e-3, 4


@pytest.fixture(scope="module")
def model_and_variables():
  spec = bundle_lib.ModelSpec(ARCH, CLASSES, SIZE)
  return models.create_model(ARCH, CLASSES), bundle_lib.init_variables(spec, 0)


def _batch(seed, b=6):
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (b, SIZE, SIZE, 3), dtype=np.uint8),
          rng.integers(0, CLASSES, b).astype(np.int32))


def _own(tree):
  """Fresh buffers: the jitted step donates its variables and optimizer state."""
  return jax.tree.map(jnp.array, tree)


def _reference_loss_and_grads(model, variables, x):
  """Cross-entropy and its gradient w.r.t. the params on already normalised images."""
  def loss_fn(params, labels):
    (logits, _), new = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new
  return lambda labels: jax.value_and_grad(loss_fn, has_aux=True)(variables["params"], labels)


def _normalise(x01):
  return (x01 - jnp.asarray(MEAN)) / jnp.asarray(STD)


def test_two_steps_match_hand_written_sgd_momentum_cosine(model_and_variables):
  """Two steps, so that the momentum trace and the cosine schedule's second rate both count."""
  model, variables = model_and_variables
  tx = supervised.optimizer(LR, MOMENTUM, WD, TOTAL)
  step = supervised.make_step(model, tx, MEAN, STD, padding=2)
  batches = [_batch(1), _batch(2)]
  rngs = [jax.random.key(7), jax.random.key(8)]

  got, opt_state, got_losses = _own(variables), tx.init(variables["params"]), []
  for (images, labels), rng in zip(batches, rngs):
    got, opt_state, loss = step(got, opt_state, images, labels, rng)
    got_losses.append(float(loss))

  # By hand: trace = momentum * trace + grad + wd * params; params -= lr_t * trace, with
  # lr_t = LR * (1 + cos(pi * t / TOTAL)) / 2.
  want, trace, want_losses = variables, None, []
  for t, ((images, labels), rng) in enumerate(zip(batches, rngs)):
    x = _normalise(augment.random_crop_flip(rng, jnp.asarray(images, jnp.float32) / 255.0, 2))
    (loss, new), grads = _reference_loss_and_grads(model, want, x)(labels)
    direction = jax.tree.map(lambda g, p: g + WD * p, grads, want["params"])
    trace = direction if trace is None else jax.tree.map(
        lambda m, d: MOMENTUM * m + d, trace, direction)
    lr = LR * (1 + math.cos(math.pi * t / TOTAL)) / 2
    want = {"params": jax.tree.map(lambda p, m: p - lr * m, want["params"], trace),
            "batch_stats": new["batch_stats"]}
    want_losses.append(float(loss))

  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
  # The step really moved every weight, so the comparison above is not of two copies of the start.
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                       got["params"], variables["params"])
  assert all(jax.tree.leaves(moved))


def test_without_padding_images_are_not_augmented(model_and_variables):
  """padding=None (the demo's teacher): float images go in as they are, whatever the rng."""
  model, variables = model_and_variables
  tx = supervised.optimizer(LR, MOMENTUM, WD, TOTAL)
  images, labels = _batch(3)
  x01 = images.astype(np.float32) / 255.0
  want_loss = float(_reference_loss_and_grads(model, variables, _normalise(x01))(labels)[0][0])

  def loss_of(padding, images, rng):
    step = supervised.make_step(model, tx, MEAN, STD, padding=padding)
    return float(step(_own(variables), tx.init(variables["params"]), images, labels, rng)[2])

  plain = supervised.make_step(model, tx, MEAN, STD)
  losses = [float(plain(_own(variables), tx.init(variables["params"]), x, labels, rng)[2])
            for x, rng in ((x01, None), (x01, jax.random.key(1)), (images, jax.random.key(2)))]
  # Float images are not rescaled, uint8 ones are scaled to [0, 1]; no rng changes anything.
  np.testing.assert_allclose(losses, [want_loss] * 3, rtol=1e-6)
  # The same images with a padding are cropped and flipped: the loss moves, so the check above
  # could see an augmentation.
  assert abs(loss_of(2, images, jax.random.key(1)) - want_loss) > 1e-4


def test_padding_without_rng_is_refused(model_and_variables):
  model, variables = model_and_variables
  tx = supervised.optimizer(LR, MOMENTUM, WD, TOTAL)
  images, labels = _batch(4)
  with pytest.raises(ValueError, match="needs an rng"):
    supervised.train_step(model, tx, variables, tx.init(variables["params"]), images, labels,
                          None, jnp.asarray(MEAN), jnp.asarray(STD), padding=2)
