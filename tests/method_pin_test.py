"""One CAE-DFKD round and KD call still compute the pinned numbers (see golden_pin.py).

The guard for refactoring the engine into methods (issue 13): a refactor that changes
what a round or a KD call computes fails here, while float rounding that differs by CPU
stays inside the path-comparison tolerances.
"""

import pytest

import golden_pin
from caedfkd_jax.engine import train
from tiny_run import assert_same_round_and_kd, round_and_kd


@pytest.fixture(scope="module")
def pinned():
  teacher, table = golden_pin.tiny_teacher_and_table()
  setup = golden_pin.tiny_setup(teacher, table)
  template = train.create_state(setup, teacher.variables)
  state, outputs = golden_pin.load(golden_pin.GOLDEN, template)
  return setup, teacher.variables, state, outputs


def test_a_round_and_a_kd_call_compute_the_pinned_numbers(pinned):
  setup, teacher_vars, state, golden = pinned
  now = round_and_kd(setup, teacher_vars, state)
  assert sorted(now["gen_metrics"]) == sorted(golden["gen_metrics"])
  assert sorted(now["kd_metrics"]) == sorted(golden["kd_metrics"])
  assert_same_round_and_kd(now, golden)


def test_the_pin_sees_a_changed_loss_weight(pinned):
  """Not vacuous: the same comparison fails for a run whose KL temperature moved by 10%."""
  import dataclasses
  setup, teacher_vars, state, golden = pinned
  config = setup.config.copy_and_resolve_references()
  config.student.temperature *= 1.1
  changed = round_and_kd(dataclasses.replace(setup, config=config), teacher_vars, state)
  with pytest.raises(AssertionError):
    assert_same_round_and_kd(changed, golden)
