"""Writes `old_run.tar.gz`: a tiny CAE-DFKD run stopped mid-epoch, by the code of its commit.

The layout refactor (issue 26) moved every module; a checkpoint and a bundle written before it
must still load and resume after it (tests/old_run_test.py). The archive holds the tiny
teacher bundle, the embedding table and the run's workdir (checkpoints, metrics.jsonl, the
student bundle), stopped after the warm-up epoch and one more unit. Written once, by the
pre-move code (commit message says which); regenerating it with later code would test nothing.

  python tests/golden/make_old_run.py
"""

import os
import pathlib
import sys
import tarfile
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
ARCHIVE = HERE / "old_run.tar.gz"
STOP_AFTER_UNITS = 3   # The warm-up epoch's two rounds, then one round of epoch 2.


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
  info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
  return info


def main() -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from caedfkd_jax.io import bundle, embeddings
  from caedfkd_jax.engine import train
  from tiny_run import NUM_CLASSES, tiny_config
  names = [f"c{k}" for k in range(NUM_CLASSES)]
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp) / "old_run"
    spec = bundle.ModelSpec("resnet_tiny_a", NUM_CLASSES, 32, class_names=names)
    bundle.save_bundle(str(root / "teacher"), spec, bundle.init_variables(spec, 1))
    vectors = np.random.default_rng(0).normal(size=(NUM_CLASSES, 16)).astype(np.float32)
    embeddings.EmbeddingTable(vectors, names, {"encoder": "test"}).save(str(root / "table.npy"))
    os.chdir(root)   # Relative paths in the saved config: the test resumes from its own copy.
    config = tiny_config("teacher", "table.npy")
    config.num_devices = 1
    config.compilation_cache_dir = ""
    config.max_checkpoints = 1           # The mid-epoch checkpoint alone: a smaller archive.
    config.max_units = STOP_AFTER_UNITS
    result = train.train_and_evaluate(config, "workdir")
    assert result["stopped_early"] and result["epoch"] == 1, result
    os.chdir(HERE)
    with tarfile.open(ARCHIVE, "w:gz") as tar:
      tar.add(root, arcname="old_run", filter=_anonymous)
  print(f"wrote {ARCHIVE} ({ARCHIVE.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
