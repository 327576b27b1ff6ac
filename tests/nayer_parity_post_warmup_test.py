"""nayer_parity beyond the warm-up: our two sides differ exactly where NAYER's loop trains the student.

Only our sides run (NAYER's needs torchvision and kornia): the student's BN running statistics
stay put in eval mode, and move from an epoch's second round on in train mode.
"""

import json

import jax

from benchmarks import jax_side, nayer_parity
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import tiny_config


def test_student_bn_drift_only_from_an_epochs_second_round_in_train_mode(
    teacher_dir, table_path, tmp_path, monkeypatch):
  # One CPU device, not the suite's 8 simulated ones: the same rounds, a quarter faster.
  monkeypatch.setattr(jax_side, "make_mesh", lambda: make_mesh(jax.devices("cpu")[:1]))
  config = tiny_config(teacher_dir, table_path, method="nayer")
  assert config.loss.adv > 0 and config.generator.steps == 2
  schedule = nayer_parity.Schedule(warmup_rounds=1, epochs=1, rounds_per_epoch=2)
  results = nayer_parity.compare(
      config, bundle_lib.load_bundle(teacher_dir), embeddings.load_table(table_path),
      ["jax_eval", "jax_train"], [0], schedule, str(tmp_path))
  drift = {side: [r["bn_drift"] for r in runs[0]["rounds"]] for side, runs in results.items()}
  labels = [r["label"] for r in results["jax_eval"][0]["rounds"]]
  assert labels == ["warm-up 1", "epoch 1 round 1", "epoch 1 round 2"]
  assert drift["jax_eval"] == [0.0, 0.0, 0.0]
  assert drift["jax_train"][:2] == [0.0, 0.0] and drift["jax_train"][2] > 0
  # L_adv is recorded beyond the warm-up only; the tables and JSON carry every figure.
  assert [r["step_adv"] is None for r in results["jax_train"][0]["rounds"]] == [True, False, False]
  table = (tmp_path / "parity_post_warmup.md").read_text()
  assert "#### epoch 1 round 2" in table and "| student BN drift | 0 ± 0 |" in table
  saved = json.loads((tmp_path / "parity.json").read_text())
  assert saved["schedule"] == {"warmup_rounds": 1, "epochs": 1, "rounds_per_epoch": 2}
  assert saved["post_warmup_md"] == table.rstrip("\n")
