"""Checkpoint steps: one per position of a run, or the config is refused before any work."""

import pytest

from caedfkd_jax.engine import checkpoint, train
from tiny_run import tiny_config


def test_a_step_is_unique_while_an_epoch_has_fewer_units_than_the_stride():
  assert checkpoint.step(3, 5) == 30_005
  # An epoch of 10,000 units would give its last unit the step of the next epoch's first:
  # Orbax would skip that save as already written, and "latest" would point at the wrong one.
  assert checkpoint.step(0, checkpoint.EPOCH_STRIDE) == checkpoint.step(1, 0)
  checkpoint.check_units_per_epoch([4, checkpoint.EPOCH_STRIDE - 1])
  with pytest.raises(ValueError, match="has 10000 units .* raise student.steps_per_call"):
    checkpoint.check_units_per_epoch([4, checkpoint.EPOCH_STRIDE])


def test_a_run_with_too_many_units_an_epoch_is_refused_before_any_work(teacher_dir, table_path,
                                                                      tmp_path):
  """Any method's, not only CPSC's: here NAYER's base with 10,001 units an epoch."""
  config = tiny_config(teacher_dir, table_path)
  config.student.kd_steps, config.student.steps_per_call = 20_000, 2
  config.max_units = 1   # Were it not refused, one unit would run and the call return.
  with pytest.raises(ValueError, match="has 10001 units"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
