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


def _np_cncl(f, y, src, tau, form, group=None):
  """Eq. 4 as its docstring says; with `group`, positives only from the anchor's own group (the
  other groups' same-class views then count as neither positives nor negatives)."""
  f = f / np.linalg.norm(f, axis=1, keepdims=True)
  vals = []
  for a in range(len(f)):
    if src[a] != 0:
      continue
    pos = [j for j in range(len(f)) if y[j] == y[a] and src[j] >= 1
           and (group is None or group[j] == group[a])]
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
  # Some rows agree: these independent draws alone had none, which left the masked term 0
  # whatever its KL.
  s[:6] = t[:6] + r.normal(size=(6, 10))
  kl = _np_kl(t, s, 20.0)
  np.testing.assert_allclose(losses.kl_divergence(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), 20.0),
                             400 * kl.mean(), rtol=1e-4)
  agree = t.argmax(1) == s.argmax(1)
  assert 0 < agree.sum() < len(agree)
  expected = -np.mean(np.where(agree, _np_kl(t, s), 0.0))
  np.testing.assert_allclose(losses.adversarial_loss(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)),
                             expected, rtol=1e-5)
  # Identical logits: KL 0, and the adversarial term is 0 (agreement but no divergence).
  assert abs(float(losses.kl_divergence(jnp.asarray(t), jnp.asarray(t), 1.0))) < 1e-6
  assert abs(float(losses.adversarial_loss(jnp.asarray(t), jnp.asarray(t)))) < 1e-6


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


def test_cncl_same_group_positives_against_float64_loop():
  """Positives from the anchor's own group only: 2 groups of K=2 anchors and their N=1 views, so
  each anchor loses the other group's same-class view from its positives (and its denominator),
  while every other class's image, in either group, stays a negative."""
  r = np.random.default_rng(4)
  k, n, groups = 2, 1, 2
  y = np.tile(np.arange(k), (n + 1) * groups)                 # 0 1 0 1 | 0 1 0 1
  src = np.tile(np.repeat(np.arange(n + 1), k), groups)       # 0 0 1 1 | 0 0 1 1
  group = np.repeat(np.arange(groups), k * (n + 1))           # 0 0 0 0 | 1 1 1 1
  f = r.normal(size=(len(y), 3))
  args = lambda: (jnp.asarray(f, jnp.float32), jnp.asarray(y), jnp.asarray(src), 0.5)
  for form in ("infonce", "supcon"):
    own = losses.cncl_loss(*args(), group_B=jnp.asarray(group), same_group_positives=True,
                           form=form)
    every = losses.cncl_loss(*args(), group_B=jnp.asarray(group), same_group_positives=False,
                             form=form)
    np.testing.assert_allclose(own, _np_cncl(f, y, src, 0.5, form, group), rtol=1e-5,
                               err_msg=form)
    np.testing.assert_allclose(every, _np_cncl(f, y, src, 0.5, form), rtol=1e-5, err_msg=form)
    assert abs(float(own) - float(every)) > 1e-2, f"{form}: the restriction changes the value"


def test_a_kd_step_passes_student_cncl_same_group_to_cncl():
  """`student.cncl_same_group` reaches the KD loss: on a batch of two groups, kd/cncl with the
  flag on is CNCL with own-group positives on the student's features, and differs from off."""
  import dataclasses
  import golden_pin
  from caedfkd_jax.io import bundle as bundle_lib
  from caedfkd_jax.methods import bank_kd
  from caedfkd_jax.synthesis import cend
  teacher, table = golden_pin.tiny_teacher_and_table()
  setup = golden_pin.tiny_setup(teacher, table)
  cfg = setup.config.student
  assert cfg.cncl_weight > 0 and cfg.sampler == "groups" and not cfg.cncl_same_group
  batch = cend.build_generator_batch(jax.random.key(0), table.vectors, 2, 1, mode="clean")
  assert set(np.asarray(batch.group_B)) == {0, 1}
  r = np.random.default_rng(5)
  x = jnp.asarray(r.normal(size=(len(batch.labels_B), 32, 32, 3)), jnp.float32)
  t_logits = jnp.asarray(r.normal(size=(len(batch.labels_B), 4)) * 3, jnp.float32)
  student = bundle_lib.init_variables(bundle_lib.ModelSpec(setup.config.student_arch, 4, 32), 0)

  def kd_metrics(same_group: bool) -> dict:
    config = setup.config.copy_and_resolve_references()
    config.student.cncl_same_group = same_group
    flagged = dataclasses.replace(setup, config=config)
    loss = jax.jit(lambda s: bank_kd.student_loss(
        s["params"], s["batch_stats"], flagged, x, t_logits, batch.labels_B,
        batch.source_index_B, batch.group_B)[1][1])
    return jax.device_get(loss(student))

  @jax.jit
  def cncl_on_features(s):
    (_, aux), _ = setup.student.apply(s, x, train=True, mutable=["batch_stats"])
    return [losses.cncl_loss(aux["features"], batch.labels_B, batch.source_index_B,
                             cfg.cncl_temperature, group_B=batch.group_B,
                             same_group_positives=same, form=cfg.cncl_form)
            for same in (False, True)]

  off, on = kd_metrics(False), kd_metrics(True)
  expected_off, expected_on = jax.device_get(cncl_on_features(student))
  np.testing.assert_allclose(on["kd/cncl"], expected_on, rtol=1e-5)
  np.testing.assert_allclose(off["kd/cncl"], expected_off, rtol=1e-5)
  assert abs(float(on["kd/cncl"]) - float(off["kd/cncl"])) > 1e-3
  np.testing.assert_allclose(on["kd/kl"], off["kd/kl"], rtol=1e-6)   # CNCL's alone.


def test_config_takes_the_bn_reductions_and_names_a_bad_one():
  from caedfkd_jax.config import checks, defaults
  config = defaults.get_config()
  for reduce in ("sum", "mean"):
    config.loss.bn_reduce = reduce
    checks.validate_config(config, 1, 10)
  config.loss.bn_reduce = "max"
  with pytest.raises(ValueError, match="config.loss.bn_reduce='max'"):
    checks.validate_config(config, 1, 10)
  # Every method that reads it, DiffDFKD too; CPSC, which sums always, does not read it.
  for method in ("cmi", "diffdfkd"):
    config = defaults.get_config(method)
    config.student.sampler = "uniform"
    config.loss.bn_reduce = "max"
    with pytest.raises(ValueError, match="config.loss.bn_reduce='max'"):
      checks.validate_config(config, 1, 10)
