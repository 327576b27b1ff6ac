"""`caedfkd transfer` end to end (cli/transfer.py through cli/main.py): procedural NYUv2-layout
scenes and a tiny random bundle, seeds and their table, predictions, read-back reruns, task
subsets, budgeted seeds that resume (and refuse other settings), one-line refusals, and
ADE20K-style segmentation folders.

The suite runs on 8 simulated CPU devices (conftest.py), over which every batch is split: batch
sizes here are multiples of 8."""

import contextlib
import io
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image

from caedfkd_jax.cli import main
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.transfer import procedural_nyu as pn

ARCH = "resnet_tiny_a"   # The smallest CIFAR ResNet: total stride 4.
SIZE = 32
NUM_TRAIN, NUM_VAL = 8, 4
METRICS = {"segmentation": {"miou", "pixel_acc", "classes_counted"},
           "depth": {"abs_err", "rel_err"},
           "normal": {"mean_angle", "median_angle", "within_11.25", "within_22.5", "within_30"}}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> str:
  directory = str(tmp_path_factory.mktemp("bundle") / "tiny")
  spec = bundle_lib.ModelSpec(ARCH, 10, 32)   # ImageNet mean / std, ModelSpec's defaults.
  bundle_lib.save_bundle(directory, spec, bundle_lib.init_variables(spec, 0))
  return directory


@pytest.fixture(scope="module")
def nyu_dir(tmp_path_factory) -> str:
  cifar = SHARED_DATA / "cifar10"
  if not cifar.exists():
    pytest.skip(f"{cifar} is absent: this test needs the project's shared data "
                "(set CAEDFKD_SHARED_DATA to its location)")
  root = str(tmp_path_factory.mktemp("nyu") / "nyu")
  pn.make_dataset(root, NUM_TRAIN, NUM_VAL, SIZE, SIZE, str(cifar), seed=0)
  return root


def _run(capsys, argv):
  """(exit code, stdout, stderr) of `caedfkd ARGV`; argparse's errors exit, so they are caught."""
  try:
    code = main.main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _transfer(model, data, out, *extra):
  return ["transfer", "--model", model, "--data", data, "--out", str(out), "--no-progress",
          "--batch-size", "8", *extra]


def _one_error_line(capsys, argv) -> str:
  code, _, err = _run(capsys, argv)
  lines = [line for line in err.splitlines() if line.strip()]
  assert code == 2 and len(lines) == 1, (code, err)
  assert lines[0].startswith("caedfkd transfer: error:"), lines[0]
  return lines[0]


def _results(out) -> dict:
  with open(os.path.join(out, "results.json")) as f:
    return json.load(f)


# ---------------------------------------------------------------------------
# NYUv2 layout, end to end.


@pytest.fixture(scope="module")
def frozen_run(bundle_dir, nyu_dir, tmp_path_factory):
  """Two frozen seeds of one epoch with predictions: (out, argv, code, stdout, stderr)."""
  out = tmp_path_factory.mktemp("frozen") / "out"
  argv = _transfer(bundle_dir, nyu_dir, out, "--protocol", "frozen", "--epochs", "1",
                   "--seeds", "0-1", "--predictions")
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
    code = main.main(argv)
  return out, argv, code, stdout.getvalue(), stderr.getvalue()


def test_frozen_two_seeds_table_results_predictions_and_read_back(frozen_run, capsys):
  out, argv, code, stdout, err = frozen_run
  assert code == 0, err
  rows = [line.split() for line in stdout.splitlines()]
  header = next(r for r in rows if r[:2] == ["seed", "mIoU"])
  assert "mIoU" in header and "abs" in header and "<11.25°" in header, stdout
  assert any(r[:1] == ["0"] and len(r) > 9 for r in rows), stdout
  assert any(r[:1] == ["1"] and len(r) > 9 for r in rows), stdout
  mean_row = [line for line in stdout.splitlines() if line.lstrip().startswith("mean ± std")]
  assert len(mean_row) == 1 and mean_row[0].count("±") == 1 + 9, mean_row

  report = _results(out)
  assert report["seeds"] == [0, 1] and report["unfinished_seeds"] == []
  assert report["settings"]["protocol"] == "frozen" and report["settings"]["head"] is None
  assert report["settings"]["num_classes"] == 11 and len(report["class_names"]) == 11
  for result in report["results"]:
    assert result["steps"] == NUM_TRAIN // 8
    for task, names in METRICS.items():
      assert set(result[task]) == names, (task, result[task])
      assert all(np.isfinite(v) for v in result[task].values())
    assert 0 <= result["segmentation"]["miou"] <= 1
  assert set(report["summary"]) == set(METRICS)
  mious = [r["segmentation"]["miou"] for r in report["results"]]
  np.testing.assert_allclose(report["summary"]["segmentation"]["miou"]["mean"], np.mean(mious))

  seed0 = out / "seed_0"
  with Image.open(seed0 / "predictions.png") as png:
    png.load()
    assert png.mode == "RGB" and png.size[0] > png.size[1] > 0
  shapes = {k: np.load(seed0 / "predictions" / f"{k}.npy").shape for k in METRICS}
  assert shapes == {"segmentation": (NUM_VAL, SIZE, SIZE), "depth": (NUM_VAL, SIZE, SIZE, 1),
                    "normal": (NUM_VAL, SIZE, SIZE, 3)}
  seg = np.load(seed0 / "predictions" / "segmentation.npy")
  assert seg.min() >= 0 and seg.max() < 11
  normal = np.load(seed0 / "predictions" / "normal.npy")
  np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1, atol=1e-4)

  # The same command again reads the finished seeds back: no training, the same numbers.
  stamp = os.path.getmtime(seed0 / "predictions.png")
  code, stdout, err = _run(capsys, argv)
  assert code == 0, err
  assert "steps in" not in stdout and "scoring" not in stdout, stdout
  again = _results(out)
  assert again["results"] == report["results"] and again["summary"] == report["summary"]
  assert os.path.getmtime(seed0 / "predictions.png") == stamp


