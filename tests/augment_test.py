"""Random crop + flip against a NumPy reference for the same draws, and its gradient."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.augment import crop_flip, random_crop_flip, sample_crop_flip


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
