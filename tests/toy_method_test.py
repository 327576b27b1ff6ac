"""A new method is one file: tests/toy_method.py runs through the launcher, resumes, and is in
`--help`, with nothing else edited for it."""

import dataclasses
import json
import os

import jax
import numpy as np

import toy_method
from caedfkd_jax.cli.main import main
from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib

TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_method.py")


def _distill(workdir, teacher_dir, table_path, *extra) -> int:
  return main(["distill", "--config", TOY, "--workdir", str(workdir),
               f"--config.teacher={teacher_dir}", f"--config.embeddings={table_path}", *extra])


def test_the_toy_method_is_in_help_with_its_own_field(teacher_dir, table_path, tmp_path, capsys):
  assert _distill(tmp_path / "w", teacher_dir, table_path, "--help") == 0
  out = capsys.readouterr().out
  assert "toy_gaussian" in out.split("methods (--config.method")[1].splitlines()[0]
  assert "config fields of method toy_gaussian" in out
  assert "# Method toy_gaussian's own fields" in out
  line = next(line for line in out.splitlines() if line.strip().startswith("toy.z_std"))
  assert "toy.z_std = 0.5  (default: 1.0)" in line and "Standard deviation" in line


def test_the_toy_method_runs_through_the_launcher_and_resumes(teacher_dir, table_path, tmp_path,
                                                              capsys):
  workdir = tmp_path / "w"
  assert _distill(workdir, teacher_dir, table_path, "--config.max_units=3") == 0   # mid-epoch
  out = capsys.readouterr().out
  assert "Stopped by max_units at epoch 1, unit 1 of 3 epochs." in out
  assert "To continue: caedfkd distill --config" in out
  assert _distill(workdir, teacher_dir, table_path) == 0
  out = capsys.readouterr().out
  assert "Resumed from" in out and "at epoch 1, unit 1." in out
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["epoch"] for r in rows] == [1, 2, 3] and "kd/kl" in rows[-1]
  assert "kd/cncl" not in rows[-1] and "gen/low_confidence_share" in rows[0]
  extra = bundle_lib.load_bundle(str(workdir / "student")).spec.extra
  assert extra["method"] == "toy_gaussian" and extra["config"]["toy"]["z_std"] == 0.5
  assert os.path.exists(workdir / "samples" / "epoch_0003.png")


def test_the_toy_methods_inputs_are_its_own(teacher_dir, table_path):
  """Not NAYER's clean embeddings: Gaussian rows with the toy's own standard deviation."""
  config = toy_method.get_config()
  config.teacher, config.embeddings = teacher_dir, table_path
  setup = train.create_setup(config, bundle_lib.load_bundle(teacher_dir))
  assert setup.method.name == toy_method.NAME and "toy." in setup.method.reads
  batch = toy_method.gaussian_inputs(setup, {}, jax.random.key(0))
  assert batch.embeddings_BxD.shape == (16, 16)
  assert abs(float(np.std(np.asarray(batch.embeddings_BxD))) - 0.5) < 0.1
  config.toy.z_std = 2.0
  wider = toy_method.gaussian_inputs(dataclasses.replace(setup, config=config), {},
                                     jax.random.key(0))
  np.testing.assert_allclose(wider.embeddings_BxD, 4 * batch.embeddings_BxD, rtol=1e-6)
