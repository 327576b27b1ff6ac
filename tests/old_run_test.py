"""A run and bundles written by an earlier layout of the package still load and resume.

`golden/old_run.tar.gz` (golden/make_old_run.py) was written by the code before the layout
refactor of issue 26: a tiny CAE-DFKD run stopped mid-epoch, its teacher, its table and its
student bundle. Nothing in a checkpoint or a bundle may depend on where a module lives.
"""

import json
import pathlib
import tarfile

import jax
import numpy as np

from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib
from tiny_run import tiny_config

ARCHIVE = pathlib.Path(__file__).parent / "golden" / "old_run.tar.gz"


def _unpack(tmp_path) -> pathlib.Path:
  with tarfile.open(ARCHIVE) as tar:
    tar.extractall(tmp_path, filter="data")
  return tmp_path / "old_run"


def test_old_bundles_load_and_predict(tmp_path):
  root = _unpack(tmp_path)
  for name in ("teacher", "workdir/student"):
    bundle = bundle_lib.load_bundle(str(root / name))
    assert bundle.spec.arch == "resnet_tiny_a" and bundle.spec.class_names == ["c0", "c1", "c2", "c3"]
    x = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype(np.float32)
    logits, _ = bundle.model.apply(bundle.variables, bundle.normalize(x), train=False)
    assert logits.shape == (2, 4) and np.isfinite(np.asarray(logits)).all()
  assert bundle.spec.extra["method"] == "cae_dfkd"


def test_an_old_checkpoint_resumes_mid_epoch_and_finishes(tmp_path, capsys, monkeypatch):
  root = _unpack(tmp_path)
  monkeypatch.chdir(root)   # The saved config's paths are relative to it.
  workdir = root / "workdir"
  old_rows = (workdir / "metrics.jsonl").read_text().splitlines()
  config = tiny_config("teacher", "table.npy")
  config.num_devices = 1
  result = train.train_and_evaluate(config, "workdir")
  out = capsys.readouterr().out
  assert "Resumed from" in out and "at epoch 1, unit 1." in out
  assert result["epoch"] == 3 and not result["stopped_early"]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["epoch"] for r in rows] == [1, 2, 3] and "kd/kl" in rows[2]
  assert (workdir / "metrics.jsonl").read_text().splitlines()[0] == old_rows[0]
  student = bundle_lib.load_bundle(str(workdir / "student"))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(student.variables))
