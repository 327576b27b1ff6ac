"""Table I's image-level baselines on the NAYER base (issue 28): Mixup and SimCLR-style
image-level contrastive learning in the KD step, as ladder arms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.config import checks, ladder
from caedfkd_jax.synthesis import augment, losses
from tiny_run import one_cpu_steps, tiny_config


def _nt_xent_float64(z1, z2, tau):
  """SimCLR's NT-Xent restated in float64: row i's positive is its other view."""
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z)
  sim = z @ z.T / tau
  total = 0.0
  for i in range(n):
    j = (i + n // 2) % n
    others = [sim[i, k] for k in range(n) if k != i]
    total += -(sim[i, j] - np.log(np.sum(np.exp(others))))
  return total / n


def test_image_contrastive_loss_is_nt_xent():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  for tau in (0.07, 0.5):
    got = losses.image_contrastive_loss(jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32),
                                        tau)
    np.testing.assert_allclose(float(got), _nt_xent_float64(z1, z2, tau), rtol=1e-5)
  # Identical views score lower than unrelated ones.
  same = losses.image_contrastive_loss(jnp.asarray(z1), jnp.asarray(z1), 0.5)
  assert float(same) < float(losses.image_contrastive_loss(jnp.asarray(z1), jnp.asarray(z2), 0.5))
  grads = jax.grad(lambda a: losses.image_contrastive_loss(a, jnp.asarray(z2), 0.5))(
      jnp.asarray(z1, jnp.float32))
  assert np.isfinite(np.asarray(grads)).all()


def test_mixup_is_one_convex_combination_with_a_permutation():
  x = jnp.arange(6, dtype=jnp.float32)[:, None, None, None] * jnp.ones((6, 2, 2, 3))
  mixed = np.asarray(augment.mixup(jax.random.key(0), x, 1.0))
  values = mixed[:, 0, 0, 0]
  assert np.allclose(mixed, values[:, None, None, None])          # Per image, one value.
  np.testing.assert_allclose(values.mean(), 2.5, rtol=1e-6)        # A permutation keeps the mean.
  assert values.min() >= 0 and values.max() <= 5
  # Beta(a, a) with a tiny a puts lam at 0 or 1: each mixed image is one of the originals.
  extreme = np.asarray(augment.mixup(jax.random.key(1), x, 0.01))[:, 0, 0, 0]
  np.testing.assert_allclose(np.sort(extreme), np.arange(6), atol=1e-3)


def _kd_call(teacher_dir, table_path, arm: str):
  config = tiny_config(teacher_dir, table_path)
  ladder.apply_arm(config, arm)
  _, fns, teacher_vars, state = one_cpu_steps(config, teacher_dir, table_path)
  state, _, _ = fns["warmup_round"](state, teacher_vars)        # A bank to draw from.
  state, metrics, _ = fns["kd"](state, teacher_vars)
  return jax.device_get(metrics)


def test_the_arms_run_a_kd_call_with_their_terms(teacher_dir, table_path):
  base = _kd_call(teacher_dir, table_path, "base")
  mixup = _kd_call(teacher_dir, table_path, "mixup")
  contrastive = _kd_call(teacher_dir, table_path, "image_contrastive")
  assert "kd/image_contrastive" not in mixup and "kd/cncl" not in mixup
  # Same state, same draws: only the mixing differs, so the KL does.
  assert not np.allclose(base["kd/kl"], mixup["kd/kl"])
  assert np.isfinite(contrastive["kd/image_contrastive"]).all()
  assert (np.asarray(contrastive["kd/image_contrastive"]) > 0).all()
  for metrics in (mixup, contrastive):
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(metrics))


def test_the_baselines_are_refused_beside_cncl(teacher_dir, table_path):
  config = tiny_config(teacher_dir, table_path)     # cae_dfkd: CNCL on.
  config.student.mixup_alpha = 1.0
  with pytest.raises(ValueError, match="Table I's image-level baselines on the NAYER base"):
    checks.validate_config(config, 1, 4)
  config.student.mixup_alpha = -1.0
  config.student.cncl_weight = 0.0
  with pytest.raises(ValueError, match="mixup_alpha=-1.0"):
    checks.validate_config(config, 1, 4)
