"""The engine end to end on tiny models: runs, resumes identically, shards, stops on NaN."""

import contextlib
import json
import os
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from caedfkd_jax.config import defaults
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.runtime import interrupts, platform
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import NUM_CLASSES, assert_same_round_and_kd, round_and_kd, tiny_config
from xla_test_flags import FAST_COMPILE

def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_run_writes_student_logs_samples_and_checkpoints(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["epoch"] == 3 and not result["stopped_early"]
  student = bundle_lib.load_bundle(result["student"])
  assert student.spec.arch == "resnet_tiny_a" and student.spec.num_classes == NUM_CLASSES
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [l["epoch"] for l in lines] == [1, 2, 3]
  assert "kd/kl" not in lines[0] and "kd/kl" in lines[1]       # no KD during warm-up
  assert lines[0]["bank/size"] == 2 * 16 and lines[2]["bank/size"] == 4 * 16
  assert 0.0 <= lines[1]["gen/low_confidence_share"] <= 1.0
  assert sorted(os.listdir(tmp_path / "samples")) == [f"epoch_{e:04d}.png" for e in (1, 2, 3)]
  assert os.listdir(tmp_path / "tensorboard")
  # The student learnt something from the teacher: its params moved from this run's own first
  # student (same config and seed), which only KD steps change.
  teacher = bundle_lib.load_bundle(teacher_dir)
  setup = train.create_setup(config, teacher, embeddings.load_table(table_path))
  init = train.create_state(setup, teacher.variables).student
  assert jax.tree.structure(init["params"]) == jax.tree.structure(student.variables["params"])
  assert any(not np.allclose(a, b) for a, b in zip(_leaves(init["params"]), _leaves(student.variables["params"])))


def test_interrupted_run_resumes_identically(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  # Stop after 1 unit (mid warm-up epoch), then 2 more (mid KD epoch), then resume twice.
  for stop_after in (1, 2):
    config.max_units = stop_after
    partial = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert partial["stopped_early"] and partial["stop_reason"] == "max_units"
    record = bundle_lib.load_bundle(partial["student"]).spec
    assert record.extra["training"]["epochs_done"] == partial["epoch"]
    if stop_after == 1:   # Still in the first epoch: the bundle says it is untrained.
      assert partial["epoch"] == 0 and "0 epochs" in bundle_lib.untrained_warning(record)
  config.max_units = 0
  # Ctrl-C (a stop request, as the first SIGINT makes) checkpoints after the unit it arrives in.
  class StopAfterTwoUnits(interrupts.StopRequest):
    checks = 0
    @property
    def requested(self):
      self.checks += 1
      return self.checks > 2
  stop = contextlib.contextmanager(lambda *a, **k: iter([StopAfterTwoUnits()]))
  with mock.patch.object(train.interrupts, "stop_on_signals", stop):
    interrupted = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert interrupted["stop_reason"] == "interrupted" and interrupted["stopped_early"]
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["stop_reason"] == "completed"
  assert bundle_lib.untrained_warning(bundle_lib.load_bundle(resumed["student"]).spec) is None
  # Training time adds up across the three invocations.
  assert resumed["train_minutes"] > partial["train_minutes"] > 0
  a = bundle_lib.load_bundle(full["student"]).variables
  b = bundle_lib.load_bundle(resumed["student"]).variables
  for x, y in zip(_leaves(a), _leaves(b)):
    np.testing.assert_array_equal(x, y)
  # stop_after_epochs ends at an epoch's end under the full schedule; 0 then continues the run.
  for stop_epoch in (1, 2):
    config.stop_after_epochs = stop_epoch
    partial = train.train_and_evaluate(config, str(tmp_path / "by_epoch"))
    assert partial["stopped_early"] and partial["epoch"] == stop_epoch
  config.stop_after_epochs = 0
  staged = train.train_and_evaluate(config, str(tmp_path / "by_epoch"))
  assert staged["epoch"] == config.epochs and not staged["stopped_early"]
  c = bundle_lib.load_bundle(staged["student"]).variables
  for x, y in zip(_leaves(a), _leaves(c)):
    np.testing.assert_array_equal(x, y)


def _same_start(teacher_dir, table_path):
  """A setup and one state after a warm-up round (so the bank has images), made once.

  The comparisons below start every code path from this state and run a few steps:
  paths must agree on equal inputs, not along whole trajectories whose float rounding
  differs by CPU (Adam's first, sign-like step and the best-batch choice amplify it).
  The generator uses plain SGD here for the same reason; the mechanics compared (scan
  or loop, RNG folding, best batch, banking, BN-stat EMA) do not depend on the optimiser.
  """
  import dataclasses
  import optax
  config = tiny_config(teacher_dir, table_path)
  config.generator.steps = 3
  teacher = bundle_lib.load_bundle(teacher_dir)
  setup = train.create_setup(config, teacher, embeddings.load_table(table_path))
  setup = dataclasses.replace(setup, generator_tx=optax.sgd(0.05))
  mesh = make_mesh(jax.devices("cpu")[:1])
  state = train.create_state(setup, teacher.variables)
  state, _, _ = steps.make_step_fns(setup, mesh, fuse=False)["warmup_round"](state, teacher.variables)
  return setup, teacher.variables, jax.device_get(state)


def test_eight_devices_match_one(teacher_dir, table_path):
  cpus = jax.devices("cpu")   # CPU devices exist on any backend; conftest simulates 8.
  assert len(cpus) == 8, "conftest sets 8 simulated CPU devices"
  setup, teacher_vars, state = _same_start(teacher_dir, table_path)
  one = round_and_kd(setup, teacher_vars, state, cpus[:1], fuse=False)
  eight = round_and_kd(setup, teacher_vars, state, cpus, fuse=False)
  assert_same_round_and_kd(one, eight)


def test_nan_stops_naming_the_term_and_keeps_the_last_checkpoint(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  config.student.lr = 1e30                      # diverges in the first KD epoch
  with pytest.raises(train.NonFiniteLossError, match=r"kd/.* at epoch 1"):
    train.train_and_evaluate(config, str(tmp_path))
  # The warm-up epoch's checkpoint survives for inspection or a retry.
  assert os.listdir(tmp_path / train.CHECKPOINT_DIR)


def test_clear_errors_for_bad_inputs(teacher_dir, table_path, tmp_path):
  config = tiny_config(teacher_dir, table_path)
  config.teacher = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="model.json"):
    train.train_and_evaluate(config, str(tmp_path / "w1"))

  config = tiny_config(teacher_dir, table_path)
  config.student_arch = "resnet9000"
  with pytest.raises(ValueError, match="Unknown student_arch 'resnet9000'"):
    train.train_and_evaluate(config, str(tmp_path / "w2"))

  wrong = embeddings.EmbeddingTable(np.ones((NUM_CLASSES + 1, 16), np.float32),
                                    [str(k) for k in range(NUM_CLASSES + 1)], {})
  wrong.save(str(tmp_path / "wrong.npy"))
  config = tiny_config(teacher_dir, table_path)
  config.embeddings = str(tmp_path / "wrong.npy")
  with pytest.raises(ValueError, match="5 classes but the teacher has 4"):
    train.train_and_evaluate(config, str(tmp_path / "w3"))


def test_distill_cli_runs_and_resumes(teacher_dir, table_path, tmp_path):
  from caedfkd_jax.cli import main
  args = ["distill", "--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                              "cifar10_resnet56_resnet20.py"),
          "--workdir", str(tmp_path), f"--config.teacher={teacher_dir}",
          "--config.teacher_arch_expected=",   # the config expects resnet56; this teacher is tiny
          f"--config.embeddings={table_path}", "--config.student_arch=resnet_tiny_a",
          "--config.cend.num_sources=1", "--config.num_groups=1", "--config.generator.ngf=4",
          "--config.generator.noise_dim=8", "--config.generator.steps=1", "--config.warmup_g_loops=1",
          "--config.student.batch_groups=1", "--config.student.kd_steps=2",
          "--config.student.steps_per_call=1", "--config.warmup_epochs=1", "--config.epochs=2"]
  assert main.main(args) == 0
  assert os.path.exists(tmp_path / "student" / "model.json")
  assert main.main(["distill", "--workdir", str(tmp_path)]) == 2   # no --config: usage error


@pytest.mark.parametrize("fuse", [False, True], ids=["per_step", "fused"])
def test_each_phase_is_traced_once_over_a_whole_run(teacher_dir, table_path, tmp_path, monkeypatch,
                                                    fuse):
  """No retracing: four epochs (warm-up, then KD) reuse one compiled program per phase."""
  from caedfkd_jax.methods import bank_kd, nayer
  chex.clear_trace_counter()
  if fuse:   # One program per kind of round (warm-up, regular), each tracing its step once.
    traced = {"start_round": 2, "generator_step": 2, "finish_round": 2, "student_step": 1}
  else:      # The warm-up and regular rounds share their step and finish programs.
    traced = {"start_round": 2, "generator_step": 1, "finish_round": 1, "student_step": 1}
  for name, n in traced.items():
    module = bank_kd if name == "student_step" else nayer
    monkeypatch.setattr(module, name, chex.assert_max_traces(getattr(module, name), n=n))
  config = tiny_config(teacher_dir, table_path)
  config.fuse_steps = fuse
  config.epochs = 4
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["epoch"] == 4


def test_fused_scans_compute_what_per_step_calls_compute(teacher_dir, table_path):
  """GPUs run each round / KD call as one lax.scan, CPUs step by step: same numbers either way."""
  setup, teacher_vars, state = _same_start(teacher_dir, table_path)
  cpu = jax.devices("cpu")[:1]
  per_step = round_and_kd(setup, teacher_vars, state, cpu, fuse=False)
  fused = round_and_kd(setup, teacher_vars, state, cpu, fuse=True)
  assert_same_round_and_kd(per_step, fused)


def test_tuned_cpu_kernels_compute_what_xla_default_computes(teacher_dir, table_path):
  """`config.cpu_kernels` picks XLA:CPU's kernels, not the maths: one round and KD call agree."""
  import dataclasses
  setup, teacher_vars, state = _same_start(teacher_dir, table_path)
  cpu = jax.devices("cpu")[:1]
  xla_config = setup.config.copy_and_resolve_references()
  xla_config.cpu_kernels = "xla_default"
  assert setup.config.cpu_kernels == "tuned"
  tuned = round_and_kd(setup, teacher_vars, state, cpu, fuse=False)
  default = round_and_kd(dataclasses.replace(setup, config=xla_config), teacher_vars, state,
                          cpu, fuse=False)
  assert_same_round_and_kd(tuned, default)


def test_the_path_comparison_catches_a_real_difference(teacher_dir, table_path):
  """The tolerances above are tight enough to see one wrong RNG fold in a KD call."""
  setup, teacher_vars, state = _same_start(teacher_dir, table_path)
  cpu = jax.devices("cpu")[:1]
  reference = round_and_kd(setup, teacher_vars, state, cpu, fuse=False)
  shifted = round_and_kd(setup, teacher_vars, state.replace(rng=jax.random.fold_in(state.rng, 1)),
                          cpu, fuse=False)
  with pytest.raises(AssertionError):
    assert_same_round_and_kd(reference, shifted)


def test_resnet56_config_has_a_cpu_and_a_full_schedule():
  import importlib.util
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10_resnet56_resnet20.py")
  spec = importlib.util.spec_from_file_location("r56_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cpu, full, default = module.get_config(), module.get_config("full"), defaults.get_config()
  assert cpu.num_groups == 2 and cpu.epochs == 16
  assert full.teacher_arch_expected == "resnet56" and full.student_arch == "resnet20"
  for name in ("num_groups", "g_loops", "warmup_g_loops", "warmup_epochs", "epochs"):
    assert full[name] == default[name], name
  assert full.generator.steps == 30 and full.student.kd_steps == 400 and full.student.batch_groups == 10
  with pytest.raises(ValueError, match="schedule 'paper'"):
    module.get_config("paper")


def test_platform_picks_dtype_and_fusion_unless_the_config_says():
  assert platform.compute_dtype("auto", "cpu") == jnp.float32
  assert platform.compute_dtype("auto", "gpu") == jnp.bfloat16
  assert platform.compute_dtype("bfloat16", "cpu") == jnp.bfloat16
  with pytest.raises(ValueError, match="compute_dtype 'fp8'"):
    platform.compute_dtype("fp8")
  config = defaults.get_config()
  assert config.fuse_steps is None
  assert steps.resolve_fuse(config, platform="cpu") is False     # CPU: per-step calls
  assert steps.resolve_fuse(config, platform="gpu") is True
  assert steps.resolve_fuse(config, fuse=True) is True
  config.fuse_steps = True
  assert steps.resolve_fuse(config) is True


def test_a_rerun_reuses_the_persistent_compilation_cache(teacher_dir, table_path, tmp_path):
  """Two fresh processes, same config: the second compiles nothing the first did not cache."""
  import subprocess
  import sys
  cache = tmp_path / "xla"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"   # tiny test programs compile fast
  env["XLA_FLAGS"] = FAST_COMPILE                           # one device
  def distill(workdir):
    args = [sys.executable, "-m", "caedfkd_jax.cli.main", "distill",
            "--config", os.path.join(os.path.dirname(__file__), "..", "configs",
                                     "cifar10_resnet56_resnet20.py"),
            "--workdir", str(workdir), f"--config.teacher={teacher_dir}",
            "--config.teacher_arch_expected=", f"--config.embeddings={table_path}",
            "--config.student_arch=resnet_tiny_a", "--config.cend.num_sources=1",
            "--config.num_groups=1", "--config.generator.ngf=4", "--config.generator.noise_dim=8",
            "--config.generator.steps=1", "--config.warmup_g_loops=1",
            "--config.student.batch_groups=1", "--config.student.kd_steps=2",
            "--config.student.steps_per_call=1", "--config.warmup_epochs=1", "--config.epochs=2",
            f"--config.compilation_cache_dir={cache}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
  distill(tmp_path / "first")
  cached = set(os.listdir(cache))
  assert any(name.startswith("jit_generator_step") for name in cached)
  distill(tmp_path / "second")
  assert set(os.listdir(cache)) == cached


def test_generator_is_renewed_on_nayers_g_life_schedule():
  from caedfkd_jax.methods import nayer
  config = defaults.get_config()
  renewed = lambda: [e for e in range(45) if nayer.renews_generator(config, e)]
  config.warmup_epochs, config.generator.life_epochs = 20, 10   # NAYER's CIFAR scripts
  assert renewed() == [10, 20, 30, 40]
  config.warmup_epochs = 1                                      # NAYER's default --warmup
  assert renewed() == [1, 10, 11, 20, 21, 30, 31, 40, 41]
  config.warmup_epochs = 0
  assert renewed() == [10, 20, 30, 40]
