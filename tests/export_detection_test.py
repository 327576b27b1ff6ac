"""`caedfkd export --format torchvision|detectron2`: ResNet backbones in the key layouts of the
detection/segmentation tools, checked against those tools' published source.

Offline (no torchvision here: its cached wheels need CUDA libraries): the exported keys and
shapes equal torchvision's ResNet state dict and detectron2's names, restated below from
their source, and the weights loaded into a PyTorch restatement of torchvision's ResNet
forward give the Flax stage features and logits. Where torchvision imports, the export also
loads strictly into a Faster R-CNN backbone body and trains one step.
"""

import contextlib
import io
import re

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import torch.nn.functional as F
from torch import nn

from caedfkd_jax import models
from caedfkd_jax.cli.main import main
from caedfkd_jax.io import bundle as bundle_lib, export

TORCHVISION_SKIP = "torchvision cannot be imported here (its wheels need CUDA libraries)"


# ---------------------------------------------------------------------------
# torchvision's ResNet state dict, restated from torchvision/models/resnet.py (0.29.1):
# the stem conv1 (7x7, 64) + bn1 (L197-198), layer1..layer4 of 64/128/256/512 planes
# (L201-204), fc (L206); _make_layer adds downsample = Sequential(conv1x1, norm) to a stage's
# first block when stride != 1 or inplanes != planes * expansion (L239-243); BasicBlock holds
# conv1, bn1, conv2, bn2, downsample (L81-86), Bottleneck conv1..bn3 then downsample (L133-140).
# A BatchNorm2d's state dict: weight, bias, running_mean, running_var, num_batches_tracked.


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
  return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
          (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def torchvision_resnet_layout(bottleneck: bool, layers: tuple[int, ...], num_classes: int,
                              stem_kernel: int = 7) -> list[tuple[str, tuple[int, ...]]]:
  """(key, shape) of torchvision's resnet18/34/50(num_classes) state dict, in its order."""
  expansion = 4 if bottleneck else 1
  out = [("conv1.weight", (64, 3, stem_kernel, stem_kernel))] + _bn("bn1", 64)
  inplanes = 64
  for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
    stride = 1 if i == 0 else 2
    for j in range(blocks):
      p = f"layer{i + 1}.{j}"
      if bottleneck:
        out += [(f"{p}.conv1.weight", (planes, inplanes, 1, 1))] + _bn(f"{p}.bn1", planes)
        out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
        out += [(f"{p}.conv3.weight", (planes * 4, planes, 1, 1))] + _bn(f"{p}.bn3", planes * 4)
      else:
        out += [(f"{p}.conv1.weight", (planes, inplanes, 3, 3))] + _bn(f"{p}.bn1", planes)
        out += [(f"{p}.conv2.weight", (planes, planes, 3, 3))] + _bn(f"{p}.bn2", planes)
      if j == 0 and (stride != 1 or inplanes != planes * expansion):
        out += [(f"{p}.downsample.0.weight", (planes * expansion, inplanes, 1, 1))]
        out += _bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  return out + [("fc.weight", (num_classes, 512 * expansion)), ("fc.bias", (num_classes,))]


R18_LAYOUT = torchvision_resnet_layout(False, (2, 2, 2, 2), 10, stem_kernel=3)  # CIFAR stem
R50_LAYOUT = torchvision_resnet_layout(True, (3, 4, 6, 3), 1000)


def test_restated_layouts_match_torchvision_counts():
  """len(torchvision.models.resnet18().state_dict()) is 122 and resnet50's 320."""
  assert len(R18_LAYOUT) == 122 and len(R50_LAYOUT) == 320
  r50 = dict(R50_LAYOUT)
  assert r50["layer1.0.downsample.0.weight"] == (256, 64, 1, 1)
  assert r50["layer4.0.conv2.weight"] == (512, 512, 3, 3) and r50["fc.weight"] == (1000, 2048)
  assert "layer1.0.downsample.0.weight" not in dict(R18_LAYOUT)


# ---------------------------------------------------------------------------
# Bundles with random weights and BN statistics (so a swapped mean/var would show).


def random_variables(spec: bundle_lib.ModelSpec, seed: int) -> dict:
  shapes = jax.eval_shape(lambda: bundle_lib.init_variables(spec, 0))
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  leaves = []
  for path, leaf in flat:
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if "kernel" in name:  # He-scaled, so activations stay O(1) through 50 layers
      value = rng.normal(size=shape) * np.sqrt(1.0 / np.prod(shape[:-1]))
    elif "scale" in name or "'var'" in name:
      value = rng.uniform(0.5, 1.5, size=shape)
    else:  # bias, mean
      value = rng.normal(size=shape) * 0.1
    leaves.append(value.astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def make_bundle(directory, arch: str, num_classes: int, image_size: int, mean, std, seed=0):
  spec = bundle_lib.ModelSpec(arch, num_classes, image_size, tuple(mean), tuple(std))
  variables = random_variables(spec, seed)
  bundle_lib.save_bundle(str(directory), spec, variables)
  return str(directory), variables


def run_export(*args: str) -> tuple[int, str]:
  stdout = io.StringIO()
  with contextlib.redirect_stdout(stdout):
    rc = main(["export", *args])
  return rc, stdout.getvalue()


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
  """A 224-px, 1000-class resnet50 bundle and its torchvision export."""
  root = tmp_path_factory.mktemp("r50")
  bundle, variables = make_bundle(root / "b", "resnet50", 1000, 224, bundle_lib.IMAGENET_MEAN,
                                  bundle_lib.IMAGENET_STD)
  rc, out = run_export(bundle, "--format", "torchvision", "--out", str(root / "tv.pth"))
  assert rc == 0
  return {"variables": variables, "tv": torch.load(root / "tv.pth", weights_only=True),
          "out_tv": out, "spec": bundle_lib.ModelSpec("resnet50", 1000, 224)}  # ImageNet mean/std


@pytest.fixture(scope="module")
def r18(tmp_path_factory):
  """The DFKD zoo's CIFAR-10 resnet18 (3x3 stem, `shortcut`, `linear`) exported as safetensors."""
  root = tmp_path_factory.mktemp("r18")
  bundle, variables = make_bundle(root / "b", "resnet18", 10, 32, bundle_lib.CIFAR10_MEAN,
                                  bundle_lib.CIFAR10_STD, seed=1)
  rc, out = run_export(bundle, "--format", "torchvision", "--out", str(root / "tv.safetensors"))
  assert rc == 0
  tv = {k: torch.from_numpy(v)
        for k, v in safetensors.numpy.load_file(str(root / "tv.safetensors")).items()}
  return {"variables": variables, "tv": tv, "out_tv": out, "bundle": bundle, "root": root}


# ---------------------------------------------------------------------------
# (a) keys and shapes.


def test_resnet50_torchvision_keys_and_shapes(r50):
  assert [(k, tuple(v.shape)) for k, v in r50["tv"].items()] == R50_LAYOUT  # order too
  assert r50["tv"]["layer3.0.bn2.num_batches_tracked"].dtype == torch.int64
  assert "as torchvision (torch file): 320 tensors" in r50["out_tv"]
  assert "build model = torchvision.models.resnet50(num_classes=1000);" in r50["out_tv"]
  assert "nn.Identity()" not in r50["out_tv"]  # torchvision's own stem: nothing to change


def test_zoo_resnet18_torchvision_keys_and_shapes(r18):
  assert {k: tuple(v.shape) for k, v in r18["tv"].items()} == dict(R18_LAYOUT)
  assert not any("shortcut" in k or k.startswith("linear") for k in r18["tv"])
  out = r18["out_tv"]
  assert "as torchvision (safetensors file): 122 tensors" in out
  assert ("model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False) and model.maxpool = "
          "nn.Identity()") in out
  assert "mean=[125.307, 122.961, " in out  # CIFAR-10's, on 0-255 for mmdet's data_preprocessor
  with safetensors.safe_open(r18["root"] / "tv.safetensors", "np") as f:
    assert f.metadata()["layout"] == "torchvision"


# ---------------------------------------------------------------------------
# (b) torchvision's ResNet forward, restated (torchvision/models/resnet.py: BasicBlock.forward,
# Bottleneck.forward, ResNet._forward_impl), gives the Flax stages and logits.


class TVBasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVBottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TVResNet(nn.Module):
  """torchvision's ResNet; cifar_stem=True is the user's change: conv1 3x3/1, maxpool Identity."""

  def __init__(self, block, layers, num_classes: int, cifar_stem: bool = False):
    super().__init__()
    self.conv1 = (nn.Conv2d(3, 64, 3, 1, 1, bias=False) if cifar_stem
                  else nn.Conv2d(3, 64, 7, 2, 3, bias=False))
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, 2, 1)
    self.inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
      stride = 1 if i == 0 else 2
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      stage = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      stage += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
      setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
    self.fc = nn.Linear(512 * block.expansion, num_classes)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    stages = []
    for i in range(1, 5):
      x = getattr(self, f"layer{i}")(x)
      stages.append(x)
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)), stages


