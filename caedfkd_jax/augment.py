"""Random crop (zero padding) and horizontal flip in JAX, differentiable w.r.t. the images.

Used inside the generator's loss (NAYER's kornia augmentation) and on memory-bank
images for the student (the standard CIFAR transform).
"""

import jax
import jax.numpy as jnp


def sample_crop_flip(rng: jax.Array, batch: int, padding: int = 4, flip: bool = True):
  """Per-sample (dy, dx) offsets in [0, 2*padding] and flip decisions."""
  rng_y, rng_x, rng_f = jax.random.split(rng, 3)
  dy = jax.random.randint(rng_y, (batch,), 0, 2 * padding + 1)
  dx = jax.random.randint(rng_x, (batch,), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(rng_f, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
  return dy, dx, flips


def crop_flip(images_BxHxWxC: jax.Array, dy: jax.Array, dx: jax.Array, flips: jax.Array,
              padding: int = 4) -> jax.Array:
  """Applies given offsets and flips: pad with zeros, crop back to H x W, mirror."""
  _, h, w, c = images_BxHxWxC.shape
  padded = jnp.pad(images_BxHxWxC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, dy, dx)
  return jnp.where(flips[:, None, None, None], crop[:, :, ::-1, :], crop)


def random_crop_flip(rng: jax.Array, images_BxHxWxC: jax.Array, padding: int = 4,
                     flip: bool = True) -> jax.Array:
  dy, dx, flips = sample_crop_flip(rng, images_BxHxWxC.shape[0], padding, flip)
  return crop_flip(images_BxHxWxC, dy, dx, flips, padding)
