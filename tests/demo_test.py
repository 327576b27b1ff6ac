"""`caedfkd demo` reruns: same arguments resume, changed ones are refused, --fresh starts over;
and a run whose time ran out before any synthetic image was saved still ends well.

Teacher training and distillation are replaced by stand-ins that write what the real ones
write, so these tests check the demo's own logic in seconds.
"""

import json
import os

import jax
import numpy as np
import pytest

from caedfkd_jax.cli import demo
from caedfkd_jax.cli.main import main
from caedfkd_jax.engine import train
from caedfkd_jax.io import bundle as bundle_lib


def _cheap_variables(spec, seed):
  """Random variables of the right shapes: eager `init_variables` takes half a minute on 2 cores."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: bundle_lib.init_variables(spec, seed))
  return jax.tree.map(lambda s: np.abs(rng.normal(size=s.shape)).astype(s.dtype) * 0.1, shapes)


@pytest.fixture
def fake_runs(monkeypatch):
  """Records the calls; `calls["samples"]`/`calls["eval"]` choose what the distillation writes."""
  calls = {"teacher": [], "distill": [], "samples": True, "eval": True}

  def train_teacher(x_train, y_train, spec, epochs, seed):
    calls["teacher"].append((epochs, seed))
    return _cheap_variables(spec, seed)

  def train_and_evaluate(config, workdir):
    calls["distill"].append((config.seed, config.time_budget_minutes, workdir))
    calls["method"] = config.method
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      if calls["eval"]:
        f.write(json.dumps({"epoch": 2, "eval/top1": 42.0, "time/minutes": 0.5}) + "\n")
    if calls["samples"]:
      os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
      open(os.path.join(workdir, "samples", "epoch_0001.png"), "wb").close()
    spec = bundle_lib.ModelSpec("resnet8", 10, demo.IMAGE_SIZE)
    student = bundle_lib.save_bundle(os.path.join(workdir, "student"), spec,
                                     _cheap_variables(spec, 0))
    return {"student": student}

  monkeypatch.setattr(demo, "train_teacher", train_teacher)
  monkeypatch.setattr(train, "train_and_evaluate", train_and_evaluate)
  return calls


def _demo(workdir, *flags):
  return main(["demo", "--workdir", str(workdir), "--minutes", "0.1", *flags])


def test_rerun_with_the_same_arguments_resumes(fake_runs, tmp_path, capsys):
  assert _demo(tmp_path / "w", "--teacher-epochs", "3", "--seed", "1") == 0
  teacher = bundle_lib.load_bundle(str(tmp_path / "w" / "teacher")).variables
  assert json.loads((tmp_path / "w" / "demo.json").read_text()) == {"teacher_epochs": 3, "seed": 1}
  # --minutes may change: it is the time budget, not part of what the run computes.
  assert main(["demo", "--workdir", str(tmp_path / "w"), "--minutes", "0.2",
               "--teacher-epochs", "3", "--seed", "1"]) == 0
  assert fake_runs["teacher"] == [(3, 1)]  # the teacher is trained once, then reused
  distill = str(tmp_path / "w" / "distill")
  assert fake_runs["distill"] == [(1, 0.1, distill), (1, 0.2, distill)]
  again = bundle_lib.load_bundle(str(tmp_path / "w" / "teacher")).variables
  np.testing.assert_array_equal(again["params"]["linear"]["kernel"],
                                teacher["params"]["linear"]["kernel"])
  assert "synthetic digits: " + os.path.join(distill, "samples", "epoch_0001.png") in (
      capsys.readouterr().out)


@pytest.mark.parametrize("flags,changed", [
    (["--teacher-epochs", "5"], "--teacher-epochs 3 -> 5"),
    (["--teacher-epochs", "3", "--seed", "2"], "--seed 0 -> 2"),
    (["--seed", "2"], "--teacher-epochs 3 -> 30, --seed 0 -> 2"),
    (["--teacher-epochs", "3", "--method", "nayer"], "--method cae_dfkd -> nayer"),
])
def test_changed_arguments_are_refused(flags, changed, fake_runs, tmp_path, capsys):
  assert _demo(tmp_path / "w", "--teacher-epochs", "3") == 0
  capsys.readouterr()
  assert _demo(tmp_path / "w", *flags) == 2
  err = capsys.readouterr().err
  assert err == (f"caedfkd demo: error: --workdir {tmp_path / 'w'} holds a demo run with other "
                 f"arguments ({changed}); pass --fresh to delete that run and start over, or use "
                 "another --workdir.\n")
  assert fake_runs["teacher"] == [(3, 0)] and len(fake_runs["distill"]) == 1
  assert json.loads((tmp_path / "w" / "demo.json").read_text()) == {"teacher_epochs": 3, "seed": 0}


def test_method_reaches_the_run_and_is_recorded(fake_runs, tmp_path):
  assert _demo(tmp_path / "w", "--teacher-epochs", "3", "--method", "nayer") == 0
  assert fake_runs["method"] == "nayer"
  assert json.loads((tmp_path / "w" / "demo.json").read_text()) == {
      "teacher_epochs": 3, "seed": 0, "method": "nayer"}


def test_fresh_deletes_the_old_run_and_starts_over(fake_runs, tmp_path):
  assert _demo(tmp_path / "w", "--teacher-epochs", "3") == 0
  (tmp_path / "w" / "distill" / "old_checkpoint").mkdir()
  (tmp_path / "w" / "mine.txt").write_text("not the demo's")
  assert _demo(tmp_path / "w", "--teacher-epochs", "4", "--seed", "1", "--fresh") == 0
  assert fake_runs["teacher"] == [(3, 0), (4, 1)]
  assert not (tmp_path / "w" / "distill" / "old_checkpoint").exists()
  assert (tmp_path / "w" / "mine.txt").read_text() == "not the demo's"
  assert json.loads((tmp_path / "w" / "demo.json").read_text()) == {"teacher_epochs": 4, "seed": 1}


def test_unrecorded_earlier_run_is_refused(fake_runs, tmp_path, capsys):
  (tmp_path / "w" / "distill").mkdir(parents=True)
  assert _demo(tmp_path / "w") == 2
  assert "holds a demo run whose arguments were not recorded; pass --fresh" in (
      capsys.readouterr().err)
  assert fake_runs["teacher"] == [] and not (tmp_path / "w" / "demo.json").exists()


def test_time_out_before_any_sample_or_evaluation(fake_runs, tmp_path, capsys):
  """--minutes too short for the warm-up: no samples/, no eval rows; the demo still ends well."""
  fake_runs["samples"] = fake_runs["eval"] = False
  assert _demo(tmp_path / "w", "--teacher-epochs", "1") == 0
  out = capsys.readouterr().out
  assert "synthetic digits: none saved yet" in out and "rerun with a larger --minutes" in out
  assert (tmp_path / "w" / "student_accuracy.png").stat().st_size > 0


def test_plot_without_a_metrics_file(tmp_path):
  demo.plot_accuracy(str(tmp_path / "missing.jsonl"), 90.0, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 0
