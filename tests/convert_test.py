"""PyTorch -> Flax conversion: parity with the real akamaster teachers, the naming
rule, and one clear refusal per kind of bad input (nothing in a file ever runs)."""

import hashlib
import os
import pickle
import re

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from caedfkd_jax.cli.main import main
from caedfkd_jax.io import bundle as bundle_lib, class_names, convert

# Stage sizes of the akamaster ResNets; resnet_tiny_a is 1 block a stage, width 4.
AKAMASTER = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}
PARAM_COUNTS = {"resnet20": 269_722, "resnet56": 853_018}  # METHOD.md, from the .th files


# --- A minimal PyTorch copy of akamaster/pytorch_resnet_cifar10 (option-A shortcuts).

class _BasicBlockA(nn.Module):

  def __init__(self, in_planes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.pad = planes // 4 if (stride != 1 or in_planes != planes) else None

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.pad is not None:
      x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
    return F.relu(out + x)


class AkamasterResNet(nn.Module):

  def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: int = 16):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    in_planes = width
    for i in range(3):
      planes = width * 2**i
      blocks = []
      for j in range(blocks_per_stage):
        blocks.append(_BasicBlockA(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
        in_planes = planes
      setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
    self.linear = nn.Linear(in_planes, num_classes)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    return self.linear(out.mean(dim=(2, 3)))


def torch_model(arch: str, num_classes: int = 10) -> AkamasterResNet:
  if arch == "resnet_tiny_a":
    return AkamasterResNet(1, num_classes, width=4).eval()
  return AkamasterResNet(AKAMASTER[arch], num_classes).eval()


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
  """Non-trivial BN statistics and affine terms, so parity checks mean something."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
        m.num_batches_tracked.fill_(123)
  return model


def torch_logits(model: nn.Module, x_BxHxWxC: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(x_BxHxWxC).permute(0, 3, 1, 2)).numpy()


def flax_logits(variables, arch: str, num_classes: int, x_BxHxWxC: np.ndarray) -> np.ndarray:
  model = convert.models.create_model(arch, num_classes)
  logits, _ = model.apply(variables, x_BxHxWxC, train=False)
  return np.asarray(logits)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def numpy_state_dict(model: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
  return {prefix + k: v.numpy().copy() for k, v in model.state_dict().items()}


def first_test_images(cifar10_dir, per_class: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """The first JPEG(s) of each class, in [0, 1], and their labels."""
  images, labels = [], []
  for label, name in enumerate(class_names.CIFAR10):
    for file in sorted(os.listdir(cifar10_dir / "test" / name))[:per_class]:
      with Image.open(cifar10_dir / "test" / name / file) as im:
        images.append(np.asarray(im.convert("RGB"), np.float32) / 255.0)
      labels.append(label)
  return np.stack(images), np.array(labels)


def zeros_state_dict(arch: str, num_classes: int) -> dict[str, np.ndarray]:
  """A state dict with the right keys and shapes; enough for the mismatch checks."""
  return {e.torch_key: np.zeros(e.torch_shape, np.float32)
          for e in convert.torch_layout(arch, num_classes) if e.collection}


# --- The naming rule.

@pytest.mark.parametrize("flax_path,torch_path", [
    (("layer1_0", "conv1"), "layer1.0.conv1"),
    (("block1", "layer_0", "bn1"), "block1.layer.0.bn1"),
    (("block2_3",), "block2.3"),
    (("layer1_0", "downsample_0"), "layer1.0.downsample.0"),
    (("shortcut_1",), "shortcut.1"),
    (("features_0_12",), "features.0.12"),
    (("convShortcut",), "convShortcut"),
    (("linear",), "linear"),
])
def test_torch_module_path(flax_path, torch_path):
  assert ".".join(convert.torch_module_path(flax_path)) == torch_path


@pytest.mark.parametrize("arch", ["resnet_tiny_a", "resnet20", "resnet56"])
def test_layout_is_the_pytorch_state_dict(arch):
  """Same keys, shapes and order as PyTorch's own state_dict()."""
  reference = torch_model(arch).state_dict()
  layout = convert.torch_layout(arch, 10)
  assert [e.torch_key for e in layout] == list(reference)
  assert [e.torch_shape for e in layout] == [tuple(v.shape) for v in reference.values()]
  if arch in PARAM_COUNTS:
    params = sum(int(np.prod(e.flax_shape)) for e in layout if e.collection == "params")
    assert params == PARAM_COUNTS[arch]


def test_kernels_are_transposed_as_the_convention_says():
  model = randomized(torch_model("resnet_tiny_a"))
  sd = numpy_state_dict(model)
  variables = convert.state_dict_to_variables(sd, "resnet_tiny_a", 10)
  np.testing.assert_array_equal(variables["params"]["layer2_0"]["conv1"]["kernel"],
                                sd["layer2.0.conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["linear"]["kernel"], sd["linear.weight"].T)
  np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], sd["bn1.weight"])
  np.testing.assert_array_equal(variables["batch_stats"]["layer3_0"]["bn2"]["var"],
                                sd["layer3.0.bn2.running_var"])


def test_variables_round_trip_exactly_and_load_strictly():
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 7)
  variables = jax.device_get(bundle_lib.init_variables(spec, 3))
  sd = convert.variables_to_state_dict(variables, "resnet_tiny_a", 7, prefix="module.")
  assert all(k.startswith("module.") for k in sd)
  tracked = {k: v for k, v in sd.items() if k.endswith("num_batches_tracked")}
  assert len(tracked) == 7 and all(v.dtype == np.int64 and v.shape == () for v in tracked.values())
  back = convert.state_dict_to_variables(sd, "resnet_tiny_a", 7)
  jax.tree.map(np.testing.assert_array_equal, back, variables)
  assert jax.tree.structure(back) == jax.tree.structure(variables)
  torch_model("resnet_tiny_a", 7).load_state_dict(
      {k[len("module."):]: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  assert all(v.flags.writeable for v in sd.values())


def test_split_key_prefix():
  sd = {"module.a.weight": 1, "module.b.bias": 2}
  assert convert.split_key_prefix(sd) == ({"a.weight": 1, "b.bias": 2}, "module.")
  mixed = {"module.a.weight": 1, "b.bias": 2}
  assert convert.split_key_prefix(mixed) == (mixed, "")


# --- Parity.

def test_random_tiny_model_parity():
  """Runs without the shared data: random weights, random BN statistics."""
  model = randomized(torch_model("resnet_tiny_a", 5), seed=1)
  variables = convert.state_dict_to_variables(numpy_state_dict(model), "resnet_tiny_a", 5)
  x = np.random.default_rng(0).normal(size=(6, 32, 32, 3)).astype(np.float32)
  expected = torch_logits(model, x)
  assert relative_error(flax_logits(variables, "resnet_tiny_a", 5, x), expected) < 1e-5


@pytest.mark.parametrize("arch", sorted(AKAMASTER))
def test_real_teacher_parity(arch, teachers_dir, cifar10_dir, tmp_path):
  (src,) = teachers_dir.glob(f"{arch}-*.th")
  out = convert.convert_checkpoint(src, arch, 10, "akamaster", tmp_path / arch)
  loaded = bundle_lib.load_bundle(out)
  assert loaded.spec.extra == {
      "source": src.name, "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
      "preset": "akamaster", "key_prefix": "module."}
  assert loaded.spec.class_names == class_names.CIFAR10
  assert (loaded.spec.mean, loaded.spec.std) == (bundle_lib.IMAGENET_MEAN, bundle_lib.IMAGENET_STD)

  reference = torch_model(arch)
  checkpoint = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
  reference.load_state_dict({k[len("module."):]: v for k, v in checkpoint.items()})
  images01, labels = first_test_images(cifar10_dir)
  noise01 = np.random.default_rng(0).uniform(size=(6, 32, 32, 3)).astype(np.float32)
  x = np.asarray(loaded.normalize(np.concatenate([images01, noise01])))

  expected = torch_logits(reference, x)
  got = flax_logits(loaded.variables, arch, 10, x)
  assert relative_error(got, expected) < 1e-4
  np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))
  # A trained teacher (~81% on these JPEGs), so the weights and normalisation are right.
  assert (got[:10].argmax(-1) == labels).sum() >= 7


# --- What the file may hold.

@pytest.mark.parametrize("wrap", ["bare", "state_dict", "model"])
def test_accepted_layouts(wrap, tmp_path):
  model = randomized(torch_model("resnet_tiny_a"))
  sd = model.state_dict()
  obj = {"bare": sd, "state_dict": {"state_dict": sd, "best_prec1": 91.0, "epoch": 3},
         "model": {"model": sd, "arch": "resnet_tiny_a"}}[wrap]
  torch.save(obj, tmp_path / "ckpt.pt")
  loaded = convert.load_torch_state_dict(tmp_path / "ckpt.pt")
  assert list(loaded) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(loaded[k], v.numpy())


def test_legacy_format_and_bfloat16(tmp_path):
  model = randomized(torch_model("resnet_tiny_a"))
  sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
  torch.save({"state_dict": sd}, tmp_path / "old.th", _use_new_zipfile_serialization=False)
  variables = convert.state_dict_to_variables(
      convert.load_torch_state_dict(tmp_path / "old.th"), "resnet_tiny_a", 10)
  kernel = variables["params"]["conv1"]["kernel"]
  assert kernel.dtype == np.float32
  np.testing.assert_array_equal(kernel, sd["conv1.weight"].float().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("num_classes,mean,names", [
    (10, bundle_lib.CIFAR10_MEAN, class_names.CIFAR10),
    (100, bundle_lib.CIFAR100_MEAN, class_names.CIFAR100),
])
def test_dfkd_preset_picks_dataset_statistics(num_classes, mean, names, tmp_path):
  torch.save({"state_dict": randomized(torch_model("resnet_tiny_a", num_classes)).state_dict()},
             tmp_path / "t.pth")
  spec = bundle_lib.load_bundle(convert.convert_checkpoint(
      tmp_path / "t.pth", "resnet_tiny_a", num_classes, "dfkd", tmp_path / "b")).spec
  assert spec.mean == mean and spec.class_names == names and spec.image_size == 32
  assert spec.extra["key_prefix"] == "" and spec.extra["preset"] == "dfkd"


# --- Bad inputs: each refused with one message that names the problem.

def test_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
    convert.load_torch_state_dict(tmp_path / "nope.pt")


@pytest.mark.parametrize("damage", ["random_bytes", "truncated_zip", "truncated_legacy", "empty"])
def test_corrupt_file(damage, tmp_path):
  path = tmp_path / "bad.pt"
  if damage == "random_bytes":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif damage == "empty":
    path.write_bytes(b"")
  else:
    torch.save(torch_model("resnet_tiny_a").state_dict(), path,
               _use_new_zipfile_serialization=(damage == "truncated_zip"))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="bad.pt is not a readable PyTorch checkpoint") as e:
    convert.load_torch_state_dict(path)
  assert "weights_only` set to `False`" not in str(e.value)  # never advise unsafe loading


class _WritesMarker:
  """Unpickling this creates a file: the stand-in for code hidden in a checkpoint."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_pickle_that_would_run_code_is_refused(container, tmp_path):
  marker = tmp_path / "marker"
  payload = {"state_dict": {"conv1.weight": _WritesMarker(str(marker))}}
  path = tmp_path / "evil.pt"
  if container == "torch_zip":
    torch.save(payload, path)
  else:
    path.write_bytes(pickle.dumps(payload, protocol=2))
  # The payload is live: plain unpickling would create the marker (here a control one).
  control = tmp_path / "control"
  pickle.loads(pickle.dumps(_WritesMarker(str(control)), protocol=2)).close()
  assert control.exists()

  with pytest.raises(ValueError, match=r"evil.pt was refused: .*execute code.*never run"):
    convert.load_torch_state_dict(path)
  assert not marker.exists()


def test_not_a_state_dict(tmp_path):
  torch.save([1, 2, 3], tmp_path / "list.pt")
  with pytest.raises(ValueError, match="holds a list, not a state dict"):
    convert.load_torch_state_dict(tmp_path / "list.pt")
  torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
  with pytest.raises(ValueError, match=r"holds no tensors.*epoch"):
    convert.load_torch_state_dict(tmp_path / "no_tensors.pt")


def test_wrong_arch_lists_the_differences_and_names_the_fitting_arch():
  sd = zeros_state_dict("resnet20", 10)
  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, "resnet32", 10)
  message = str(e.value)
  assert "does not fit --arch resnet32" in message
  assert "missing from the checkpoint (60): layer1.3.conv1.weight" in message
  assert "... and 50 more" in message
  assert re.search(r"the checkpoint fits --arch (.* or )?resnet20\b", message)

  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, "resnet_tiny_a", 10)
  assert "conv1.weight (16, 3, 3, 3) vs (4, 3, 3, 3)" in str(e.value)
  assert "not in the model (" in str(e.value)
  assert re.search(r"the checkpoint fits --arch (.* or )?resnet20\b", str(e.value))


def test_wrong_class_count():
  sd = zeros_state_dict("resnet_tiny_a", 10)
  with pytest.raises(ValueError, match="the checkpoint has 10 classes, not the --num-classes "
                     r"100 given \(linear.weight has shape \(10, 16\)\)"):
    convert.state_dict_to_variables(sd, "resnet_tiny_a", 100)


def test_missing_and_unexpected_keys():
  sd = zeros_state_dict("resnet_tiny_a", 10)
  del sd["layer2.0.bn1.running_var"]
  sd["layer2.0.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as e:
    convert.state_dict_to_variables(sd, "resnet_tiny_a", 10)
  assert "missing from the checkpoint (1): layer2.0.bn1.running_var" in str(e.value)
  assert "not in the model (1): layer2.0.extra.weight" in str(e.value)
  assert "fits --arch" not in str(e.value)  # no arch fits; no false hint


def test_non_float_weights_are_refused():
  sd = zeros_state_dict("resnet_tiny_a", 10)
  sd["bn1.weight"] = np.zeros(4, np.int32)
  with pytest.raises(ValueError, match="non-float tensors .*bn1.weight"):
    convert.state_dict_to_variables(sd, "resnet_tiny_a", 10)


def test_unknown_preset_and_class_count():
  with pytest.raises(ValueError, match="unknown preset 'imagenet'"):
    convert.get_preset("imagenet")
  with pytest.raises(ValueError, match="not 7"):
    convert.get_preset("dfkd").normalization(7)


# --- The command line.

def test_cli_converts_and_summarises(tmp_path, capsys):
  torch.save({"state_dict": randomized(torch_model("resnet_tiny_a")).state_dict()},
             tmp_path / "t.th")
  assert main(["convert", str(tmp_path / "t.th"), "--arch", "resnet_tiny_a",
               "--num-classes", "10", "--out", str(tmp_path / "bundle")]) == 0
  out = capsys.readouterr().out
  digest = hashlib.sha256((tmp_path / "t.th").read_bytes()).hexdigest()
  params = sum(p.numel() for p in torch_model("resnet_tiny_a").parameters())
  assert f"{params:,} parameters" in out and digest in out and str(tmp_path / "bundle") in out
  assert bundle_lib.load_bundle(str(tmp_path / "bundle")).spec.extra["source_sha256"] == digest


@pytest.mark.parametrize("problem,expected", [
    ("missing_file", "does not exist"),
    ("wrong_classes", "the checkpoint has 10 classes, not the --num-classes 100 given"),
    ("bad_arch", "Unknown arch 'resnet21'"),
])
def test_cli_bad_input_exits_2(problem, expected, tmp_path, capsys):
  src = tmp_path / "t.th"
  if problem != "missing_file":
    torch.save(torch_model("resnet_tiny_a").state_dict(), src)
  arch = "resnet21" if problem == "bad_arch" else "resnet_tiny_a"
  classes = "100" if problem == "wrong_classes" else "10"
  rc = main(["convert", str(src), "--arch", arch, "--num-classes", classes,
             "--out", str(tmp_path / "bundle")])
  err = capsys.readouterr().err
  assert rc == 2
  assert err.startswith("caedfkd convert: error: ") and expected in err
  assert "Traceback" not in err
  assert not (tmp_path / "bundle").exists()


def test_cli_refuses_to_overwrite_a_bundle_unless_asked(tmp_path, capsys):
  src, out = tmp_path / "t.th", tmp_path / "bundle"
  torch.save(randomized(torch_model("resnet_tiny_a"), seed=2).state_dict(), src)
  spec = bundle_lib.ModelSpec("resnet_tiny_a", 10, extra={"mine": True})
  old = jax.device_get(bundle_lib.init_variables(spec, 0))
  bundle_lib.save_bundle(str(out), spec, old)
  argv = ["convert", str(src), "--arch", "resnet_tiny_a", "--num-classes", "10", "--out", str(out)]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert err == (f"caedfkd convert: error: --out {out} exists; pass --overwrite to replace it "
                 "(or choose another --out).\n")
  kept = bundle_lib.load_bundle(str(out))
  assert kept.spec.extra == {"mine": True}
  jax.tree.map(np.testing.assert_array_equal, kept.variables, old)
  assert main(argv + ["--overwrite"]) == 0
  replaced = bundle_lib.load_bundle(str(out))
  assert replaced.spec.extra["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
  np.testing.assert_array_equal(replaced.variables["params"]["linear"]["kernel"],
                                torch.load(src)["linear.weight"].numpy().T)
