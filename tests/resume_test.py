"""Resuming safely: changed configs refused, one time budget per run, non-finite state stops
the run with a finite checkpoint kept, and every bad value refused up front in one line."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from caedfkd_jax.engine import checkpoint, clock as clock_lib, steps, train
from caedfkd_jax.io import bundle as bundle_lib
from tiny_run import tiny_config


def _start(config, workdir, units=2):
  """A run stopped after `units` units, leaving a checkpoint to resume."""
  config.max_units = units
  assert train.train_and_evaluate(config, str(workdir))["stopped_early"]
  config.max_units = 0


def test_resume_with_changed_hyper_parameters_is_refused_listing_them(teacher_dir, table_path,
                                                                      tmp_path):
  _start(tiny_config(teacher_dir, table_path), tmp_path)
  config = tiny_config(teacher_dir, table_path)
  config.student.lr = 0.05
  config.loss.bn = 3.0
  with pytest.raises(ValueError, match=r"loss\.bn: 10\.0 -> 3\.0, student\.lr: 0\.1 -> 0\.05\)"
                                       r".*allow_config_change=True"):
    train.train_and_evaluate(config, str(tmp_path))


def test_a_field_added_after_the_run_was_saved_counts_unchanged_at_its_default():
  from caedfkd_jax.config import defaults
  config = defaults.get_config()
  saved = json.loads(json.dumps(config.to_dict()))
  del saved["loss"]["bn_reduce"]               # a run saved before the field existed
  assert checkpoint.config_changes(saved, config) == {}
  config.loss.bn_reduce = "mean"               # not what the old run computed
  assert checkpoint.config_changes(saved, config) == {"loss.bn_reduce": (None, "mean")}
  saved["loss"]["bn_reduce"] = "sum"           # a saved field is compared as before
  assert checkpoint.config_changes(saved, config) == {"loss.bn_reduce": ("sum", "mean")}


def test_invocation_fields_may_change_on_resume(teacher_dir, table_path, tmp_path):
  """The device count too: the state is replicated and every batch sharded, so a run saved on
  the 8 simulated devices continues on 2 (as a preempted job restarts on another machine)."""
  _start(tiny_config(teacher_dir, table_path), tmp_path)
  config = tiny_config(teacher_dir, table_path)
  config.checkpoint_every_minutes = 5.0
  config.grid_images_per_class = 1
  config.num_devices = 2
  config.max_units = 1
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["stopped_early"] and result["epoch"] == 1
  assert "config_changes" not in bundle_lib.load_bundle(result["student"]).spec.extra


def test_allowed_config_change_continues_and_is_recorded_in_the_bundle(teacher_dir, table_path,
                                                                       tmp_path):
  _start(tiny_config(teacher_dir, table_path), tmp_path)
  config = tiny_config(teacher_dir, table_path)
  config.student.lr = 0.05
  config.allow_config_change = True
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["epoch"] == config.epochs
  extra = bundle_lib.load_bundle(result["student"]).spec.extra
  # `_start` stopped after the warm-up epoch's last unit: the epoch ended (row, checkpoint) first.
  assert extra["config_changes"] == [{"epoch": 1, "unit": 0,
                                      "changes": {"student.lr": [0.1, 0.05]}}]
  assert extra["config"]["student"]["lr"] == 0.05
  assert extra["teacher_sha256"] == checkpoint.tree_sha256(bundle_lib.load_bundle(teacher_dir).variables)


def test_shape_changes_are_refused_even_when_changes_are_allowed(teacher_dir, table_path, tmp_path):
  _start(tiny_config(teacher_dir, table_path), tmp_path)
  config = tiny_config(teacher_dir, table_path)
  config.num_groups = 4
  config.allow_config_change = True
  with pytest.raises(ValueError, match=r"other shapes than this config makes \(num_groups: 2 -> 4\)"):
    train.train_and_evaluate(config, str(tmp_path))


def test_another_teacher_of_the_same_arch_is_refused(teacher_dir, table_path, tmp_path):
  _start(tiny_config(teacher_dir, table_path), tmp_path / "run")
  other = tmp_path / "other_teacher"
  spec = bundle_lib.load_bundle(teacher_dir).spec
  bundle_lib.save_bundle(str(other), spec, bundle_lib.init_variables(spec, 7))
  config = tiny_config(str(other), table_path)
  config.allow_config_change = True
  with pytest.raises(ValueError, match="distilled from another teacher"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_time_budget_and_time_axis_count_over_every_invocation(teacher_dir, table_path, tmp_path,
                                                               monkeypatch):
  """A fake clock: each unit takes 1 minute. The budget of 3 minutes is the run's, not each call's."""
  clock = {"now": 1e9}

  def fake_time():
    return clock["now"]
  monkeypatch.setattr(clock_lib.time, "time", fake_time)
  real_step_fns = steps.make_step_fns

  def timed_step_fns(*args, **kwargs):
    fns = real_step_fns(*args, **kwargs)

    def tick(fn):
      def run(*a):
        clock["now"] += 60
        return fn(*a)
      return run
    return {name: tick(fn) for name, fn in fns.items()}
  monkeypatch.setattr(train.steps, "make_step_fns", timed_step_fns)

  config = tiny_config(teacher_dir, table_path)
  config.time_budget_minutes = 3.5
  first = train.train_and_evaluate(config, str(tmp_path))
  assert first["stopped_early"] and first["minutes"] == pytest.approx(4.0)
  again = train.train_and_evaluate(config, str(tmp_path))          # budget spent: no unit runs
  assert again["stopped_early"] and again["epoch"] == first["epoch"] == 1
  config.time_budget_minutes = 0.0                                 # lifted: runs to the end
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final["epoch"] == config.epochs and not final["stopped_early"]
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2, 3]
  minutes = [r["time/minutes"] for r in rows]
  assert minutes == sorted(minutes) and minutes[-1] > 6        # no jump back to zero on resume


def _poison_student_params_at(monkeypatch, kd_step: int):
  """From KD step `kd_step` on, the student's params become NaN while every loss stays finite."""
  from caedfkd_jax.methods import bank_kd
  real = bank_kd.student_step

  def poisoned(carry, *args, **kwargs):
    carry, metrics = real(carry, *args, **kwargs)
    params = jax.tree.map(lambda p: jnp.where(carry.kd_step > kd_step, jnp.nan, p),
                          carry.student["params"])
    return carry.replace(student={**carry.student, "params": params}), metrics
  monkeypatch.setattr(bank_kd, "student_step", poisoned)


