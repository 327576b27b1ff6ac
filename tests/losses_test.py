"""Each loss against an independent float64 loop, plus cases whose answer is known."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.synthesis import losses


def _softmax(z):
  z = z - z.max()
  e = np.exp(z)
  return e / e.sum()


def _np_kl(t, s, temp=1.0):
  out = []
  for ti, si in zip(t, s):
    p, q = _softmax(ti / temp), _softmax(si / temp)
    out.append(sum(p[c] * (np.log(p[c]) - np.log(q[c])) for c in range(len(p))))
  return np.array(out)


def _np_cncl(f, y, src, tau, form):
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  vals = []
  for a in range(len(f)):
    if src[a] != 0:
      continue
    pos = [j for j in range(len(f)) if y[j] == y[a] and src[j] >= 1]
    neg = [j for j in range(len(f)) if y[j] != y[a]]
    if not pos:
      continue
    s = lambda j: np.exp(f[a] @ f[j] / tau)
    denom = sum(s(j) for j in pos) + sum(s(j) for j in neg)
    if form == "infonce":
      vals.append(-np.log(sum(s(j) for j in pos) / denom))
    else:
      vals.append(np.mean([-np.log(s(j) / denom) for j in pos]))
  return np.mean(vals)


def test_cross_entropy_hand_computed():
  logits = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  expected = (np.log(1 + np.exp(-2.0)) + np.log(2.0)) / 2
  np.testing.assert_allclose(losses.cross_entropy(logits, jnp.array([0, 1])), expected, rtol=1e-6)


def test_kl_and_adversarial_against_float64_loops():
  r = np.random.default_rng(0)
  t, s = r.normal(size=(16, 10)) * 3, r.normal(size=(16, 10)) * 3
  kl = _np_kl(t, s, 20.0)
  np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), 20.0),
                             400 * kl.mean(), rtol=1e-4)
  agree = t.argmax(1) == s.argmax(1)
  expected = -np.mean(np.where(agree, _np_kl(t, s), 0.0))
  np.testing.assert_allclose(losses.adversarial_loss(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)),
                             expected, rtol=1e-5)
  # Identical logits: KL 0, and the adversarial term is 0 (agreement but no divergence).
  assert abs(float(losses.kl_divergence(jnp.asarray(t), jnp.asarray(t), 1.0))) < 1e-6


def test_bn_statistics_loss_is_sum_of_plain_l2_norms():
  batch = {"a": {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([1.0, 1.0])},
           "b": {"mean": jnp.array([0.0]), "var": jnp.array([4.0])}}
  running = {"a": {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([4.0, 5.0])},
             "b": {"mean": jnp.array([3.0]), "var": jnp.array([4.0])}}
  expected = 2.0 + 5.0 + 3.0 + 0.0   # |(0,2)|, |(3,4)|, |3|, |0|
  np.testing.assert_allclose(losses.bn_statistics_loss(batch, running), expected, rtol=1e-6)
  # Averaged over the 2 BN layers instead: the same weight then fits a teacher of any depth.
  np.testing.assert_allclose(losses.bn_statistics_loss(batch, running, "mean"), expected / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="sum or mean"):
    losses.bn_statistics_loss(batch, running, "max")
  blended = losses.blend_bn_statistics(batch, running, 0.9)
  np.testing.assert_allclose(blended["a"]["mean"], [1.0, 0.2], rtol=1e-6)


class CnclTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_float64_loop(self):
    r = np.random.default_rng(1)
    k, n = 3, 2
    y = np.tile(np.arange(k), (n + 1) * 2)
    src = np.tile(np.repeat(np.arange(n + 1), k), 2)
    f = r.normal(size=(len(y), 8))
    for form in ("infonce", "supcon"):
      fn = self.variant(lambda f, y, s: losses.cncl_loss(f, y, s, 0.1, form=form))
      got = fn(jnp.asarray(f, jnp.float32), jnp.asarray(y), jnp.asarray(src))
      np.testing.assert_allclose(got, _np_cncl(f, y, src, 0.1, form), rtol=1e-4)


def test_separated_classes_give_lower_loss_than_shuffled():
  r = np.random.default_rng(2)
  k, n = 4, 4
  y = np.tile(np.arange(k), n + 1)
  src = np.repeat(np.arange(n + 1), k)
  centres = r.normal(size=(k, 16)) * 5
  f = jnp.asarray(centres[y] + r.normal(size=(len(y), 16)), jnp.float32)
  separated = losses.cncl_loss(f, jnp.asarray(y), jnp.asarray(src))
  shuffled = losses.cncl_loss(f, jnp.asarray(r.permutation(y)), jnp.asarray(src))
  assert separated < shuffled
  losses_by_sep = [float(losses.cncl_loss(jnp.asarray(s * centres[y] / 5 + r.normal(size=(len(y), 16)), jnp.float32),
                                          jnp.asarray(y), jnp.asarray(src))) for s in (0.0, 2.0, 8.0)]
  assert losses_by_sep[0] > losses_by_sep[1] > losses_by_sep[2]


def test_cncl_gradient_is_finite_and_matches_finite_differences():
  r = np.random.default_rng(3)
  y = jnp.asarray(np.tile(np.arange(2), 3))
  src = jnp.asarray(np.repeat(np.arange(3), 2))
  f = jnp.asarray(r.normal(size=(6, 4)), jnp.float32)
  g = jax.grad(losses.cncl_loss)(f, y, src, 0.5)
  chex.assert_tree_all_finite(g)
  eps = 1e-3
  for i, j in ((0, 0), (3, 2), (5, 1)):
    d = jnp.zeros_like(f).at[i, j].set(eps)
    fd = (losses.cncl_loss(f + d, y, src, 0.5) - losses.cncl_loss(f - d, y, src, 0.5)) / (2 * eps)
    np.testing.assert_allclose(g[i, j], fd, rtol=2e-2, atol=1e-4)
  # Zero features and anchors without positives: finite, and 0 when nothing is valid.
  chex.assert_tree_all_finite(jax.grad(losses.cncl_loss)(jnp.zeros((6, 4)), y, src))
  assert float(losses.cncl_loss(f, y, jnp.zeros(6, jnp.int32))) == 0.0


def test_config_takes_the_bn_reductions_and_names_a_bad_one():
  from caedfkd_jax.config import checks, defaults
  config = defaults.get_config()
  for reduce in ("sum", "mean"):
    config.loss.bn_reduce = reduce
    checks.validate_config(config, 1, 10)
  config.loss.bn_reduce = "max"
  with pytest.raises(ValueError, match="config.loss.bn_reduce='max'"):
    checks.validate_config(config, 1, 10)