def test_a_finished_seed_is_not_read_back_under_other_settings(frozen_run, tmp_path, capsys):
  out, argv, code, _, err = frozen_run
  assert code == 0, err
  copy = tmp_path / "out"   # The seeds' folders hold no path of their own: a copy resumes.
  shutil.copytree(out, copy)
  argv = [str(copy) if a == str(out) else a for a in argv]
  line = _one_error_line(capsys, argv + ["--lr", "0.001"])
  assert "learning_rate: 0.0001 -> 0.001" in line, line


def test_finetune_deeplabv3_one_epoch(bundle_dir, nyu_dir, tmp_path, capsys):
  out = tmp_path / "out"
  code, stdout, err = _run(capsys, _transfer(
      bundle_dir, nyu_dir, out, "--head", "deeplabv3", "--head-features", "8", "--aspp-rates",
      "1,2,3", "--epochs", "1", "--tasks", "segmentation,depth"))   # Two heads: cheaper.
  assert code == 0, err
  report = _results(out)
  assert report["settings"]["protocol"] == "finetune" and report["settings"]["head"] == "deeplabv3"
  assert report["settings"]["aspp_rates"] == [1, 2, 3]
  result = report["results"][0]
  assert report["seeds"] == [0] and result["steps"] == 1
  assert {"segmentation", "depth"} <= set(result) and "normal" not in result
  assert "finetune, deeplabv3 heads" in stdout
  losses = result["last_epoch_losses"]
  assert set(losses) == {"loss", "segmentation", "depth"}
  assert all(np.isfinite(v) for v in losses.values())


def test_budgeted_segmentation_only_seed_resumes_and_refuses_other_settings(
    bundle_dir, nyu_dir, tmp_path, capsys):
  """--tasks segmentation trains one head; a seed stopped by its time budget is checkpointed
  (exit 3), resumed by the same command without the budget, and refused under another --lr."""
  out = tmp_path / "out"
  argv = _transfer(bundle_dir, nyu_dir, out, "--protocol", "frozen", "--epochs", "2",
                   "--tasks", "segmentation")
  code, stdout, err = _run(capsys, argv + ["--time-budget-minutes", "0.0001"])
  assert code == 3, (stdout, err)
  assert "seed 0 is checkpointed, not finished" in err
  assert "time budget" in stdout and "at step 1 of 2" in stdout, stdout
  assert not os.path.exists(out / "results.json")
  assert not os.path.exists(out / "seed_0" / "result.json")
  assert os.listdir(out / "seed_0" / "checkpoints")

  line = _one_error_line(capsys, argv + ["--lr", "0.001"])
  assert "learning_rate: 0.0001 -> 0.001" in line and "other settings" in line, line
  assert "time_budget" not in line

  code, stdout, err = _run(capsys, argv)
  assert code == 0, err
  assert "resumed at step 1 of 2" in stdout, stdout
  report = _results(out)
  result = report["results"][0]
  assert result["steps"] == 2 and report["settings"]["tasks"] == ["segmentation"]
  assert "segmentation" in result and "depth" not in result and "normal" not in result
  assert set(result["last_epoch_losses"]) == {"loss", "segmentation"}
  assert set(report["summary"]) == {"segmentation"}
  assert "abs err" not in stdout and "mIoU" in stdout


# ---------------------------------------------------------------------------
# Refusals: one line on stderr, exit code 2.


