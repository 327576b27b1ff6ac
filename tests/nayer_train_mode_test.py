"""NAYER's `student.train()` in its round loop (issue 28): `student_train_mode_in_rounds`."""

import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.config import ladder
from tiny_run import one_cpu_steps, tiny_config


def _rounds_after(teacher_dir, table_path, train_mode: bool, units: tuple[int, ...]):
  """For each unit: the student's running statistics before and after one post-warm-up round
  that is that unit of its epoch, the generator after it and the round's metrics; every round
  from the same fresh state."""
  config = tiny_config(teacher_dir, table_path)
  config.student_train_mode_in_rounds = train_mode
  config.g_loops = 2
  _, fns, teacher_vars, fresh = one_cpu_steps(config, teacher_dir, table_path)
  results = []
  for unit in units:
    state = jax.tree.map(jnp.copy, fresh)    # The step donates its state.
    state = state.replace(epoch=jnp.full_like(state.epoch, config.warmup_epochs),
                          unit=jnp.full_like(state.unit, unit))
    before = jax.device_get(state.student["batch_stats"])
    after, metrics, _ = fns["round"](state, teacher_vars)
    results.append((before, jax.device_get(after.student["batch_stats"]),
                    jax.device_get(after.method.generator_params), jax.device_get(metrics)))
  return results


def test_an_epochs_later_rounds_see_a_training_student_as_in_nayers_code(teacher_dir, table_path):
  leaves = jax.tree.leaves
  # Unit 1 (the epoch's second round), switch on: running statistics moved, a finite round.
  (before, moved, params_on, metrics), (before_first, first, _, _) = _rounds_after(
      teacher_dir, table_path, True, (1, 0))
  assert any(not np.allclose(a, b) for a, b in zip(leaves(before), leaves(moved)))
  assert all(np.isfinite(v).all() for v in leaves(metrics))
  # The same round with the switch off: statistics untouched, and L_adv saw other logits.
  [(before_off, kept, params_off, _)] = _rounds_after(teacher_dir, table_path, False, (1,))
  for a, b in zip(leaves(before_off), leaves(kept)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(leaves(params_on), leaves(params_off)))
  # The epoch's first round runs after NAYER's student.eval(): untouched even with the switch.
  for a, b in zip(leaves(before_first), leaves(first)):
    np.testing.assert_array_equal(a, b)


def test_every_ladder_arm_runs_nayers_loop():
  for arm, fields in ladder.ARMS.items():
    assert fields["student_train_mode_in_rounds"] is True, arm
