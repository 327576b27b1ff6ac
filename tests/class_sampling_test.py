"""Class sampling (issue 31): the shuffled cycle, groups of C < K classes, and C = K as today."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.config import checks, defaults
from caedfkd_jax.engine import train
from caedfkd_jax.methods import bank_kd, nayer
from caedfkd_jax.methods.base import teacher_judgement
from caedfkd_jax.synthesis import cend, class_cycle, losses


def test_every_cycle_is_a_permutation_read_on_across_calls():
  rng, k = jax.random.key(3), 12
  sequence = np.asarray(class_cycle.cycle_classes(rng, 0, 5 * k, k))
  for c in range(5):
    assert sorted(sequence[c * k:(c + 1) * k]) == list(range(k))
  assert len({tuple(sequence[c * k:(c + 1) * k]) for c in range(5)}) == 5   # Reshuffled.
  # Any window, from a traced start, is the same positions of the same sequence.
  window = jax.jit(class_cycle.cycle_classes, static_argnums=(2, 3))
  for start in (0, 7, k - 1, 2 * k + 5):
    np.testing.assert_array_equal(window(rng, jnp.int32(start), 17, k), sequence[start:start + 17])


@pytest.mark.parametrize("k,c,g", [(12, 4, 2), (12, 3, 1), (200, 10, 5), (1000, 20, 2)])
def test_groups_hold_distinct_classes_and_cover_every_class_evenly(k, c, g):
  rng = jax.random.key(0)
  per_cycle = k // c                          # Groups that cover every class once.
  rounds = -(-2 * per_cycle // g) + 1         # Enough rounds for two whole cycles.
  groups = np.concatenate([np.asarray(class_cycle.group_classes(rng, r, g, c, k))
                           for r in range(rounds)])
  assert groups.shape == (rounds * g, c)
  for group in groups:
    assert len(set(group)) == c
  for cycle in range(2):
    covered = groups[cycle * per_cycle:(cycle + 1) * per_cycle].reshape(-1)
    assert sorted(covered) == list(range(k))


def test_classes_per_group_must_divide_k():
  class_cycle.check_classes_per_group(0, 10)
  class_cycle.check_classes_per_group(10, 10)
  class_cycle.check_classes_per_group(5, 10)
  for bad in (3, 11, -1):
    with pytest.raises(ValueError, match=r"classes_per_group=.*divisor of 10 .*1, 2, 5"):
      class_cycle.check_classes_per_group(bad, 10)


def test_rounds_before_counts_the_rounds_of_the_epoch_plan():
  config = defaults.get_config()
  config.warmup_epochs, config.warmup_g_loops, config.g_loops, config.epochs = 3, 4, 2, 7
  count = 0
  for epoch in range(config.epochs):
    for unit, name in enumerate(bank_kd.epoch_plan(config, epoch)):
      if name.endswith("round"):
        assert int(bank_kd.rounds_before(config, jnp.int32(epoch), jnp.int32(unit))) == count
        count += 1


@pytest.mark.parametrize("mode", cend.MODES)
def test_all_classes_in_label_order_is_todays_batch_bit_for_bit(mode):
  table = jax.random.normal(jax.random.key(1), (6, 5))
  rng = jax.random.key(2)
  today = cend.build_generator_batch(rng, table, 3, 2, 0.3, mode=mode)
  identity = jnp.broadcast_to(jnp.arange(6), (3, 6))
  explicit = cend.build_generator_batch(rng, table, 3, 2, 0.3, mode=mode, classes_GxC=identity)
  for a, b in zip(jax.tree.leaves(today), jax.tree.leaves(explicit)):
    np.testing.assert_array_equal(a, b)


def test_sampled_groups_are_well_formed_cncl_groups():
  k, c, n, g = 12, 4, 2, 3
  table = jax.random.normal(jax.random.key(1), (k, 7))
  classes = class_cycle.group_classes(jax.random.key(5), 4, g, c, k)
  batch = cend.build_generator_batch(jax.random.key(2), table, g, n, 0.1, classes_GxC=classes)
  views = n + 1
  labels = np.asarray(batch.labels_B).reshape(g, views, c)
  source = np.asarray(batch.source_index_B).reshape(g, views, c)
  group = np.asarray(batch.group_B).reshape(g, views, c)
  emb = np.asarray(batch.embeddings_BxD).reshape(g, views, c, -1)
  for j in range(g):
    for v in range(views):
      np.testing.assert_array_equal(labels[j, v], np.asarray(classes[j]))  # Each class once a view.
      assert (source[j, v] == v).all() and (group[j, v] == j).all()
    np.testing.assert_array_equal(emb[j, 0], np.asarray(table)[np.asarray(classes[j])])  # Anchors.
    assert not np.allclose(emb[j, 1], emb[j, 0])                                       # Diffused.
  # CNCL on such a batch: finite, and each anchor's positives are its own class's views.
  feats = jax.random.normal(jax.random.key(3), (g * views * c, 8))
  loss = losses.cncl_loss(feats, batch.labels_B, batch.source_index_B, 0.1, group_B=batch.group_B)
  assert np.isfinite(float(loss))


def test_teacher_judgement_says_nan_for_a_class_the_batch_does_not_hold():
  logits = jnp.asarray([[5.0, 0, 0, 0], [0, 0.1, 0, 0], [0, 0, 5.0, 0]])
  low_conf, acc = teacher_judgement(logits, jnp.asarray([0, 1, 2]), 4, 0.5)
  np.testing.assert_array_equal(np.asarray(low_conf)[:3], [0.0, 1.0, 0.0])
  assert np.isnan(np.asarray(low_conf)[3]) and float(acc) == 1.0


def _tiny_setup(teacher_dir, table_path, classes_per_group):
  from tiny_run import tiny_config
  from caedfkd_jax.io import bundle as bundle_lib, embeddings
  config = tiny_config(teacher_dir, table_path)
  config.classes_per_group = classes_per_group
  teacher = bundle_lib.load_bundle(teacher_dir)
  checks.validate_config(config, 1, teacher.spec.num_classes)
  return train.create_setup(config, teacher, embeddings.load_table(table_path))


def test_c_equal_k_is_the_default_layout(teacher_dir, table_path):
  setup = _tiny_setup(teacher_dir, table_path, 4)    # The tiny run has K = 4.
  default = _tiny_setup(teacher_dir, table_path, 0)
  assert (setup.group_classes, setup.group_size, setup.synthesis_batch) == (
      default.group_classes, default.group_size, default.synthesis_batch) == (4, 8, 16)
  position = dataclasses.make_dataclass("Position", ["rng", "epoch", "unit"])
  assert nayer.round_classes(setup, position(jax.random.key(0), 0, 0)) is None


def test_sampled_rounds_bank_the_run_class_cycle_in_whole_groups(teacher_dir, table_path):
  """Two warm-up rounds of 2 groups of C = 2 of the K = 4 classes, N = 1: the bank holds the
  run's class cycle in order, each group its 2 classes x 2 views, and the per-class
  low-confidence shares say NaN for the classes a round did not make."""
  from tiny_run import one_cpu_steps, tiny_config
  config = tiny_config(teacher_dir, table_path)
  config.classes_per_group = 2
  setup, fns, teacher_vars, state = one_cpu_steps(config, teacher_dir, table_path)
  assert (setup.group_classes, setup.group_size, setup.synthesis_batch) == (2, 4, 8)
  rng = jax.random.wrap_key_data(np.asarray(jax.random.key_data(state.rng)))
  warmup_round = fns["warmup_round"]
  low_conf = []
  for _ in range(2):
    state, _, outputs = warmup_round(state, teacher_vars)
    low_conf.append(np.asarray(outputs["low_conf"]))
  bank = jax.device_get(state.method.bank)
  assert int(bank.size) == 16
  cycle = np.asarray(class_cycle.cycle_classes(jax.random.fold_in(rng, class_cycle.CLASS_CYCLE),
                                               0, 8, 4))
  labels = np.asarray(bank.labels[:16]).reshape(4, 2, 2)     # rounds*groups x views x C
  for j in range(4):
    for v in range(2):
      np.testing.assert_array_equal(labels[j, v], cycle[2 * j:2 * j + 2])
  np.testing.assert_array_equal(np.asarray(bank.source_index[:16]).reshape(4, 2, 2)[:, 1], 1)
  # Each round holds 2 groups = all 4 classes here (the cycle's two halves): no NaN.
  assert all(np.isfinite(x).all() for x in low_conf)


def test_diffdfkd_rounds_read_the_same_cycle_when_shuffled():
  from types import SimpleNamespace
  from caedfkd_jax.methods import diffdfkd
  rng, k = jax.random.key(4), 5
  cycle = np.asarray(class_cycle.cycle_classes(jax.random.fold_in(rng, class_cycle.CLASS_CYCLE),
                                               0, 3 * k, k))
  def labels(order, one, rounds, b=3):
    section = SimpleNamespace(class_order=order, one_class_per_round=one)
    setup = SimpleNamespace(synthesis_batch=b, num_classes=k,
                            config=SimpleNamespace(diffdfkd=section))
    return np.asarray(diffdfkd.round_labels(setup, jnp.int32(rounds), rng))
  assert [labels("in_turn", True, r)[0] for r in range(7)] == [0, 1, 2, 3, 4, 0, 1]  # The code's.
  shuffled = [labels("shuffled", True, r) for r in range(2 * k)]
  assert all((x == x[0]).all() for x in shuffled)                   # One class a round.
  np.testing.assert_array_equal([x[0] for x in shuffled], cycle[:2 * k])
  np.testing.assert_array_equal(labels("shuffled", False, 2), cycle[6:9])   # A class a row.
