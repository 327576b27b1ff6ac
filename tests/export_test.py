"""Bundle -> PyTorch/safetensors: convert then export gives back the source zoo's
state dict, bit for bit, and it loads strictly into the PyTorch network."""

import numpy as np
import pytest
import safetensors.numpy
import torch
from torch import nn

from caedfkd_jax.cli.main import main
from caedfkd_jax.io import bundle as bundle_lib, convert, export

# The PyTorch reference model lives with the converter's tests.
from convert_test import randomized, torch_logits, torch_model  # pylint: disable=g-bad-import-order


def read_exported(path, fmt: str) -> dict[str, torch.Tensor]:
  if fmt == "torch":
    return torch.load(path, map_location="cpu", weights_only=True)
  return {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(path)).items()}


def assert_same_state_dict(exported, original):
  """Same keys and values; num_batches_tracked is not kept by Flax and comes back as 0."""
  assert set(exported) == set(original) | {k for k in exported if k.endswith("num_batches_tracked")}
  for k, v in exported.items():
    if k.endswith("num_batches_tracked"):
      assert v.dtype == torch.int64 and v.item() == 0
    else:
      assert v.dtype == original[k].dtype and torch.equal(v, original[k]), k


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_real_teacher_round_trip(fmt, teachers_dir, tmp_path):
  (src,) = teachers_dir.glob("resnet20-*.th")
  original = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
  bundle = convert.convert_checkpoint(src, "resnet20", 10, "akamaster", tmp_path / "b")
  out = export.export_bundle(bundle, fmt, tmp_path / f"r20.{fmt}")
  exported = read_exported(out, fmt)
  assert_same_state_dict(exported, original)  # the `module.` prefix included

  # Strict load into the network as akamaster trained it (DataParallel-wrapped).
  reference, reloaded = torch_model("resnet20"), nn.DataParallel(torch_model("resnet20"))
  reference.load_state_dict({k[len("module."):]: v for k, v in original.items()})
  reloaded.load_state_dict(exported, strict=True)
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(torch_logits(reloaded.module.eval(), x), torch_logits(reference, x))


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_round_trip_without_shared_data(fmt, tmp_path):
  model = randomized(torch_model("resnet_tiny_a", 3), seed=2)
  original = model.state_dict()
  torch.save({"state_dict": original, "epoch": 9}, tmp_path / "t.pth")
  bundle = convert.convert_checkpoint(tmp_path / "t.pth", "resnet_tiny_a", 3, "akamaster",
                                      tmp_path / "b")
  exported = read_exported(export.export_bundle(bundle, fmt, tmp_path / "out" / "t.x"), fmt)
  assert not any(k.startswith("module.") for k in exported)
  assert_same_state_dict(exported, original)
  fresh = torch_model("resnet_tiny_a", 3)
  fresh.load_state_dict(exported, strict=True)
  x = np.random.default_rng(1).normal(size=(3, 32, 32, 3)).astype(np.float32)
  np.testing.assert_array_equal(torch_logits(fresh.eval(), x), torch_logits(model, x))


def test_student_bundle_exports_without_prefix(tmp_path):
  """A bundle made here (no conversion provenance) exports with plain keys."""
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 4)
  variables = bundle_lib.init_variables(spec, 0)
  bundle_lib.save_bundle(str(tmp_path / "student"), spec, variables)
  out = export.export_bundle(tmp_path / "student", "safetensors", tmp_path / "s.safetensors")
  exported = safetensors.numpy.load_file(out)
  np.testing.assert_array_equal(exported["linear.weight"],
                                np.asarray(variables["params"]["linear"]["kernel"]).T)
  with safetensors.safe_open(out, "np") as f:
    assert f.metadata() == {"format": "pt", "arch": "resnet_tiny_a", "num_classes": "4"}


def test_cli_infers_format_from_suffix(tmp_path, capsys):
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 4)
  bundle_lib.save_bundle(str(tmp_path / "b"), spec, bundle_lib.init_variables(spec, 0))
  assert main(["export", str(tmp_path / "b"), "--out", str(tmp_path / "w.pth")]) == 0
  assert "as torch" in capsys.readouterr().out
  assert "linear.weight" in torch.load(tmp_path / "w.pth", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("problem,expected", [
    ("no_bundle", "is not a model bundle: model.json is missing"),
    ("unknown_suffix", "cannot tell the format of"),
])
def test_cli_bad_input_exits_2(problem, expected, tmp_path, capsys):
  directory = tmp_path / "b"
  if problem != "no_bundle":
    spec = bundle_lib.ModelSpec("resnet_tiny_a", 4)
    bundle_lib.save_bundle(str(directory), spec, bundle_lib.init_variables(spec, 0))
  out = tmp_path / ("w.weights" if problem == "unknown_suffix" else "w.pth")
  rc = main(["export", str(directory), "--out", str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and err.startswith("caedfkd export: error: ") and expected in err
  assert not out.exists()
