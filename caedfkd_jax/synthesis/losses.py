"""The CAE-DFKD losses as pure functions (METHOD.md a.3-a.6). All return float32 scalars."""

import jax
import jax.numpy as jnp
import optax

PyTree = object


def cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Teacher CE against the class an image was generated for."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BxC.astype(jnp.float32), labels_B).mean()


BN_REDUCTIONS = ("sum", "mean")


def bn_statistics_loss(batch_stats: PyTree, running_stats: PyTree,
                       reduce: str = "sum") -> jax.Array:
  """DeepInversion's L_BN: over BN layers, ||var_run - var||_2 + ||mean_run - mean||_2.

  Both trees hold per-channel "mean"/"var" leaves in the same layout (the
  teacher's "bn_stats" collection and its "batch_stats"). `reduce="sum"` adds the
  layers up (NAYER), so the term grows with the teacher's depth; "mean" averages
  them, so one loss weight means the same for a 20-layer and a 56-layer teacher.
  """
  if reduce not in BN_REDUCTIONS:
    raise ValueError(f"reduce={reduce!r}: use sum or mean.")
  norms = jax.tree.leaves(jax.tree.map(
      lambda a, b: jnp.linalg.norm((a - b).astype(jnp.float32)), batch_stats, running_stats))
  total = sum(norms, jnp.float32(0.0))
  return total if reduce == "sum" else total / (len(norms) // 2)


def blend_bn_statistics(batch_stats: PyTree, ema: PyTree, momentum: float) -> PyTree:
  """NAYER/Fast's BN momentum: the current stats blended with an EMA of past rounds."""
  return jax.tree.map(lambda cur, old: (1.0 - momentum) * cur + momentum * old, batch_stats, ema)


def _kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), -1)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), -1)
  return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), -1)


def adversarial_loss(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """-KL(p_T || p_S) on the samples where student and teacher agree (mean over all)."""
  agree = jnp.argmax(student_logits, -1) == jnp.argmax(teacher_logits, -1)
  return -jnp.mean(jnp.where(agree, _kl_rows(teacher_logits, student_logits), 0.0))


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float) -> jax.Array:
  """t^2 * KL(softmax(T/t) || softmax(S/t)), batch mean (Eq. 6's first term)."""
  t = temperature
  return t * t * jnp.mean(_kl_rows(teacher_logits / t, student_logits / t))


def cncl_loss(features_BxD: jax.Array, labels_B: jax.Array, source_index_B: jax.Array,
              temperature: float = 0.07, group_B: jax.Array | None = None,
              same_group_positives: bool = False, form: str = "infonce",
              eps: float = 1e-8) -> jax.Array:
  """CNCL (Eq. 4): clean-embedding images are anchors, the same class's diffused
  images positives, every other class's images negatives; cosine / temperature.

  "infonce": -log(sum_pos / (sum_pos + sum_neg)); "supcon": the mean over
  positives of -log(exp(s_p) / (sum_pos + sum_neg)). Averaged over the anchors
  that have at least one positive; 0 when none has.
  """
  if form not in ("infonce", "supcon"):
    raise ValueError(f"Unknown CNCL form {form!r}; use 'infonce' or 'supcon'.")
  f = features_BxD.astype(jnp.float32)
  # rsqrt(|f|^2 + eps^2) rather than |f|: finite gradients for all-zero features too.
  f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps * eps)
  logits_BxB = f @ f.T / temperature
  same_class = labels_B[:, None] == labels_B[None, :]
  anchor_B = source_index_B == 0
  positive = same_class & (source_index_B[None, :] >= 1)
  if same_group_positives and group_B is not None:
    positive &= group_B[:, None] == group_B[None, :]
  negative = ~same_class
  neg_inf = jnp.float32(-1e30)
  log_pos = jax.nn.logsumexp(jnp.where(positive, logits_BxB, neg_inf), axis=-1)
  log_all = jax.nn.logsumexp(jnp.where(positive | negative, logits_BxB, neg_inf), axis=-1)
  if form == "infonce":
    per_anchor = log_all - log_pos
  else:
    n_pos = jnp.maximum(positive.sum(-1), 1)
    per_anchor = jnp.sum(jnp.where(positive, log_all[:, None] - logits_BxB, 0.0), -1) / n_pos
  valid = anchor_B & positive.any(-1)
  return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(valid.sum(), 1)


def image_contrastive_loss(features1_BxD: jax.Array, features2_BxD: jax.Array,
                           temperature: float = 0.5, eps: float = 1e-8) -> jax.Array:
  """SimCLR's NT-Xent on two augmented views of the same B images: each of the 2B rows has its
  other view as the positive and the other 2B - 2 rows as negatives; cosine / temperature,
  averaged over the 2B rows. The image-level contrastive baseline of the paper's Table I, where
  CNCL contrasts at the level of the class embeddings instead."""
  f = jnp.concatenate([features1_BxD, features2_BxD]).astype(jnp.float32)
  f = f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps * eps)
  n = f.shape[0]
  logits = f @ f.T / temperature
  logits = jnp.where(jnp.eye(n, dtype=bool), jnp.float32(-1e30), logits)   # Not itself.
  partner = (jnp.arange(n) + n // 2) % n
  log_prob = logits[jnp.arange(n), partner] - jax.nn.logsumexp(logits, axis=-1)
  return -jnp.mean(log_prob)
