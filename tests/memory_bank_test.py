"""The on-device ring buffer: write order, quantisation, and (group) sampling, jitted."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.synthesis import memory_bank as mb

SHAPE = (2, 2, 1)


def _batch(start, b):
  """Images whose pixels encode their running number (value / 255), with matching metadata."""
  ids = np.arange(start, start + b)
  images = np.broadcast_to((ids / 255.0)[:, None, None, None], (b, *SHAPE)).astype(np.float32)
  return jnp.asarray(images), jnp.asarray(ids), jnp.asarray(ids % 3), jnp.asarray(ids // 2)


def _add_jit():
  return jax.jit(mb.add, donate_argnums=0)


def test_create_bank():
  bank = mb.create_bank(6, SHAPE)
  assert bank.capacity == 6
  chex.assert_shape(bank.images, (6, *SHAPE))
  assert bank.images.dtype == jnp.uint8
  for field in (bank.labels, bank.source_index, bank.group):
    assert field.dtype == jnp.int32 and field.shape == (6,)
  assert int(bank.size) == 0 and int(bank.cursor) == 0
  with pytest.raises(ValueError, match="at least 1"):
    mb.create_bank(0, SHAPE)


def test_ring_wraps_around_and_overwrites_the_oldest():
  add = _add_jit()
  bank = mb.create_bank(10, SHAPE)
  history = []
  for start in (0, 4, 8, 12):  # 16 images through 10 slots, batches of 4.
    bank = add(bank, *_batch(start, 4))
    history.append((int(bank.size), int(bank.cursor)))
  assert history == [(4, 4), (8, 8), (10, 2), (10, 6)]
  # Batch 3 (images 8..11) filled slots 8, 9 and wrapped 10, 11 into slots 0, 1;
  # batch 4 (12..15) overwrote slots 2..5; slots 6, 7 still hold images 6, 7.
  expected = np.array([10, 11, 12, 13, 14, 15, 6, 7, 8, 9])
  np.testing.assert_array_equal(bank.labels, expected)
  np.testing.assert_array_equal(bank.source_index, expected % 3)
  np.testing.assert_array_equal(bank.group, expected // 2)
  np.testing.assert_array_equal(bank.images[:, 0, 0, 0], expected)


def test_add_validates_its_inputs():
  bank = mb.create_bank(4, SHAPE)
  with pytest.raises(ValueError, match="does not fit"):
    mb.add(bank, *_batch(0, 5))
  images, labels, source, group = _batch(0, 2)
  with pytest.raises(ValueError, match="do not match"):
    mb.add(bank, jnp.zeros((2, 3, 3, 1)), labels, source, group)
  with pytest.raises(ValueError, match="labels has shape"):
    mb.add(bank, images, labels[:1], source, group)


def test_quantisation_matches_nayers_png_round_trip():
  values = jnp.array([-0.3, 0.0, 0.49 / 255, 0.51 / 255, 1.6 / 255, 0.5, 254.7 / 255, 1.0, 1.7])
  # NAYER: (x.clamp(0, 1) * 255).astype('uint8'), i.e. truncation.
  expected = (np.clip(np.asarray(values), 0, 1) * 255).astype(np.uint8)
  np.testing.assert_array_equal(mb.quantize(values), expected)
  np.testing.assert_array_equal(expected, [0, 0, 0, 0, 1, 127, 254, 255, 255])
  # What comes back out of the bank is uint8 / 255 as float32.
  bank = mb.add(mb.create_bank(9, (1, 1, 1)), values.reshape(9, 1, 1, 1), *[jnp.zeros(9, int)] * 3)
  images, *_ = mb.sample(bank, jax.random.key(0), 50)
  assert images.dtype == jnp.float32
  assert set(np.round(np.asarray(images).ravel() * 255).astype(int)) <= set(expected.tolist())


def test_sample_draws_only_filled_slots_uniformly():
  bank = mb.create_bank(10, SHAPE)
  bank = mb.add(bank, *_batch(0, 3))
  sample = jax.jit(mb.sample, static_argnums=2)
  images, labels, source, group = sample(bank, jax.random.key(1), 3000)
  chex.assert_shape(images, (3000, *SHAPE))
  counts = np.bincount(np.asarray(labels), minlength=10)
  assert counts[3:].sum() == 0  # Never the 7 empty slots.
  np.testing.assert_allclose(counts[:3] / 3000, 1 / 3, atol=0.04)
  # Each row's fields come from the same slot.
  np.testing.assert_allclose(np.asarray(images)[:, 0, 0, 0] * 255, labels, atol=1e-4)
  np.testing.assert_array_equal(source, np.asarray(labels) % 3)
  np.testing.assert_array_equal(group, np.asarray(labels) // 2)


def _synthesis_batch(num_groups, k, views, round_id):
  """cend.build_generator_batch's layout: per group, K anchors then K per source."""
  shape = (num_groups, views, k)
  labels = np.broadcast_to(np.arange(k), shape).ravel()
  source = np.broadcast_to(np.arange(views)[:, None], shape).ravel()
  group = np.broadcast_to(np.arange(num_groups)[:, None, None], shape).ravel()
  b = labels.size
  # Pixel = round number, so every group can be traced back to its round.
  images = np.full((b, *SHAPE), round_id / 255.0, np.float32)
  return jnp.asarray(images), jnp.asarray(labels), jnp.asarray(source), jnp.asarray(group)