def flax_outputs(arch: str, num_classes: int, variables, x_BxHxWxC: np.ndarray):
  model = models.create_model(arch, num_classes)
  logits, aux = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x_BxHxWxC)
  return np.asarray(logits), [np.asarray(s) for s in aux["stages"]]


def assert_same_outputs(torch_out, flax_out):
  (t_logits, t_stages), (f_logits, f_stages) = torch_out, flax_out
  assert len(t_stages) == len(f_stages) == 4
  for t, f in zip(t_stages, f_stages):
    np.testing.assert_allclose(t.detach().permute(0, 2, 3, 1).numpy(), f, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(t_logits.detach().numpy(), f_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_exported_weights_give_flax_stages_and_logits(arch, r18, r50):
  case, block, layers, classes, size = {
      "resnet18": (r18, TVBasicBlock, (2, 2, 2, 2), 10, 16),
      "resnet50": (r50, TVBottleneck, (3, 4, 6, 3), 1000, 64)}[arch]
  net = TVResNet(block, layers, classes, cifar_stem=arch == "resnet18").eval()
  net.load_state_dict(case["tv"], strict=True)
  x = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    torch_out = net(torch.from_numpy(x).permute(0, 3, 1, 2))
  assert_same_outputs(torch_out, flax_outputs(arch, classes, case["variables"], x))


# ---------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize("arch,expected", [
    ("resnet20", "option-A shortcut subsamples and zero-pads with no parameters"),
    ("resnet8", "3 stages of 16/32/64 channels"),
    ("wrn40_2", "has no torchvision or detectron2 layout"),
    ("vgg8", "has no torchvision or detectron2 layout"),
    ("resnet_tiny_b", "torchvision's widths"),
])
def test_non_torchvision_archs_are_refused(arch, expected):
  with pytest.raises(ValueError, match=re.escape(expected)):
    export.torchvision_depth(arch)


