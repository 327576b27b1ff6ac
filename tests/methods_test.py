"""The method seam: the registry, NAYER as CAE-DFKD's base, and a method's run end to end."""

import dataclasses
import json

import pytest

import golden_pin
from caedfkd_jax.config import checks, defaults, fields
from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.methods import registry
from tiny_run import assert_same_round_and_kd, round_and_kd, tiny_config


@pytest.fixture(scope="module")
def pinned():
  """The stored tiny state after a warm-up round (golden_pin.py), and its setup's parts."""
  teacher, table = golden_pin.tiny_teacher_and_table()
  setup = golden_pin.tiny_setup(teacher, table)
  state, _ = golden_pin.load(golden_pin.GOLDEN, train.create_state(setup, teacher.variables))
  return teacher, table, setup, state


def _setup_of(setup, **changed):
  """`setup` rebuilt for a config with `fields` ("section.field" or top-level) changed."""
  config = defaults.add_method_sections(
      fields.set_fields(setup.config.copy_and_resolve_references(), changed))
  teacher_and_table = golden_pin.tiny_teacher_and_table()
  built = train.create_setup(config, *teacher_and_table)
  return dataclasses.replace(built, generator_tx=setup.generator_tx) if hasattr(
      built, "generator_tx") else built


def test_every_method_is_complete(pinned):
  _, _, setup, _ = pinned
  assert set(registry.names()) >= {"cae_dfkd", "cae_dfkd_cmi", "cmi", "cpsc_dfkd", "diffdfkd",
                                   "nayer"}
  for name in registry.names():
    method = registry.get(name)
    assert method.name == name and method.summary and method.reads
    assert set(method.sweepable) <= {f for f in method.sweepable if method.reads_field(f)}, name
    if method.frozen_vars is None:   # DiffDFKD's setup needs Stable Diffusion weights; its
      lone = _setup_of(setup, method=name)   # own test builds them.
      phases = method.phases(lone, None)
      units = {u for e in range(lone.config.epochs) for u in method.epoch_plan(lone.config, e)}
      assert units <= set(phases), name
      assert all(phase.label != "unit" and phase.shows for phase in phases.values()), name
      assert method.latest_images or not any(p.makes_images for p in phases.values()), name
  with pytest.raises(ValueError, match="Unknown method 'cmi2': --config.method takes one of"):
    registry.get("cmi2")


def test_nayer_computes_cae_dfkd_with_cend_and_cncl_switched_off(pinned):
  """The base is the base: NAYER's round and KD call are CAE-DFKD's ablation arm "base"."""
  teacher, _, setup, state = pinned
  nayer = round_and_kd(_setup_of(setup, method="nayer", **{"student.sampler": "uniform"}),
                       teacher.variables, state)
  switched_off = round_and_kd(_setup_of(setup, **{
      "cend.mode": "clean", "student.cncl_weight": 0.0, "student.sampler": "uniform"}),
      teacher.variables, state)
  assert "kd/cncl" not in nayer["kd_metrics"]
  assert_same_round_and_kd(nayer, switched_off)
  with pytest.raises(AssertionError):   # ... and not what CAE-DFKD with CEND computes.
    assert_same_round_and_kd(nayer, round_and_kd(setup, teacher.variables, state))


def test_a_method_ignores_what_it_does_not_read_and_refuses_sweeping_it(teacher_dir, table_path):
  config = tiny_config(teacher_dir, table_path)
  config.method = "nayer"
  config.sweep = "student.cncl_weight=0,0.5"
  with pytest.raises(ValueError, match="varies student.cncl_weight, which method nayer does not"):
    checks.validate_config(config, 1, 4)
  config.sweep = "loss.bn=5,10"
  checks.validate_config(config, 1, 4)


def test_a_nayer_run_records_its_method_and_cannot_resume_as_another(teacher_dir, table_path,
                                                                      tmp_path):
  config = tiny_config(teacher_dir, table_path)
  config.method, config.epochs, config.num_devices = "nayer", 2, 1
  result = train.train_and_evaluate(config, str(tmp_path))
  extra = bundle_lib.load_bundle(result["student"]).spec.extra
  assert extra["method"] == "nayer" and "cncl_weight" not in extra
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2] and "kd/kl" in rows[1] and "kd/cncl" not in rows[1]
  config.method = "cae_dfkd"
  with pytest.raises(ValueError, match="holds a nayer run; a checkpoint cannot switch methods"):
    train.train_and_evaluate(config, str(tmp_path))


def test_only_a_method_that_reads_embeddings_gets_a_table(teacher_dir, table_path, tmp_path):
  """CMI draws z: a table for other classes (here 3 against the teacher's 4) is no reason to
  refuse it, and it gets none; CAE-DFKD over CMI reads the table, so it refuses that one."""
  from caedfkd_jax.io import embeddings
  import numpy as np
  other = embeddings.EmbeddingTable(np.ones((3, 16), np.float32), ["a", "b", "c"], {})
  other.save(str(tmp_path / "other.npy"))
  teacher = bundle_lib.load_bundle(teacher_dir)
  config = tiny_config(teacher_dir, table_path, "cmi")
  config.embeddings = str(tmp_path / "other.npy")
  assert train.create_setup(config, teacher).table is None
  config = tiny_config(teacher_dir, str(tmp_path / "other.npy"), "cae_dfkd_cmi")
  with pytest.raises(ValueError, match="has 3 classes but the teacher has 4"):
    train.create_setup(config, teacher)


def test_a_field_the_method_does_not_read_is_refused_only_when_set(teacher_dir, table_path):
  config = tiny_config(teacher_dir, table_path, "nayer")
  checks.validate_config(config, 1, 4)                 # cend.magnitude at its default: fine
  config.cend.magnitude = 0.3                          # NAYER feeds clean embeddings: refused
  with pytest.raises(ValueError, match=r"config.cend.magnitude is set to 0.3, but method nayer "
                                       r"does not read it"):
    checks.validate_config(config, 1, 4)
  config = tiny_config(teacher_dir, table_path, "cae_dfkd")
  config.cend.magnitude = 0.3                          # read by CAE-DFKD
  checks.validate_config(config, 1, 4)
  with config.unlocked():
    config.student.lrr = 0.2                           # a typo is no field at all
  with pytest.raises(ValueError, match="config.student.lrr is not a config field"):
    checks.validate_config(config, 1, 4)


def test_the_launcher_refuses_an_unread_field_in_one_line(teacher_dir, tmp_path, capsys):
  """The resnet56 config sets NAYER's batch layout; switched to CMI, which draws its own."""
  from caedfkd_jax.cli.main import main
  code = main(["distill", "--config", "cifar10_resnet56_resnet20.py", "--workdir",
               str(tmp_path / "w"), f"--config.teacher={teacher_dir}",
               "--config.teacher_arch_expected=",
               "--config.student_arch=resnet_tiny_a", "--config.method=cmi",
               "--config.student.sampler=uniform"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 2 and len(err) == 1
  assert "config.num_groups is set to 2, but method cmi does not read it" in err[0]
