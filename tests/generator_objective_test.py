"""NAYER's (and CAE-DFKD's) generator objective and its BN-statistics EMA, recomputed by hand in
float64 from the networks' own outputs: the weights, the EMA blend, the "sum" over BN layers and
the adversarial switch are each checked against their definition, not against the loss helpers."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import golden_pin
from caedfkd_jax.engine import train
from caedfkd_jax.io.bundle import normalize
from caedfkd_jax.methods import cae_dfkd, nayer
from caedfkd_jax.synthesis import augment


def _flat(tree) -> dict:
  """{(layer..., "mean" | "var"): float64 array} of a BN-statistics tree."""
  return {path: np.asarray(leaf, np.float64)
          for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _random_stats_like(tree, rng: np.random.Generator):
  """A BN-statistics tree shaped like `tree`: means around 0, variances in [0.5, 2]."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.asarray(
          rng.uniform(0.5, 2.0, x.shape) if jax.tree_util.keystr(path).endswith("['var']")
          else rng.normal(0.0, 0.5, x.shape), jnp.float32), tree)


@pytest.fixture(scope="module")
def tiny():
  """(setup, teacher variables, first state, a CEND batch, a non-zero EMA). The teacher's running
  statistics are made random, so that L_BN compares against something other than (0, 1)."""
  teacher, table = golden_pin.tiny_teacher_and_table()
  setup = golden_pin.tiny_setup(teacher, table)
  rng = np.random.default_rng(0)
  teacher_vars = {"params": teacher.variables["params"],
                  "batch_stats": _random_stats_like(teacher.variables["batch_stats"], rng)}
  state = train.create_state(setup, teacher_vars)
  batch = cae_dfkd.cend_inputs(setup, {}, jax.random.key(1))
  ema = _random_stats_like(teacher_vars["batch_stats"], rng)
  return setup, teacher_vars, state, batch, ema