def _write_nyu(root: pathlib.Path, h: int = 8, w: int = 8, label: float = 1.0) -> str:
  """A valid tiny MTAN layout (as tests/transfer_data_test.py): grey images, one label, depth
  2 m, normals facing the camera; 8 examples a split."""
  arrays = {"image": np.full((h, w, 3), 0.5, np.float32),
            "label": np.full((h, w), label, np.float32),
            "depth": np.full((h, w, 1), 2.0, np.float32),
            "normal": np.tile(np.float32([0, 0, 1]), (h, w, 1))}
  for split in ("train", "val"):
    for kind, array in arrays.items():
      (root / split / kind).mkdir(parents=True, exist_ok=True)
      for n in range(8):
        np.save(root / split / kind / f"{n}.npy", array)
  return str(root)


def test_labels_outside_the_classes_are_refused(bundle_dir, tmp_path, capsys):
  data = _write_nyu(tmp_path / "nyu", label=13.0)
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out"))
  assert "label 13 is outside [-1, 13)" in line and "--num-classes" in line, line
  data = _write_nyu(tmp_path / "nyu5", label=5.0)
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out",
                                           "--num-classes", "4"))
  assert "label 5 is outside [-1, 4)" in line, line
  assert not os.path.exists(tmp_path / "out")


def test_a_missing_subfolder_is_refused(bundle_dir, tmp_path, capsys):
  data = _write_nyu(tmp_path / "nyu")
  shutil.rmtree(os.path.join(data, "train", "depth"))
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out"))
  assert "no depth folder" in line and os.path.join("nyu", "train") in line, line


def test_tfds_nyu_depth_v2_is_refused(bundle_dir, tmp_path, capsys):
  line = _one_error_line(capsys, _transfer(bundle_dir, "tfds:nyu_depth_v2", tmp_path / "out"))
  assert "depth only" in line and "{train,val}/{image,label,depth,normal}" in line, line


@pytest.mark.parametrize("seeds,words", [("1,1", "distinct seeds"), ("x", "0, 0,1,2 or 0-2")])
def test_bad_seeds_are_refused(bundle_dir, tmp_path, capsys, seeds, words):
  line = _one_error_line(capsys, _transfer(bundle_dir, str(tmp_path), tmp_path / "out",
                                           "--seeds", seeds))
  assert words in line, line


def test_tasks_without_segmentation_are_refused(bundle_dir, tmp_path, capsys):
  data = _write_nyu(tmp_path / "nyu")
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out", "--tasks", "depth"))
  assert "segmentation is always trained" in line, line
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out",
                                           "--tasks", "segmentation,edges"))
  assert "this data has segmentation, depth, normal" in line, line


def test_a_size_the_output_stride_does_not_divide_is_refused(bundle_dir, tmp_path, capsys):
  data = _write_nyu(tmp_path / "nyu", h=8, w=10)   # resnet_tiny_a: total stride 4.
  line = _one_error_line(capsys, _transfer(bundle_dir, data, tmp_path / "out"))
  assert "images of 8x10" in line and "output stride 4 must divide" in line, line
  assert "e.g. 8x8" in line, line


# ---------------------------------------------------------------------------
# Segmentation folders.


def test_segmentation_folders_train_one_frozen_epoch(bundle_dir, tmp_path, capsys):
  root = tmp_path / "seg"
  rng = np.random.default_rng(0)
  for split, count in (("training", 8), ("validation", 2)):
    for n in range(count):
      mask = np.zeros((16, 16), np.uint8)            # 0: ignored.
      mask[2:, :6], mask[2:, 6:11], mask[2:, 11:] = 1, 2, 3
      image = np.stack([mask * 60, 255 - mask * 60, rng.integers(0, 256, (16, 16))],
                       -1).astype(np.uint8)
      for folder, array, ext in (("images", image, "jpg"), ("annotations", mask, "png")):
        (root / folder / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / folder / split / f"s{n}.{ext}")
  names = tmp_path / "names.txt"
  names.write_text("wall\nfloor\nsky\n")
  out = tmp_path / "out"
  code, stdout, err = _run(capsys, _transfer(
      bundle_dir, str(root), out, "--protocol", "frozen", "--epochs", "1",
      "--class-names", str(names), "--augment"))   # mmsegmentation's resize-crop and flip
  assert code == 0, err
  assert _results(out)["settings"]["augment"] is True
  assert "segmentation; 8 train / 2 val images of 16x16, 3 classes" in stdout, stdout
  report = _results(out)
  assert report["class_names"] == ["wall", "floor", "sky"]
  assert report["settings"]["tasks"] == ["segmentation"]
  result = report["results"][0]
  assert set(result) == {"seed", "steps", "train_seconds", "last_epoch_losses", "segmentation"}
  assert set(result["segmentation"]) == METRICS["segmentation"]
  assert result["segmentation"]["classes_counted"] >= 1
  assert os.path.isfile(out / "seed_0" / "predictions.png")