def test_sample_groups_returns_whole_groups():
  k, views, groups_per_round = 3, 2, 2
  group_size = k * views
  bank = mb.create_bank(5 * group_size, SHAPE)  # 5 group slots, rounds of 2 groups.
  add = _add_jit()
  sample_groups = jax.jit(mb.sample_groups, static_argnums=(2, 3))
  for round_id in range(1, 4):  # 6 groups into 5 slots: round 3's second group wraps to slot 0.
    bank = add(bank, *_synthesis_batch(groups_per_round, k, views, round_id))
  np.testing.assert_array_equal(bank.images[::group_size, 0, 0, 0], [3, 1, 2, 2, 3])
  seen_slots = set()
  for seed in range(20):
    images, labels, source, group = sample_groups(bank, jax.random.key(seed), 4, group_size)
    chex.assert_shape(images, (4 * group_size, *SHAPE))
    rounds = np.round(np.asarray(images)[:, 0, 0, 0] * 255).reshape(4, group_size)
    labels, source, group = (np.asarray(a).reshape(4, group_size) for a in (labels, source, group))
    for g in range(4):
      # One stored group: every (source, class) pair 0..N x 0..K-1 exactly once, one round.
      pairs = sorted(zip(source[g].tolist(), labels[g].tolist()))
      assert pairs == [(s, c) for s in range(views) for c in range(k)]
      assert len(set(rounds[g].tolist())) == 1
      assert len(set(group[g].tolist())) == 1
    # Group ids are bank slots: distinct groups get distinct ids even when their
    # stored ids (0/1 within each round) collide.
    assert len(set(group[:, 0].tolist())) == 4
    seen_slots |= set(group[:, 0].tolist())
  assert seen_slots == set(range(5))


def test_sample_groups_only_from_filled_slots():
  k, views = 2, 2
  group_size = k * views
  bank = mb.create_bank(10 * group_size, SHAPE)
  bank = mb.add(bank, *_synthesis_batch(3, k, views, round_id=7))
  for seed in range(10):
    images, labels, source, group = mb.sample_groups(bank, jax.random.key(seed), 5, group_size)
    slots = np.asarray(group).reshape(5, group_size)[:, 0]
    assert set(slots.tolist()) == {0, 1, 2}  # Only 3 filled: all of them, then repeats.
    np.testing.assert_allclose(np.asarray(images) * 255, 7, atol=1e-4)


def test_sample_groups_needs_aligned_capacity():
  bank = mb.create_bank(10, SHAPE)
  with pytest.raises(ValueError, match="not a multiple of the CNCL group size 4"):
    mb.sample_groups(bank, jax.random.key(0), 2, 4)


def test_jitted_round_trip_in_one_function():
  """add then sample_groups inside a single jit, as the training step does."""

  @functools.partial(jax.jit, donate_argnums=0)
  def step(bank, rng):
    bank = mb.add(bank, *_synthesis_batch(2, 2, 2, round_id=9))
    return bank, mb.sample_groups(bank, rng, 2, 4)

  bank, (images, labels, source, _) = step(mb.create_bank(16, SHAPE), jax.random.key(0))
  assert int(bank.size) == 8 and int(bank.cursor) == 8
  np.testing.assert_allclose(np.asarray(images) * 255, 9, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(source).reshape(2, 4), [[0, 0, 1, 1]] * 2)
  np.testing.assert_array_equal(np.asarray(labels).reshape(2, 4), [[0, 1, 0, 1]] * 2)