def _reference(t_logits, bn_stats, s_logits, labels, running, ema, valid, adv_on, loss_cfg):
  """L_G and its terms in float64, from the definitions (METHOD.md b.1, nayer.py's docstring)."""
  t, s = np.asarray(t_logits, np.float64), np.asarray(s_logits, np.float64)
  log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(
      np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  log_p_t, log_p_s = log_softmax(t), log_softmax(s)
  ce = -np.mean(log_p_t[np.arange(len(labels)), np.asarray(labels)])
  # L_BN: over the teacher's BN layers, ||mean - running mean||_2 + ||var - running var||_2, the
  # batch statistics blended with the EMA (momentum * ema + (1 - momentum) * current) once valid.
  current, run, old = _flat(bn_stats), _flat(running), _flat(ema)
  assert current.keys() == run.keys() == old.keys()
  m = loss_cfg.bn_momentum
  l_bn = 0.0
  for path, cur in current.items():
    used = m * old[path] + (1 - m) * cur if valid else cur
    l_bn += np.sqrt(np.sum((used - run[path]) ** 2))
  # L_adv: -KL(p_T || p_S), counted on the rows where both networks pick the same class, mean over
  # every row.
  agree = t.argmax(-1) == s.argmax(-1)
  kl = np.sum(np.exp(log_p_t) * (log_p_t - log_p_s), -1)
  adv = -np.mean(np.where(agree, kl, 0.0))
  total = loss_cfg.ce * ce + loss_cfg.bn * l_bn + loss_cfg.adv * adv_on * adv
  return {"gen/loss": total, "gen/ce": ce, "gen/bn": l_bn, "gen/adv": adv}, agree


def test_generator_loss_is_its_definition_in_float64(tiny):
  """L_G = ce * CE + bn * L_BN + adv * adv_on * L_adv for the warm-up (adv off) and later rounds,
  with the EMA unused (its first round) and used; each logged term is its float64 value."""
  setup, teacher_vars, state, batch, ema = tiny
  params, student = state.method.generator_params, state.student
  rng = jax.random.key(7)

  @jax.jit
  def networks(params, student, embeddings, rng):
    """What the loss feeds and reads: G's images, their augmented view, the teacher's logits and
    BN-input statistics, the student's logits."""
    images = setup.generator.apply({"params": params}, embeddings)
    x = normalize(augment.random_crop_flip(rng, images), setup.mean, setup.std)
    (t_logits, _), t_state = setup.teacher.apply(teacher_vars, x, train=False,
                                                 mutable=["bn_stats"])
    s_logits, _ = setup.student.apply(student, x, train=False)
    return images, t_logits, t_state["bn_stats"], s_logits

  loss_fn = jax.jit(lambda params, student, batch, ema, valid, adv_on, rng: nayer.generator_loss(
      params, setup, teacher_vars, student, batch, ema, valid, adv_on, rng))
  images, t_logits, bn_stats, s_logits = jax.device_get(
      networks(params, student, batch.embeddings_BxD, rng))
  loss_cfg = setup.config.loss
  assert loss_cfg.bn_reduce == "sum" and loss_cfg.bn_momentum == 0.9
  refs = {}
  for valid in (False, True):
    for adv_on in (0.0, 1.0):
      loss, (got_images, got_stats, metrics, _) = jax.device_get(loss_fn(
          params, student, batch, ema, jnp.bool_(valid), jnp.float32(adv_on), rng))
      ref, agree = _reference(t_logits, bn_stats, s_logits, batch.labels_B,
                              teacher_vars["batch_stats"], ema, valid, adv_on, loss_cfg)
      refs[valid, adv_on] = ref
      case = f"bn_ema_valid={valid}, adv_on={adv_on}: "
      np.testing.assert_allclose(loss, ref["gen/loss"], rtol=1e-5, err_msg=case + "loss")
      for name, value in ref.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=case + name)
      # The round keeps the current statistics, not the blend (finish_round's EMA reads them).
      for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(bn_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=case + "bn_stats")
      np.testing.assert_allclose(got_images, images, rtol=1e-6, atol=1e-7)
  # The cases are told apart: the mask keeps some rows and drops others, L_adv is not 0 (so
  # adv_on matters), and blending with the EMA changes L_BN.
  assert 0 < agree.sum() < len(agree)
  assert abs(refs[False, 1.0]["gen/loss"] - refs[False, 0.0]["gen/loss"]) > 1e-3
  assert abs(refs[True, 0.0]["gen/bn"] - refs[False, 0.0]["gen/bn"]) > 1e-3 * refs[False, 0.0]["gen/bn"]


def test_finish_round_updates_the_bn_statistics_ema_by_hand(tiny):
  """After a round: ema <- m * ema + (1 - m) * last step's stats once the EMA holds a value, the
  last step's stats as they are the first time; either way the EMA is then valid."""
  setup, teacher_vars, state, _, ema = tiny
  rng = np.random.default_rng(1)
  carry, ctx = nayer.start_round(state, setup=setup, inputs=cae_dfkd.cend_inputs, warmup=False)
  carry = carry.replace(last_bn_stats=_random_stats_like(teacher_vars["batch_stats"], rng),
                        best_images=jnp.asarray(rng.uniform(size=carry.best_images.shape),
                                                jnp.float32))
  finish = jax.jit(lambda state, carry, ctx: nayer.finish_round(state, carry, ctx, teacher_vars,
                                                                setup=setup)[0])
  m = setup.config.loss.bn_momentum
  last, old = _flat(carry.last_bn_stats), _flat(ema)
  for valid in (False, True):
    start = state.replace(method=state.method.replace(bn_ema=ema, bn_ema_valid=jnp.bool_(valid)))
    after = jax.device_get(finish(start, carry, ctx)).method
    assert bool(after.bn_ema_valid)
    got = _flat(after.bn_ema)
    assert got.keys() == last.keys()
    for path, value in got.items():
      expected = m * old[path] + (1 - m) * last[path] if valid else last[path]
      np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7,
                                 err_msg=f"bn_ema_valid={valid}: {path}")
