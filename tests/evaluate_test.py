"""`caedfkd evaluate` on a bundle: accuracy against a reference, logits file, and the real teacher."""

import numpy as np
import pytest
from PIL import Image

from caedfkd_jax.cli import main
from caedfkd_jax.eval import evaluate
from caedfkd_jax.io import bundle as bundle_lib, convert


def _folder(root, n_per_class=3, classes=("a", "b")):
  rng = np.random.default_rng(0)
  for k, name in enumerate(classes):
    d = root / "test" / name
    d.mkdir(parents=True)
    for i in range(n_per_class):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
  return root


def test_cli_matches_reference_accuracy_and_writes_logits(tmp_path, capsys):
  data = _folder(tmp_path / "data")
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 2, 32)
  bundle_lib.save_bundle(str(tmp_path / "m"), spec, bundle_lib.init_variables(spec, 3))
  out = tmp_path / "logits.npz"
  assert main.main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data),
                    "--batch-size", "4", "--logits", str(out)]) == 0
  saved = np.load(out)
  np.testing.assert_array_equal(saved["labels"], [0, 0, 0, 1, 1, 1])
  b = bundle_lib.load_bundle(str(tmp_path / "m"))
  images = np.stack([np.asarray(Image.open(p)) for p in sorted((data / "test").glob("*/*.png"))])
  x = (images / 255.0 - np.array(spec.mean)) / np.array(spec.std)
  ref = np.asarray(b.model.apply(b.variables, x.astype(np.float32), train=False)[0])
  np.testing.assert_allclose(saved["logits"], ref, rtol=1e-4, atol=1e-5)
  top1 = np.mean(ref.argmax(-1) == saved["labels"]) * 100
  assert f"top-1 {top1:.2f}%" in capsys.readouterr().out


def test_class_count_mismatch_is_one_clear_error(tmp_path, capsys):
  data = _folder(tmp_path / "data")
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, 32)
  bundle_lib.save_bundle(str(tmp_path / "m"), spec, bundle_lib.init_variables(spec))
  assert main.main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(data)]) == 2
  assert "10 classes but the data has 2" in capsys.readouterr().err


@pytest.mark.slow
def test_converted_resnet56_scores_8320_on_the_cifar10_jpegs(teachers_dir, cifar10_dir, tmp_path):
  src = next(teachers_dir.glob("resnet56-*.th"))
  out = convert.convert_checkpoint(str(src), "resnet56", 10, "akamaster", str(tmp_path / "t"))
  from caedfkd_jax.io import data
  result = evaluate.evaluate_bundle(bundle_lib.load_bundle(str(out)), data.load_dataset(str(cifar10_dir)),
                                    progress=False)
  assert abs(result["correct"] - 8320) <= 2, result["top1"]
