"""Random crop + flip against a NumPy reference, random resized crop + flip against PyTorch,
for the same draws, and their gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from caedfkd_jax.synthesis.augment import (crop_flip, random_crop_flip, random_resized_crop_flip,
                                 resized_crop_flip, sample_crop_flip, sample_resized_crop_flip)


def _reference(images, dy, dx, flips, padding):
  """torchvision/kornia RandomCrop(size, padding) + RandomHorizontalFlip for given draws."""
  images = np.asarray(images, np.float64)
  _, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  out = []
  for im, y, x, f in zip(padded, np.asarray(dy), np.asarray(dx), np.asarray(flips)):
    crop = im[y:y + h, x:x + w]
    out.append(crop[:, ::-1] if f else crop)
  return np.stack(out)


def _images(b=16, h=8, w=8, c=3):
  return jax.random.uniform(jax.random.key(0), (b, h, w, c))


class RandomCropFlipTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_numpy_reference_for_the_same_draws(self):
    images = _images()
    rng = jax.random.key(5)
    fn = self.variant(functools.partial(random_crop_flip, padding=2, flip=True))
    out = fn(rng, images)
    dy, dx, flips = sample_crop_flip(rng, images.shape[0], padding=2, flip=True)
    np.testing.assert_array_equal(out, _reference(images, dy, dx, flips, 2).astype(np.float32))
    # The draws really vary per sample, so the test covers crops and flips.
    assert len(set(np.asarray(dy).tolist())) > 1 and len(set(np.asarray(dx).tolist())) > 1
    assert 0 < int(np.asarray(flips).sum()) < images.shape[0]


def test_draw_distribution():
  dy, dx, flips = sample_crop_flip(jax.random.key(1), 20000, padding=4)
  for offsets in (dy, dx):
    counts = np.bincount(np.asarray(offsets), minlength=9)
    assert counts.shape == (9,)  # Offsets within [0, 2 * padding] ...
    np.testing.assert_allclose(counts / 20000, 1 / 9, atol=0.01)  # ... and uniform.
  assert abs(float(np.asarray(flips).mean()) - 0.5) < 0.015
  assert not np.asarray(sample_crop_flip(jax.random.key(1), 100, flip=False)[2]).any()


def test_zero_padding_at_the_border():
  ones = jnp.ones((4, 8, 8, 1))
  dy = jnp.array([0, 8, 0, 3])
  dx = jnp.array([0, 8, 8, 5])
  out = np.asarray(crop_flip(ones, dy, dx, jnp.zeros(4, bool), padding=4))[..., 0]
  expected = np.zeros((4, 8, 8))
  expected[0, 4:, 4:] = 1   # Shifted down-right: zeros enter top and left.
  expected[1, :4, :4] = 1   # Shifted up-left: zeros at bottom and right.
  expected[2, 4:, :4] = 1
  expected[3, 1:, :7] = 1
  np.testing.assert_array_equal(out, expected)


def test_flip_mirrors_columns():
  images = _images(b=2)
  out = crop_flip(images, jnp.zeros(2, int), jnp.zeros(2, int), jnp.array([True, False]), padding=0)
  np.testing.assert_array_equal(out[0], images[0, :, ::-1])
  np.testing.assert_array_equal(out[1], images[1])


def test_identity_without_padding_and_flip():
  images = _images()
  np.testing.assert_array_equal(random_crop_flip(jax.random.key(3), images, padding=0, flip=False), images)


def test_gradient_is_the_adjoint_of_the_crop():
  """d/dx sum(R * aug(x)) puts R back where each output pixel came from; cropped-away pixels get 0."""
  images = _images(b=6)
  rng = jax.random.key(11)
  weights = jax.random.normal(jax.random.key(12), images.shape)
  grad = jax.grad(lambda x: jnp.sum(weights * random_crop_flip(rng, x, padding=3)))(images)
  chex.assert_tree_all_finite(grad)
  dy, dx, flips = (np.asarray(a) for a in sample_crop_flip(rng, 6, padding=3))
  w = np.asarray(weights, np.float64)
  expected = np.zeros((6, 8 + 6, 8 + 6, 3))
  for i in range(6):
    expected[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] = w[i, :, ::-1] if flips[i] else w[i]
  np.testing.assert_allclose(grad, expected[:, 3:-3, 3:-3], atol=1e-6)
  assert float(jnp.abs(grad).sum()) > 0


def test_negative_padding_is_rejected():
  with pytest.raises(ValueError, match="padding=-1"):
    random_crop_flip(jax.random.key(0), _images(), padding=-1)
  with pytest.raises(ValueError, match="B x H x W x C"):
    random_crop_flip(jax.random.key(0), jnp.zeros((8, 8, 3)))


# --- Random resized crop (CMI's local view) --------------------------------------------------


def _torch_resized_crop_flip(images, y, x, h, w, flips):
  """torchvision's resized_crop for the same boxes: crop, bilinear resize (upscaling, so antialias
  changes nothing) with align_corners=False, then hflip; in float64."""
  images = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
  _, _, height, width = images.shape
  out = []
  for im, *box in zip(images, *(np.asarray(a).tolist() for a in (y, x, h, w, flips))):
    top, left, hh, ww, f = box
    crop = im[None, :, top:top + hh, left:left + ww]
    resized = torch.nn.functional.interpolate(crop, size=(height, width), mode="bilinear",
                                              align_corners=False)[0]
    out.append(resized.flip(-1) if f else resized)
  return torch.stack(out).permute(0, 2, 3, 1).numpy()


# Jitted once per shape: eager, each small op of the sampler would compile on its own.
_rrc = jax.jit(random_resized_crop_flip, static_argnames=("scale", "ratio", "flip"))
_sample_rrc = jax.jit(sample_resized_crop_flip, static_argnums=(1, 2, 3, 4, 5, 6))


def test_resized_crop_matches_torch_for_the_same_draws():
  images = np.random.RandomState(0).rand(12, 8, 10, 3).astype(np.float32)  # Not square.
  rng = jax.random.key(2)
  out = _rrc(rng, images)
  y, x, h, w, flips = _sample_rrc(rng, 12, 8, 10, (0.25, 1.0), (3 / 4, 4 / 3), True)
  np.testing.assert_allclose(out, _torch_resized_crop_flip(images, y, x, h, w, flips), atol=1e-6)
  # The draws vary, so crops, resizes and flips are all covered.
  assert len(set(np.asarray(h * 100 + w).tolist())) > 3 and 0 < int(flips.sum()) < 12
  assert int((h < 8).sum()) > 3 and int((w < 10).sum()) > 3


def test_resized_crop_identity_at_full_scale_without_flip():
  images = _images(b=6)
  out = _rrc(jax.random.key(0), images, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
  np.testing.assert_allclose(out, images, atol=1e-6)


def test_resized_crop_boxes_respect_scale_ratio_and_image():
  n, height, width = 4000, 32, 32
  scale, ratio = (0.25, 1.0), (3 / 4, 4 / 3)
  y, x, h, w, flips = (np.asarray(a) for a in _sample_rrc(
      jax.random.key(4), n, height, width, scale, ratio, True))
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  # Sides are rounded to whole pixels: bounds hold up to half a pixel on each side.
  area = height * width
  assert ((h + 0.5) * (w + 0.5) >= scale[0] * area).all()
  assert ((h - 0.5) * (w - 0.5) <= scale[1] * area).all()
  assert ((w + 0.5) / (h - 0.5) >= ratio[0]).all() and ((w - 0.5) / (h + 0.5) <= ratio[1]).all()
  # The whole range is used: small and full crops, both aspects, every position.
  frac = h * w / area
  assert frac.min() < 0.3 and frac.max() > 0.95 and (w > h).any() and (w < h).any()
  assert len(np.unique(y)) > 10 and len(np.unique(x)) > 10
  assert abs(float(flips.mean()) - 0.5) < 0.03


def test_resized_crop_falls_back_to_the_central_crop():
  """No (area, aspect) draw fits a 2:1 to 3:1 box in a square image at >= 90% area: torchvision
  then takes the widest central box of aspect min(ratio)."""
  y, x, h, w, _ = _sample_rrc(jax.random.key(0), 5, 12, 12, (0.9, 1.0), (2.0, 3.0), True)
  for got, expected in ((h, 6), (w, 12), (y, 3), (x, 0)):
    np.testing.assert_array_equal(got, expected)


@jax.jit
def _rrc_grad(rng, images, weights):
  """d sum(weights * out) / d images."""
  return jax.grad(lambda im: jnp.sum(weights * random_resized_crop_flip(rng, im)))(images)


def test_resized_crop_is_differentiable_and_keyed():
  images = _images(b=6)
  rng = jax.random.key(9)
  grad = _rrc_grad(rng, images, np.random.RandomState(1).randn(*images.shape).astype(np.float32))
  chex.assert_tree_all_finite(grad)
  assert float(jnp.abs(grad).sum()) > 0
  mass = _rrc_grad(rng, images, np.ones(images.shape, np.float32))
  # Each output pixel's bilinear weights sum to one: d sum(out) / d images totals H * W * C.
  np.testing.assert_allclose(mass.sum(axis=(1, 2, 3)), 8 * 8 * 3, rtol=1e-5)
  np.testing.assert_array_equal(_rrc(rng, images), _rrc(rng, images))
  assert not np.allclose(_rrc(jax.random.key(10), images), _rrc(rng, images))


def test_resized_crop_flip_only_mirrors():
  images = _images(b=2)
  full, flips = np.full((2,), 8), np.array([True, False])
  out = jax.jit(resized_crop_flip)(images, np.zeros(2, int), np.zeros(2, int), full, full, flips)
  np.testing.assert_allclose(out[0], images[0, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(out[1], images[1], atol=1e-6)


def test_resized_crop_rejects_bad_arguments():
  with pytest.raises(ValueError, match="B x H x W x C"):
    random_resized_crop_flip(jax.random.key(0), jnp.zeros((8, 8, 3)))
  with pytest.raises(ValueError, match="scale"):
    random_resized_crop_flip(jax.random.key(0), _images(), scale=(0.5, 0.25))
  with pytest.raises(ValueError, match="ratio"):
    random_resized_crop_flip(jax.random.key(0), _images(), ratio=(0.0, 1.0))