def _latest_checkpoint_is_finite(config, workdir) -> int:
  """Restores the kept checkpoint as a resume would; returns its epoch."""
  teacher = bundle_lib.load_bundle(config.teacher)
  from caedfkd_jax.io import embeddings
  setup = train.create_setup(config, teacher, embeddings.load_table(config.embeddings))
  abstract = jax.eval_shape(lambda: train.create_state(setup, teacher.variables))
  kept = checkpoint.Checkpoints(str(workdir), config.max_checkpoints)
  state, _ = kept.restore(abstract, lambda *_: None)
  kept.close()
  assert all(bool(ok) for ok in jax.device_get(train.finite_parts(setup, state)).values())
  return int(state.epoch)


def test_non_finite_params_stop_the_run_and_the_kept_checkpoint_is_finite(
    teacher_dir, table_path, tmp_path, monkeypatch):
  _poison_student_params_at(monkeypatch, kd_step=3)   # in the 2nd KD call of epoch 1
  config = tiny_config(teacher_dir, table_path)
  config.checkpoint_every_minutes = 0.0               # a checkpoint after every good unit
  with pytest.raises(train.NonFiniteLossError,
                     match=r"The student params became non-finite at epoch 1, KD call 1 \(unit 2\), "
                           r"while its losses stayed finite"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _latest_checkpoint_is_finite(config, tmp_path) == 1


def test_non_finite_loss_names_epoch_step_and_term(teacher_dir, table_path, tmp_path, monkeypatch):
  from caedfkd_jax.synthesis import losses
  real = losses.cncl_loss
  monkeypatch.setattr(losses, "cncl_loss", lambda *a, **k: real(*a, **k) / 0.0)
  config = tiny_config(teacher_dir, table_path)
  with pytest.raises(train.NonFiniteLossError, match=r"kd/cncl became (nan|inf) at epoch 1, KD call 0 "
                                                     r"\(unit 1\), step 0"):
    train.train_and_evaluate(config, str(tmp_path))
  assert _latest_checkpoint_is_finite(config, tmp_path) == 1


@pytest.mark.parametrize("field, value, message", [
    ("student.steps_per_call", 0, r"config\.student\.steps_per_call=0 must be positive"),
    ("student.lr", 0.0, r"config\.student\.lr=0\.0 must be positive"),
    ("generator.life_epochs", 0, r"config\.generator\.life_epochs=0 must be positive"),
    ("eval_every_epochs", 0, r"config\.eval_every_epochs=0 must be positive"),
    ("bank_capacity", 8, r"bank_capacity=8 is smaller than one synthesis batch .* = 16 images"),
    ("warmup_g_loops", 0, r"No generator round runs before the first KD step"),
    ("student.momentum", 1.5, r"student\.momentum=1\.5 must lie in \[0, 1\]"),
    ("cend.mode", "plain", r"config\.cend\.mode='plain': use one of cend, clean, gaussian"),
    ("student.kd_steps", 5, r"kd_steps=5 must be a multiple of student\.steps_per_call=2"),
])
def test_bad_values_are_refused_in_one_line_before_any_work(teacher_dir, table_path, tmp_path,
                                                            field, value, message):
  config = tiny_config(teacher_dir, table_path)
  if field == "warmup_g_loops":
    config.g_loops = 0
  section, _, name = field.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / train.CHECKPOINT_DIR)


def test_bad_values_reach_the_cli_as_one_line(teacher_dir, table_path, tmp_path, capsys):
  from caedfkd_jax.cli import main
  code = main.main(["distill", "--config", "cifar10_resnet56_resnet20.py", "--workdir", str(tmp_path),
                    f"--config.teacher={teacher_dir}", "--config.teacher_arch_expected=",
                    f"--config.embeddings={table_path}", "--config.student.steps_per_call=0"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1 and "steps_per_call=0 must be positive" in err[0]

