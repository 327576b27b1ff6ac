"""CPSC-DFKD's loss terms against PyTorch restatements of the authors' code (CPSC_DFKD.py, metric/loss.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.methods import cpsc_losses
from caedfkd_jax.synthesis import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, C, D = 6, 5, 4
LABELS = np.array([0, 1, 0, 2, 1, 0])


def _t(a, grad=False):
  return torch.tensor(np.asarray(a, np.float64), requires_grad=grad)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  t_logit, s_logit = 2 * rng.standard_normal((B, C)), 2 * rng.standard_normal((B, C))
  t_fea, s_fea = rng.standard_normal((B, D)), rng.standard_normal((B, D))
  t_fea /= np.linalg.norm(t_fea, axis=1, keepdims=True)  # Their models L2-normalise features.
  s_fea /= np.linalg.norm(s_fea, axis=1, keepdims=True)
  return [np.float32(a) for a in (t_logit, s_logit, t_fea, s_fea)]


# ----------------------- the authors' code, restated ------------------------ #

def _kdloss(y, teacher_scores):  # metric/loss.py
  return F.kl_div(F.log_softmax(y, dim=1), F.softmax(teacher_scores, dim=1),
                  reduction="sum") / y.shape[0]


def _supcon(features, labels, temperature=0.07, base_temperature=0.07):
  """metric/loss.py SupConLoss.forward, contrast_mode 'all', labels given."""
  batch_size, contrast_count = features.shape[0], features.shape[1]
  labels = labels.contiguous().view(-1, 1)
  mask = torch.eq(labels, labels.T).double()
  contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
  anchor_feature, anchor_count = contrast_feature, contrast_count
  anchor_dot_contrast = torch.div(torch.matmul(anchor_feature, contrast_feature.T), temperature)
  logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
  logits = anchor_dot_contrast - logits_max.detach()
  mask = mask.repeat(anchor_count, contrast_count)
  logits_mask = torch.scatter(torch.ones_like(mask), 1,
                              torch.arange(batch_size * anchor_count).view(-1, 1), 0)
  mask = mask * logits_mask
  exp_logits = torch.exp(logits) * logits_mask
  log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  loss = -(temperature / base_temperature) * mean_log_prob_pos
  return loss.view(anchor_count, batch_size).mean()


def _torch_generator_loss(t_logit, s_logit, t_fea, s_fea, labels, bn, a, b, g, e, cifar10):
  """CPSC_DFKD.py lines 66-88."""
  loss_g = -_kdloss(s_logit, t_logit)
  if cifar10:
    loss_g = loss_g + a * -torch.log(F.mse_loss(s_logit, t_logit.detach()))
  else:
    loss_g = loss_g + a * -F.mse_loss(s_logit, t_logit.detach())
  loss_g = loss_g + b * bn
  features = torch.cat([s_fea.unsqueeze(1), t_fea.unsqueeze(1)], dim=1)
  loss_g = loss_g + g * _supcon(features, labels)
  return loss_g + e * F.cross_entropy(F.softmax(t_logit, dim=1), labels)


def _torch_student_loss(t_logit, s_logit, labels, a, e, cifar10):
  """CPSC_DFKD.py lines 107-119."""
  loss_s = _kdloss(s_logit, t_logit.detach())
  if cifar10:
    loss_s = loss_s + a * torch.log(torch.norm(t_logit.detach() - s_logit, 2))
  else:
    loss_s = loss_s + a * F.mse_loss(s_logit, t_logit.detach())
  return loss_s + e * F.cross_entropy(F.softmax(s_logit, dim=1), labels)


# ---------------------------------- terms ---------------------------------- #

def test_their_kdloss_is_kl_teacher_to_student_at_temperature_one():
  t_logit, s_logit, _, _ = _inputs()
  ref = _kdloss(_t(s_logit), _t(t_logit)).item()
  np.testing.assert_allclose(losses.kl_divergence(t_logit, s_logit, 1.0), ref, rtol=1e-5)
  assert abs(float(losses.kl_divergence(s_logit, t_logit, 1.0)) - ref) > 1e-3  # Not KL(S||T).


@pytest.mark.parametrize("form", cpsc_losses.IKD_FORMS)
def test_ikd_forms_and_their_gradients_match_the_code(form):
  t_logit, s_logit, _, _ = _inputs()
  tt, ts = _t(t_logit, grad=True), _t(s_logit, grad=True)
  ref = {"mse": lambda: F.mse_loss(ts, tt.detach()),
         "log_mse": lambda: torch.log(F.mse_loss(ts, tt.detach())),
         "log_l2": lambda: torch.log(torch.norm(tt.detach() - ts, 2))}[form]()
  ref.backward()
  value, (g_t, g_s) = jax.value_and_grad(
      lambda t, s: cpsc_losses.ikd_discrepancy(s, t, form), argnums=(0, 1))(t_logit, s_logit)
  np.testing.assert_allclose(value, ref.item(), rtol=1e-5)
  np.testing.assert_allclose(g_s, ts.grad.numpy(), rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(g_t, 0.0)  # The code detaches the teacher here.


def test_log_l2_is_half_log_mse_plus_a_constant():
  t_logit, s_logit, _, _ = _inputs()
  log_l2 = cpsc_losses.ikd_discrepancy(s_logit, t_logit, "log_l2")
  log_mse = cpsc_losses.ikd_discrepancy(s_logit, t_logit, "log_mse")
  np.testing.assert_allclose(log_l2, 0.5 * log_mse + 0.5 * np.log(B * C), rtol=1e-5)
  np.testing.assert_allclose(cpsc_losses.logit_mse(s_logit, t_logit),
                             np.mean((np.float64(s_logit) - t_logit) ** 2), rtol=1e-6)


def test_ikd_teacher_gradient_can_be_kept_and_bad_form_is_named():
  t_logit, s_logit, _, _ = _inputs()
  g_t = jax.grad(lambda t: cpsc_losses.ikd_discrepancy(s_logit, t, "mse", stop_teacher_gradient=False))(
      t_logit)
  np.testing.assert_allclose(g_t, 2 * (t_logit - s_logit) / (B * C), rtol=1e-5)
  with pytest.raises(ValueError, match="log_mse"):
    cpsc_losses.ikd_discrepancy(s_logit, t_logit, "neg_log")


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_supcon_matches_their_supconloss_value_and_gradient(scale):
  _, _, t_fea, s_fea = _inputs(seed=1)
  feats = np.float32(scale * np.stack([s_fea, t_fea], axis=1))  # 3.0: un-normalised, like the adapter.
  tf = _t(feats, grad=True)
  ref = _supcon(tf, torch.tensor(LABELS))
  ref.backward()
  value, grad = jax.value_and_grad(cpsc_losses.supcon_loss)(feats, jnp.asarray(LABELS))
  np.testing.assert_allclose(value, ref.item(), rtol=1e-4)
  np.testing.assert_allclose(grad, tf.grad.numpy(), rtol=1e-3, atol=1e-5)


def test_supcon_temperature_ratio_normalize_flag_and_lonely_anchor():
  _, _, t_fea, s_fea = _inputs(seed=2)
  feats = np.stack([s_fea, t_fea], axis=1)
  y = jnp.asarray(LABELS)
  ref = _supcon(_t(feats), torch.tensor(LABELS), temperature=0.5, base_temperature=0.07).item()
  np.testing.assert_allclose(cpsc_losses.supcon_loss(feats, y, 0.5, 0.07), ref, rtol=1e-4)
  np.testing.assert_allclose(cpsc_losses.supcon_loss(7.0 * feats, y, normalize=True),
                             cpsc_losses.supcon_loss(feats, y), rtol=1e-5)
  one_view = cpsc_losses.supcon_loss(feats[:, :1], jnp.arange(B))  # No positives anywhere: 0, not NaN.
  np.testing.assert_allclose(one_view, 0.0)


def test_cross_entropy_quirk_matches_torch_on_softmax_and_differs_from_proper_ce():
  t_logit, _, _, _ = _inputs()
  y = jnp.asarray(LABELS)
  quirk = cpsc_losses.cross_entropy_on_probabilities(t_logit, y)
  ref = torch.nn.CrossEntropyLoss()(F.softmax(_t(t_logit), dim=1), torch.tensor(LABELS)).item()
  np.testing.assert_allclose(quirk, ref, rtol=1e-5)
  proper = losses.cross_entropy(t_logit, y)
  np.testing.assert_allclose(proper, F.cross_entropy(_t(t_logit), torch.tensor(LABELS)).item(),
                             rtol=1e-5)
  np.testing.assert_allclose(cpsc_losses.class_cross_entropy(t_logit, y, "probabilities"), quirk)
  np.testing.assert_allclose(cpsc_losses.class_cross_entropy(t_logit, y, "logits"), proper)
  # A confident right answer: proper CE ~ 0, the quirk stuck at its floor log(C - 1 + e) - 1.
  confident = 50.0 * np.eye(C, dtype=np.float32)[LABELS]
  assert float(losses.cross_entropy(confident, y)) < 1e-6
  np.testing.assert_allclose(cpsc_losses.cross_entropy_on_probabilities(confident, y),
                             np.log(C - 1 + np.e) - 1, rtol=1e-5)
  with pytest.raises(ValueError, match="probabilities"):
    cpsc_losses.class_cross_entropy(t_logit, y, "softmax")


# ------------------------------- objectives -------------------------------- #

@pytest.mark.parametrize("cifar10", [True, False])
def test_generator_objective_matches_cpsc_dfkd_py(cifar10):
  t_logit, s_logit, t_fea, s_fea = _inputs(seed=3)
  weights = {"alpha": 5.0, "beta": 1.0, "gamma": 0.7, "eta": 0.7}
  bn = np.float32(0.8)
  args = [_t(a, grad=True) for a in (t_logit, s_logit, t_fea, s_fea)]
  ref = _torch_generator_loss(*args, torch.tensor(LABELS), _t(bn), *weights.values(), cifar10)
  ref.backward()

  def loss(t, s, tf, sf):
    return cpsc_losses.cpsc_generator_loss(
        t, s, tf, sf, jnp.asarray(LABELS), bn, **weights,
        ikd_form="log_mse" if cifar10 else "mse", ce_form="probabilities")[0]

  value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(t_logit, s_logit, t_fea, s_fea)
  np.testing.assert_allclose(value, ref.item(), rtol=1e-4)
  for g, a in zip(grads, args):
    np.testing.assert_allclose(g, a.grad.numpy(), rtol=1e-3, atol=1e-5)
  chex.assert_tree_all_finite(grads)


@pytest.mark.parametrize("cifar10", [True, False])
def test_student_objective_matches_cpsc_dfkd_py(cifar10):
  t_logit, s_logit, _, _ = _inputs(seed=4)
  tt, ts = _t(t_logit, grad=True), _t(s_logit, grad=True)
  ref = _torch_student_loss(tt, ts, torch.tensor(LABELS), 5.0, 0.7, cifar10)
  ref.backward()
  value, (g_t, g_s) = jax.value_and_grad(
      lambda t, s: cpsc_losses.cpsc_student_loss(
          t, s, jnp.asarray(LABELS), alpha=5.0, eta=0.7,
          ikd_form="log_l2" if cifar10 else "mse", ce_form="probabilities")[0],
      argnums=(0, 1))(t_logit, s_logit)
  np.testing.assert_allclose(value, ref.item(), rtol=1e-4)
  np.testing.assert_allclose(g_s, ts.grad.numpy(), rtol=1e-3, atol=1e-6)
  np.testing.assert_array_equal(g_t, 0.0)


def test_zero_weights_drop_terms_and_terms_add_up():
  t_logit, s_logit, t_fea, s_fea = _inputs()
  y = jnp.asarray(LABELS)
  total, terms = cpsc_losses.cpsc_generator_loss(t_logit, s_logit, t_fea, s_fea, y, jnp.float32(2.0),
                                            alpha=0.0, beta=0.5, gamma=0.0, eta=1.0)
  assert set(terms) == {"kl", "bn", "ce"}
  np.testing.assert_allclose(total, sum(terms.values()), rtol=1e-6)
  np.testing.assert_allclose(terms["bn"], 1.0)
  np.testing.assert_allclose(terms["ce"], losses.cross_entropy(t_logit, y), rtol=1e-6)
  _, terms = cpsc_losses.cpsc_student_loss(t_logit, s_logit, y, alpha=1.0, eta=0.0)
  assert set(terms) == {"kl", "ikd"}
