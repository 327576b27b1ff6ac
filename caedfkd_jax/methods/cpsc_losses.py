"""CPSC-DFKD's own losses (METHOD.md b.5), as the authors' code computes them.

The authors' code: github.com/RoryShao/CPSC-DFKD, CPSC_DFKD.py and metric/loss.py.
Their `kdloss(s, t)` is KL(softmax(t) || softmax(s)) with batchmean at temperature 1,
i.e. `losses.kl_divergence(t, s, 1.0)`; their BN term is
`losses.bn_statistics_loss(reduce="sum")`. All return float32 scalars.
"""

import jax
import jax.numpy as jnp
from caedfkd_jax.synthesis.losses import cross_entropy, kl_divergence


def logit_mse(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Mean squared logit difference over batch and classes (PyTorch's F.mse_loss)."""
  d = student_logits.astype(jnp.float32) - teacher_logits.astype(jnp.float32)
  return jnp.mean(jnp.square(d))


IKD_FORMS = ("mse", "log_mse", "log_l2")


def ikd_discrepancy(student_logits: jax.Array, teacher_logits: jax.Array, form: str = "mse",
                    stop_teacher_gradient: bool = True, eps: float = 0.0) -> jax.Array:
  """CPSC's logit-discrepancy (IKD) term d: the generator adds -alpha * d, the student +alpha * d.

  Forms, as the authors' code uses them:
  - "mse": mean squared logit difference; generator and student on CIFAR-100
    and Tiny-ImageNet (METHOD.md's alpha * MSE term).
  - "log_mse": log(MSE); the generator on CIFAR-10 (its -log MSE).
  - "log_l2": log ||T - S||_2 over the whole B x C matrix, the student on
    CIFAR-10. It equals 0.5 * log MSE + const, so it pulls half as hard as
    "log_mse" would.
  The code detaches the teacher logits in this term (the KL term keeps them
  attached), hence `stop_teacher_gradient`. `eps` (0 in the code) is added
  inside the log, to keep it finite where S == T exactly.
  """
  if form not in IKD_FORMS:
    raise ValueError(f"Unknown IKD form {form!r}; choose from {IKD_FORMS}.")
  if stop_teacher_gradient:
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
  mse = logit_mse(student_logits, teacher_logits)
  if form == "mse":
    return mse
  if form == "log_mse":
    return jnp.log(mse + eps)
  # log ||d||_2 = 0.5 * log(sum d^2): no sqrt, whose gradient is NaN at 0.
  return 0.5 * jnp.log(mse * student_logits.size + eps)


def supcon_loss(features_BxVxD: jax.Array, labels_B: jax.Array, temperature: float = 0.07,
                base_temperature: float = 0.07, normalize: bool = False) -> jax.Array:
  """Khosla et al.'s supervised contrastive loss, contrast_mode "all", as CPSC's SupConLoss.

  Every one of the B * V rows is an anchor; positives are the other rows of its
  class (its other views included), the denominator every row but itself.
  Loss = mean over anchors of -(tau / base_tau) * mean_pos(s_p/tau - log sum_{j != a} exp(s_j/tau)).
  CPSC stacks [student feature, teacher feature] as V = 2 views with the
  generator's labels. Their SupConLoss does not normalise: their models return
  L2-normalised features (the WRN adapter's output is not renormalised), so
  pass normalised features or set `normalize`. An anchor without positives
  (only possible with V = 1) counts 0 here; the code gives NaN.
  """
  b, v, d = features_BxVxD.shape
  f = features_BxVxD.astype(jnp.float32)
  if normalize:
    f = f * jax.lax.rsqrt(jnp.sum(f * f, -1, keepdims=True) + 1e-24)
  f_NxD = f.transpose(1, 0, 2).reshape(v * b, d)  # View-major rows, like torch.cat(unbind(f, 1)).
  labels_N = jnp.tile(labels_B, v)
  logits_NxN = f_NxD @ f_NxD.T / temperature
  not_self = ~jnp.eye(v * b, dtype=bool)
  positive = (labels_N[:, None] == labels_N[None, :]) & not_self
  log_denom_N = jax.nn.logsumexp(jnp.where(not_self, logits_NxN, -jnp.inf), axis=-1)
  log_prob = logits_NxN - log_denom_N[:, None]
  n_pos = positive.sum(-1)
  mean_log_prob_pos = jnp.sum(jnp.where(positive, log_prob, 0.0), -1) / jnp.maximum(n_pos, 1)
  return -(temperature / base_temperature) * jnp.mean(mean_log_prob_pos)


CE_FORMS = ("logits", "probabilities")


def cross_entropy_on_probabilities(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """CPSC's code: F.cross_entropy(F.softmax(logits), y), i.e. CE with softmax applied twice.

  The probabilities go through log_softmax again, so the loss is
  log(sum_j exp(p_j)) - p_y, confined to [log(C - 1 + e) - 1, log(C - 1 + e)]:
  it never reaches 0, and its gradient is weak next to the proper CE's, though
  it still raises p_y. The paper's CE term is the proper one on logits
  (`cross_entropy`).
  """
  probs = jax.nn.softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return cross_entropy(probs, labels_B)


def class_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array,
                        form: str = "logits") -> jax.Array:
  """The CE to the generator's labels: "logits" (paper) or "probabilities" (the code's quirk)."""
  if form == "logits":
    return cross_entropy(logits_BxC, labels_B)
  if form == "probabilities":
    return cross_entropy_on_probabilities(logits_BxC, labels_B)
  raise ValueError(f"Unknown CE form {form!r}; choose from {CE_FORMS}.")


def cpsc_generator_loss(teacher_logits: jax.Array, student_logits: jax.Array,
                        teacher_features: jax.Array, student_features: jax.Array,
                        labels_B: jax.Array, bn_loss: jax.Array, *, alpha: float, beta: float,
                        gamma: float, eta: float, ikd_form: str = "mse",
                        ce_form: str = "logits", temperature: float = 0.07
                        ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CPSC_DFKD.py's generator objective, minimised by the generator:

  -KL(p_T || p_S) - alpha * IKD + beta * BN + gamma * SupCon([f_S, f_T], y) + eta * CE(T, y).

  The KL keeps gradients through both nets; the IKD term detaches the teacher.
  The code's CIFAR-10 run uses ikd_form="log_mse", other datasets "mse";
  ce_form="probabilities" restates its CE quirk. A weight of 0 drops its term.
  `bn_loss` is the teacher's `bn_statistics_loss(..., reduce="sum")`.
  Features are used as given: pass L2-normalised ones (see `supcon_loss`).
  """
  terms = {"kl": -kl_divergence(teacher_logits, student_logits, 1.0)}
  if alpha:
    terms["ikd"] = -alpha * ikd_discrepancy(student_logits, teacher_logits, ikd_form)
  if beta:
    terms["bn"] = beta * bn_loss
  if gamma:
    feats = jnp.stack([student_features, teacher_features], axis=1)
    terms["supcon"] = gamma * supcon_loss(feats, labels_B, temperature)
  if eta:
    terms["ce"] = eta * class_cross_entropy(teacher_logits, labels_B, ce_form)
  return sum(terms.values()), terms


def cpsc_student_loss(teacher_logits: jax.Array, student_logits: jax.Array, labels_B: jax.Array,
                      *, alpha: float, eta: float, ikd_form: str = "mse",
                      ce_form: str = "logits") -> tuple[jax.Array, dict[str, jax.Array]]:
  """CPSC_DFKD.py's student objective: KL(p_T || p_S) + alpha * IKD + eta * CE(S, y).

  The CE is the *student's* against the generator's labels. The code's CIFAR-10
  run uses ikd_form="log_l2" here (log of the L2 norm, not log MSE), others
  "mse". The teacher is treated as a constant.
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  terms = {"kl": kl_divergence(teacher_logits, student_logits, 1.0)}
  if alpha:
    terms["ikd"] = alpha * ikd_discrepancy(student_logits, teacher_logits, ikd_form)
  if eta:
    terms["ce"] = eta * class_cross_entropy(student_logits, labels_B, ce_form)
  return sum(terms.values()), terms
