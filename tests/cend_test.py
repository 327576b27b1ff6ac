"""CEND: the batch layout, the noise sources' distributions, magnitudes and modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.synthesis import cend


@pytest.mark.parametrize("source", cend.NOISE_SOURCES)
def test_sources_are_zero_mean_unit_variance(source):
  x = np.asarray(cend.sample_noise(jax.random.key(0), source, (200_000,)))
  assert abs(x.mean()) < 0.02 and abs(x.std() - 1) < 0.03


def test_sources_have_distinct_distributions():
  draw = lambda s: np.asarray(cend.sample_noise(jax.random.key(1), s, (100_000,)))
  assert np.abs(draw("uniform")).max() <= np.sqrt(3) + 1e-6
  assert set(np.unique(draw("rademacher"))) == {-1.0, 1.0}
  kurt = lambda x: np.mean(x**4)
  assert kurt(draw("uniform")) < 2.0 < kurt(draw("gaussian")) < 3.5 < kurt(draw("laplace"))
  assert draw("exponential").min() >= -1.0


def test_layout_anchors_and_magnitude():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(5, 8)), jnp.float32)
  b = cend.build_generator_batch(jax.random.key(2), table, num_groups=3, num_sources=4, magnitude=0.1)
  assert b.embeddings_BxD.shape == (3 * 5 * 5, 8)
  labels, src, group = map(np.asarray, (b.labels_B, b.source_index_B, b.group_B))
  for chunk in labels.reshape(-1, 5):
    np.testing.assert_array_equal(chunk, np.arange(5))       # every K rows: each class once
  np.testing.assert_array_equal(src[:25], np.repeat(np.arange(5), 5))
  np.testing.assert_array_equal(group, np.repeat(np.arange(3), 25))
  emb = np.asarray(b.embeddings_BxD)
  np.testing.assert_array_equal(emb[src == 0], np.tile(np.asarray(table), (3, 1)))
  offsets = emb[src > 0] - np.asarray(table)[labels[src > 0]]
  assert abs(offsets.std() - 0.1) < 0.02
  big = cend.build_generator_batch(jax.random.key(2), table, 3, 4, magnitude=0.4)
  np.testing.assert_allclose(np.asarray(big.embeddings_BxD)[src > 0] - np.asarray(table)[labels[src > 0]],
                             4 * offsets, rtol=1e-4, atol=1e-5)


def test_determinism_and_modes():
  table = jnp.ones((3, 4))
  a = cend.build_generator_batch(jax.random.key(0), table, 2, 2)
  b = cend.build_generator_batch(jax.random.key(0), table, 2, 2)
  np.testing.assert_array_equal(a.embeddings_BxD, b.embeddings_BxD)
  clean = cend.build_generator_batch(jax.random.key(0), table, 2, 2, mode="clean")
  np.testing.assert_array_equal(clean.embeddings_BxD, np.ones((18, 4)))
  gauss = cend.build_generator_batch(jax.random.key(0), table, 2, 2, mode="gaussian")
  assert abs(float(gauss.embeddings_BxD.mean())) < 0.5 and gauss.labels_B.shape == (18,)
  with pytest.raises(ValueError, match="num_sources=7"):
    cend.diffuse(jax.random.key(0), table, num_sources=7)
  with pytest.raises(ValueError, match="Unknown CEND mode"):
    cend.build_generator_batch(jax.random.key(0), table, 1, 1, mode="nope")


def test_relative_magnitude_scales_the_noise_by_each_dimensions_spread():
  rng = np.random.default_rng(0)
  columns = np.array([0.01, 0.1, 1.0, 10.0, 0.0, 3.0], np.float32)  # a dead dimension too
  table = (rng.normal(size=(4, 6)) * columns).astype(np.float32)
  spread = np.asarray(cend.spread(table))
  np.testing.assert_allclose(spread, table.std(axis=0), rtol=1e-6, atol=1e-8)
  assert cend.noise_scale(table, "absolute") is None
  np.testing.assert_array_equal(cend.noise_scale(table, "relative"), spread)
  with pytest.raises(ValueError, match="Unknown magnitude scale 'log'"):
    cend.noise_scale(table, "log")
  # One jitted function, the magnitude traced (as a swept hparam is), both scales.
  build = jax.jit(lambda m, scale: cend.build_generator_batch(jax.random.key(3), table, 400, 4, m,
                                                              scale_D=scale))
  absolute, relative = build(0.1, jnp.ones(6)), build(0.1, jnp.asarray(spread))  # one compile
  src = np.asarray(absolute.source_index_B)
  clean = np.asarray(absolute.embeddings_BxD)[src == 0][:4]
  offset = lambda b: np.asarray(b.embeddings_BxD)[src > 0].reshape(-1, 4, 6) - clean
  # The same draw (same key): relative = absolute offsets x spread, per dimension (up to the
  # float32 rounding of table + offset, a few 1e-6 for the column of 10s).
  np.testing.assert_allclose(offset(relative), offset(absolute) * spread, rtol=1e-4, atol=2e-5)
  # Against NumPy: over 400 groups x 4 sources, each dimension's offsets have std M * spread.
  np.testing.assert_allclose(offset(relative).std(axis=(0, 1)), 0.1 * spread, rtol=0.05)
  assert not offset(relative)[..., 4].any()             # no spread, no noise
  np.testing.assert_allclose(offset(absolute).std(axis=(0, 1)), 0.1, rtol=0.05)


def test_per_source_magnitudes_reach_each_source():
  table = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  # One compiled batch builder, the magnitudes traced (as in a round); the same key each time.
  build = jax.jit(lambda m: cend.build_generator_batch(jax.random.key(4), table, 2, 3, m))
  unit, per_source = build((1.0, 1.0, 1.0)), build((0.0, 0.2, 0.05))
  src = np.asarray(unit.source_index_B)
  offset = lambda b: (np.asarray(b.embeddings_BxD)[src > 0].reshape(2, 3, 3, 5)
                      - np.asarray(table))                               # G x N x K x D
  assert not offset(per_source)[:, 0].any()              # magnitude 0: the clean row
  np.testing.assert_allclose(offset(per_source),
                             np.array([0.0, 0.2, 0.05])[:, None, None] * offset(unit),
                             rtol=1e-5, atol=1e-6)
  assert np.abs(offset(per_source)[:, 1:]).min() > 0
  with pytest.raises(ValueError, match="2 magnitudes given for num_sources=3"):
    cend.diffuse(jax.random.key(0), table, 3, (0.1, 0.2))
