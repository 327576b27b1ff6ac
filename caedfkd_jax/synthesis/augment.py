"""Random crop (zero padding) and horizontal flip in JAX, differentiable w.r.t. the images.

One op serves both places NAYER augments: inside the generator's loss (kornia
RandomCrop(size, padding=4) + RandomHorizontalFlip, gradients flow back to the
generator) and on memory-bank images for the student (torchvision's
RandomCrop(32, padding=4) + RandomHorizontalFlip, the standard CIFAR transform).
Both pad with zeros and draw every sample's offsets and flip independently.

CMI's local view adds a random resized crop (`random_resized_crop_flip`):
torchvision's RandomResizedCrop box sampler, then a bilinear resize of the box
back to H x W written as two per-sample interpolation matrices, so that it is
jittable and its gradient reaches the generator. CMI itself runs kornia's
RandomResizedCrop, whose sampler rejects full-width boxes and whose warp aligns
corners; the views differ from ours by sub-pixel resampling only.
"""

import math

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


def sample_resized_crop_flip(
    rng: jax.Array, batch: int, height: int, width: int,
    scale: tuple[float, float] = (0.25, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True, attempts: int = 10,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per-sample crop boxes (y, x, h, w) drawn as torchvision's RandomResizedCrop.get_params.

  Each sample makes `attempts` (area, log-aspect) draws at once and keeps the
  first whose rounded box fits the image; where none fits it takes
  torchvision's central fallback crop. `random_resized_crop_flip(rng, ...)`
  uses exactly these draws for the same rng.
  """
  if not 0 < scale[0] <= scale[1]:
    raise ValueError(f"scale={scale} must satisfy 0 < min <= max.")
  if not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f"ratio={ratio} must satisfy 0 < min <= max.")
  # One uniform draw feeds every choice: five separate draws took 2.5x longer to compile.
  u = jax.random.uniform(rng, (batch, 2 * attempts + 3))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[:, attempts:2 * attempts])
  w_all = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)  # Python's round: half to even.
  h_all = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w_all > 0) & (w_all <= width) & (h_all > 0) & (h_all <= height)
  first = jnp.argmax(fits, axis=1)[:, None]
  found = jnp.any(fits, axis=1)
  # torchvision's fallback: the largest central box whose aspect lies within `ratio`.
  if width / height < ratio[0]:
    fb_w, fb_h = width, round(width / ratio[0])
  elif width / height > ratio[1]:
    fb_w, fb_h = round(height * ratio[1]), height
  else:
    fb_w, fb_h = width, height
  h = jnp.where(found, jnp.take_along_axis(h_all, first, axis=1)[:, 0], fb_h)
  w = jnp.where(found, jnp.take_along_axis(w_all, first, axis=1)[:, 0], fb_w)
  # Offsets uniform over the (height - h + 1) positions; u < 1, so the floor stays below that.
  offset = lambda v, room: jnp.minimum(jnp.floor(v * (room + 1)).astype(jnp.int32), room)
  y = jnp.where(found, offset(u[:, -3], height - h), (height - fb_h) // 2)
  x = jnp.where(found, offset(u[:, -2], width - w), (width - fb_w) // 2)
  flips = (u[:, -1] < 0.5) if flip else jnp.zeros((batch,), bool)
  return y, x, h, w, flips


def _bilinear_matrix(start: jax.Array, length: jax.Array, out_size: int, in_size: int) -> jax.Array:
  """out_size x in_size weights resizing pixels [start, start + length) to out_size pixels.

  PyTorch's bilinear resize with align_corners=False (torchvision's resize of
  the cropped box): half-pixel centres, source positions clamped to the box.
  """
  src = (jnp.arange(out_size) + 0.5) * (length / out_size) - 0.5
  src = jnp.clip(src, 0.0, length - 1.0)
  low = jnp.floor(src)
  frac = src - low
  high = jnp.minimum(low + 1, length - 1)
  cols = jnp.arange(in_size)
  at = lambda offset: (cols[None, :] == (start + offset.astype(jnp.int32))[:, None])
  return (1 - frac)[:, None] * at(low) + frac[:, None] * at(high)


def resized_crop_flip(images_BxHxWxC: jax.Array, y: jax.Array, x: jax.Array, h: jax.Array,
                      w: jax.Array, flips: jax.Array) -> jax.Array:
  """Crops box (y, x, h, w) of every image, resizes it bilinearly to H x W, mirrors where `flips`.

  Linear in the images (out = R_y @ image @ R_x^T per sample), so the gradient
  is exact; HIGHEST precision keeps GPUs from rounding the weights to TF32.
  """
  _, height, width, _ = images_BxHxWxC.shape
  rows_BxHxH = jax.vmap(lambda s, n: _bilinear_matrix(s, n, height, height))(y, h)
  cols_BxWxW = jax.vmap(lambda s, n: _bilinear_matrix(s, n, width, width))(x, w)
  cols_BxWxW = jnp.where(flips[:, None, None], cols_BxWxW[:, ::-1, :], cols_BxWxW)
  dtype = images_BxHxWxC.dtype
  highest = jax.lax.Precision.HIGHEST
  out = jnp.einsum("bhy,byxc->bhxc", rows_BxHxH.astype(dtype), images_BxHxWxC, precision=highest)
  return jnp.einsum("bwx,bhxc->bhwc", cols_BxWxW.astype(dtype), out, precision=highest)


def random_resized_crop_flip(rng: jax.Array, images_BxHxWxC: jax.Array,
                             scale: tuple[float, float] = (0.25, 1.0),
                             ratio: tuple[float, float] = (3 / 4, 4 / 3),
                             flip: bool = True) -> jax.Array:
  """torchvision RandomResizedCrop(size=(H, W), scale, ratio) + RandomHorizontalFlip, per sample.

  CMI's local view. Jittable (scale, ratio and flip are static) and
  differentiable w.r.t. the images; the identity when scale=ratio=(1, 1) on
  square images and flip=False.
  """
  if images_BxHxWxC.ndim != 4:
    raise ValueError(f"random_resized_crop_flip expects B x H x W x C images, got shape "
                     f"{images_BxHxWxC.shape}.")
  b, height, width, _ = images_BxHxWxC.shape
  y, x, h, w, flips = sample_resized_crop_flip(rng, b, height, width, scale, ratio, flip)
  return resized_crop_flip(images_BxHxWxC, y, x, h, w, flips)


def mixup(rng: jax.Array, images_BxHxWxC: jax.Array, alpha: float) -> jax.Array:
  """Mixup (Zhang et al. 2018): lam * x + (1 - lam) * x[perm], one lam ~ Beta(alpha, alpha) for
  the batch and a random pairing. Affine in the pixels, so mixing normalised images equals
  normalising mixed ones."""
  rng_lam, rng_perm = jax.random.split(rng)
  lam = jax.random.beta(rng_lam, alpha, alpha)
  partner = jax.random.permutation(rng_perm, images_BxHxWxC.shape[0])
  return lam * images_BxHxWxC + (1.0 - lam) * images_BxHxWxC[partner]