@pytest.mark.parametrize("fmt", export.LAYOUTS)
def test_cli_refuses_akamaster_resnet_in_one_line(fmt, tmp_path, capsys):
  bundle, _ = make_bundle(tmp_path / "b", "resnet_tiny_a", 4, 32, bundle_lib.IMAGENET_MEAN,
                          bundle_lib.IMAGENET_STD)
  out = tmp_path / "w.pth"
  assert main(["export", bundle, "--format", fmt, "--out", str(out)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("caedfkd export: error: resnet_tiny_a has no torchvision or detectron2 "
                        "layout: it is an akamaster CIFAR ResNet") and err.count("\n") == 1
  assert not out.exists()


@pytest.mark.parametrize("fmt,name,expected", [
    ("detectron2", "w.pkl", "give --out"),
    ("detectron2", "w.safetensors", "give --out"),
    ("torchvision", "w.onnx", "cannot tell the file format"),
])
def test_cli_refuses_suffix_the_layout_cannot_write(fmt, name, expected, r18, capsys):
  out = r18["root"] / name
  assert main(["export", r18["bundle"], "--format", fmt, "--out", str(out)]) == 2
  assert expected in capsys.readouterr().err and not out.exists()


# ---------------------------------------------------------------------------
# detectron2: names from detectron2/modeling/backbone/resnet.py: BasicStem.conv1 with its norm
# (L344-352), stages "res2".."res5" (L403), BottleneckBlock's shortcut/conv1/conv2/conv3, each a
# Conv2d with a `norm` (L133-175); FPN keeps the ResNet as `bottom_up` (fpn.py L103) under the
# model's `backbone`; FrozenBatchNorm2d keeps weight, bias, running_mean, running_var
# (layers/batch_norm.py L39-42) and no num_batches_tracked.


def detectron2_resnet50_layout() -> dict[str, tuple[int, ...]]:
  def conv(key, shape):
    norm = {f"{key}.norm.{leaf}": shape[:1]
            for leaf in ("weight", "bias", "running_mean", "running_var")}
    return {f"{key}.weight": shape, **norm}
  keys = conv("stem.conv1", (64, 3, 7, 7))
  inplanes = 64
  for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
    for j in range(blocks):
      p = f"res{i + 2}.{j}"
      if j == 0:
        keys |= conv(f"{p}.shortcut", (planes * 4, inplanes, 1, 1))
      keys |= conv(f"{p}.conv1", (planes, inplanes, 1, 1))
      keys |= conv(f"{p}.conv2", (planes, planes, 3, 3))
      keys |= conv(f"{p}.conv3", (planes * 4, planes, 1, 1))
      inplanes = planes * 4
  return {"backbone.bottom_up." + k: v for k, v in keys.items()}


def published_torchvision_to_d2(key: str) -> str:
  """detectron2's tools/convert-torchvision-to-d2.py renaming (L40-47), restated."""
  if "layer" not in key:
    key = "stem." + key
  for t in (1, 2, 3, 4):
    key = key.replace(f"layer{t}", f"res{t + 1}")
  for t in (1, 2, 3):
    key = key.replace(f"bn{t}", f"conv{t}.norm")
  return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_resnet50_detectron2_names_follow_the_published_rules(r50):
  # From the torchvision export (the CLI's detectron2 file is checked on resnet18 below).
  tv = r50["tv"]
  model = export.detectron2_state_dict({k: v.numpy() for k, v in tv.items()})
  assert {k: tuple(v.shape) for k, v in model.items()} == detectron2_resnet50_layout()
  # Every source tensor used exactly once: the published rule maps each torchvision key but the
  # classifier and the BN counters (no such tensors in detectron2's backbone) onto one key.
  used = {k for k in tv if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
  assert len(used) == len(model) == 265
  for k in used:
    np.testing.assert_array_equal(
        model["backbone.bottom_up." + published_torchvision_to_d2(k)], tv[k].numpy(), err_msg=k)
  notes = " ".join(export.layout_notes("detectron2", r50["spec"], "d2.pth"))
  for line in ("MODEL.WEIGHTS d2.pth", "MODEL.RESNETS.DEPTH 50",
               "MODEL.RESNETS.STRIDE_IN_1X1 False", 'MODEL.PIXEL_MEAN "[123.675, 116.28, 103.53]"',
               'MODEL.PIXEL_STD "[58.395, 57.12, 57.375]"', "INPUT.FORMAT RGB"):
    assert line in notes
  assert "BasicStem" not in notes  # torchvision's stem is detectron2's


def test_detectron2_names_of_the_cifar_resnet18(r18, capsys):
  out = r18["root"] / "d2.pth"
  assert main(["export", r18["bundle"], "--format", "detectron2", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  saved = torch.load(out, weights_only=True)  # a plain dict: nothing in it runs code
  assert set(saved) == {"model", "__author__", "matching_heuristics"}
  assert saved["matching_heuristics"] is False and saved["__author__"] == "caedfkd-jax"
  model = saved["model"]
  assert "as detectron2 (torch file): 100 tensors" in printed
  assert tuple(model["backbone.bottom_up.stem.conv1.weight"].shape) == (64, 3, 3, 3)
  assert tuple(model["backbone.bottom_up.res3.0.shortcut.norm.running_var"].shape) == (128,)
  assert "backbone.bottom_up.res2.0.shortcut.weight" not in model  # 64 -> 64: no projection
  assert len(model) == len(r18["tv"]) - 2 - 20  # less fc and 20 BN counters
  assert "MODEL.RESNETS.RES2_OUT_CHANNELS 64" in printed and "BasicStem" in printed


# ---------------------------------------------------------------------------
# (c) Where torchvision imports: the real thing.


def _torchvision():
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    from torchvision.models import detection  # noqa: F401  pylint: disable=g-import-not-at-top
  except Exception:  # noqa: BLE001 - ImportError, or RuntimeError: "operator torchvision::nms ..."
    pytest.skip(TORCHVISION_SKIP)
  return torchvision


def one_training_step(model: nn.Module, size: int) -> float:
  """One SGD step of a detector on a tiny synthetic image with two boxes."""
  model.train()
  images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))]
  boxes = torch.tensor([[2.0, 3.0, size / 2, size / 2 + 1], [size / 3, size / 4, size - 2.0,
                                                             size - 3.0]])
  targets = [{"boxes": boxes, "labels": torch.tensor([1, 2])}]
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
  losses = model(images, targets)
  loss = sum(losses.values())
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
  assert torch.isfinite(loss)
  return float(loss.detach())


def body_stages(body: nn.Module, x_BxHxWxC: np.ndarray) -> list[torch.Tensor]:
  body.eval()
  with torch.no_grad():
    return list(body(torch.from_numpy(x_BxHxWxC).permute(0, 3, 1, 2)).values())


# Few proposals and RoIs: the step checks the wiring, not detection quality.
SMALL_HEADS = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                   box_batch_size_per_image=32)


def backbone_weights(state_dict):
  return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


def test_torchvision_faster_rcnn_resnet50_loads_and_trains(r50):
  torchvision = _torchvision()
  model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
      **SMALL_HEADS)
  model.backbone.body.load_state_dict(backbone_weights(r50["tv"]), strict=True)
  x = np.random.default_rng(3).normal(size=(1, 64, 64, 3)).astype(np.float32)
  _, flax_stages = flax_outputs("resnet50", 1000, r50["variables"], x)
  for t, f in zip(body_stages(model.backbone.body, x), flax_stages, strict=True):
    np.testing.assert_allclose(t.permute(0, 2, 3, 1).numpy(), f, rtol=1e-4, atol=1e-4)
  one_training_step(model, 64)


def test_torchvision_fpn_backbone_with_cifar_stem_loads_and_trains(r18):
  torchvision = _torchvision()
  from torchvision.models.detection import FasterRCNN  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # pylint: disable=g-import-not-at-top
  backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None)
  backbone.body.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # the CIFAR stem, as documented
  backbone.body.maxpool = nn.Identity()
  backbone.body.load_state_dict(backbone_weights(r18["tv"]), strict=True)
  x = np.random.default_rng(4).normal(size=(1, 32, 32, 3)).astype(np.float32)
  _, flax_stages = flax_outputs("resnet18", 10, r18["variables"], x)
  for t, f in zip(body_stages(backbone.body, x), flax_stages, strict=True):
    np.testing.assert_allclose(t.permute(0, 2, 3, 1).numpy(), f, rtol=1e-4, atol=1e-4)
  model = FasterRCNN(backbone, num_classes=3, min_size=32, max_size=32,
                     image_mean=list(bundle_lib.CIFAR10_MEAN),
                     image_std=list(bundle_lib.CIFAR10_STD), **SMALL_HEADS)
  assert torchvision.__version__  # the import above is the one under test
  one_training_step(model, 32)
