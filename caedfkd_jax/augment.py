"""Random crop (zero padding) and horizontal flip in JAX, differentiable w.r.t. the images.

One op serves both places NAYER augments: inside the generator's loss (kornia
RandomCrop(size, padding=4) + RandomHorizontalFlip, gradients flow back to the
generator) and on memory-bank images for the student (torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip, the standard CIFAR transform).
Both pad with zeros and draw every sample's offsets and flip independently.
"""

import jax
import jax.numpy as jnp


def sample_crop_flip(rng: jax.Array, batch: int, padding: int = 4,
                     flip: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-sample crop offsets (dy, dx), uniform in [0, 2 * padding], and flips (p = 0.5).

  `random_crop_flip(rng, ...)` uses exactly these draws for the same rng.
  """
  if padding < 0:
    raise ValueError(f"padding={padding} is negative; use 0 (no crop) or more.")
  rng_y, rng_x, rng_f = jax.random.split(rng, 3)
  dy = jax.random.randint(rng_y, (batch,), 0, 2 * padding + 1)
  dx = jax.random.randint(rng_x, (batch,), 0, 2 * padding + 1)
  flips = jax.random.bernoulli(rng_f, 0.5, (batch,)) if flip else jnp.zeros((batch,), bool)
  return dy, dx, flips


def crop_flip(images_BxHxWxC: jax.Array, dy: jax.Array, dx: jax.Array, flips: jax.Array,
              padding: int = 4) -> jax.Array:
  """Pads every side with `padding` zeros, crops H x W at (dy, dx), then mirrors where `flips`."""
  _, h, w, c = images_BxHxWxC.shape
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  padded = jnp.pad(images_BxHxWxC, pad)
  crop = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, c)))(padded, dy, dx)
  return jnp.where(flips[:, None, None, None], crop[:, :, ::-1, :], crop)


def random_crop_flip(rng: jax.Array, images_BxHxWxC: jax.Array, padding: int = 4,
                     flip: bool = True) -> jax.Array:
  """Random zero-padded crop back to H x W, then a random horizontal flip, per sample.

  Jittable (padding and flip are static) and differentiable w.r.t. the images;
  the identity when padding=0 and flip=False.
  """
  if images_BxHxWxC.ndim != 4:
    raise ValueError(f"random_crop_flip expects B x H x W x C images, got shape "
                     f"{images_BxHxWxC.shape}.")
  dy, dx, flips = sample_crop_flip(rng, images_BxHxWxC.shape[0], padding, flip)
  return crop_flip(images_BxHxWxC, dy, dx, flips, padding)
