"""PyTorch twins of the model zoo: parity tests, the side-by-side benchmark, exported students.

Needs the `torch` extra. Module names (hence state-dict keys) and forward passes follow the sources:
akamaster/pytorch_resnet_cifar10 (option-A ResNets), the DFKD CIFAR zoo of
Fast/CMI/NAYER (`resnet.py`, `wresnet.py`, RepDistiller `vgg.py`) and
torchvision's ResNet-50 (v1.5). torchvision is not needed.
Every `forward(x, return_features=False)` takes NCHW input and returns logits,
or (logits, pooled penultimate features) like the DFKD zoo's return_features.
"""

import torch.nn.functional as F
from torch import nn


def _conv3x3(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _with_features(logits, features, return_features: bool):
  return (logits, features) if return_features else logits


# --- The ResNet basic block of both CIFAR zoos -------------------------------------


class LambdaLayer(nn.Module):

  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return self.fn(x)


class BasicBlock(nn.Module):
  """Post-activation basic block. Its shortcut, where the shape changes: option B (DFKD zoo,
  `shortcut.0/1` = 1x1 conv + BN) or, option_a=True, akamaster's parameter-free option A
  (subsample by 2, zero-pad planes // 4 channels on both sides)."""
  expansion = 1

  def __init__(self, in_planes: int, planes: int, stride: int = 1, option_a: bool = False):
    super().__init__()
    self.conv1 = _conv3x3(in_planes, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.shortcut = nn.Sequential()
    if stride != 1 or in_planes != planes:
      if option_a:
        pad = planes // 4
        self.shortcut = LambdaLayer(
            lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad), "constant", 0))
      else:
        self.shortcut = nn.Sequential(_conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


# --- akamaster: ResNet-20..110, option-A shortcut ---------------------------------


class AkaResNet(nn.Module):

  def __init__(self, num_blocks, num_classes: int = 10, width: int = 16):
    super().__init__()
    self.in_planes = width
    self.conv1 = _conv3x3(3, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.layer1 = self._make_layer(width, num_blocks[0], 1)
    self.layer2 = self._make_layer(2 * width, num_blocks[1], 2)
    self.layer3 = self._make_layer(4 * width, num_blocks[2], 2)
    self.linear = nn.Linear(4 * width, num_classes)

  def _make_layer(self, planes, num_blocks, stride):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
      layers.append(BasicBlock(self.in_planes, planes, s, option_a=True))
      self.in_planes = planes
    return nn.Sequential(*layers)

  def forward(self, x, return_features: bool = False):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.layer3(self.layer2(self.layer1(out)))
    features = F.avg_pool2d(out, out.size()[3]).flatten(1)
    return _with_features(self.linear(features), features, return_features)


# --- DFKD zoo ResNet-18/34 (CIFAR stem, option-B) and torchvision ResNet-50 --------


class Bottleneck(nn.Module):
  """torchvision's v1.5 bottleneck: stride on conv2."""
  expansion = 4

  def __init__(self, in_planes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = _conv1x1(in_planes, planes)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = _conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = _conv1x1(planes, planes * 4)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_planes != planes * 4:
      self.downsample = nn.Sequential(_conv1x1(in_planes, planes * 4, stride),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return self.relu(out + identity)


class ResNet(nn.Module):
  """CIFAR stem + `linear` (DFKD zoo) or, imagenet=True, torchvision's stem + `fc`."""

  def __init__(self, block, num_blocks, num_classes: int = 10, width: int = 64,
               imagenet: bool = False):
    super().__init__()
    self.in_planes = width
    self.imagenet = imagenet
    if imagenet:
      self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
    else:
      self.conv1 = _conv3x3(3, width)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if imagenet else nn.Identity()
    self.layer1 = self._make_layer(block, width, num_blocks[0], 1)
    self.layer2 = self._make_layer(block, 2 * width, num_blocks[1], 2)
    self.layer3 = self._make_layer(block, 4 * width, num_blocks[2], 2)
    self.layer4 = self._make_layer(block, 8 * width, num_blocks[3], 2)
    self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    head = nn.Linear(8 * width * block.expansion, num_classes)
    if imagenet:
      self.fc = head
    else:
      self.linear = head

  def _make_layer(self, block, planes, num_blocks, stride):
    layers = []
    for s in [stride] + [1] * (num_blocks - 1):
      layers.append(block(self.in_planes, planes, s))
      self.in_planes = planes * block.expansion
    return nn.Sequential(*layers)

  def forward(self, x, return_features: bool = False):
    out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
    features = self.avgpool(out).flatten(1)
    logits = self.fc(features) if self.imagenet else self.linear(features)
    return _with_features(logits, features, return_features)


# --- DFKD zoo WRN-d-w (pre-activation) -------------------------------------------


class WideBasicBlock(nn.Module):

  def __init__(self, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(in_planes)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = _conv3x3(in_planes, out_planes, stride)
    self.bn2 = nn.BatchNorm2d(out_planes)
    self.relu2 = nn.ReLU(inplace=True)
    self.conv2 = _conv3x3(out_planes, out_planes)
    self.equal_in_out = in_planes == out_planes
    self.convShortcut = None if self.equal_in_out else _conv1x1(in_planes, out_planes, stride)

  def forward(self, x):
    if self.equal_in_out:
      out = self.relu1(self.bn1(x))
    else:
      x = self.relu1(self.bn1(x))  # the shortcut takes the activated input
      out = x
    out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
    return (x if self.equal_in_out else self.convShortcut(x)) + out


class NetworkBlock(nn.Module):

  def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
        for i in range(num_blocks)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth: int, widen_factor: int, num_classes: int = 10):
    super().__init__()
    channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = _conv3x3(3, channels[0])
    self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
    self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
    self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
    self.bn1 = nn.BatchNorm2d(channels[3])
    self.relu = nn.ReLU(inplace=True)
    self.fc = nn.Linear(channels[3], num_classes)

  def forward(self, x, return_features: bool = False):
    out = self.block3(self.block2(self.block1(self.conv1(x))))
    out = self.relu(self.bn1(out))
    features = F.adaptive_avg_pool2d(out, 1).flatten(1)
    return _with_features(self.fc(features), features, return_features)


# --- RepDistiller VGG with BN -----------------------------------------------------


class VGG(nn.Module):

  def __init__(self, cfg, num_classes: int = 10):
    super().__init__()
    in_channels = 3
    for b, widths in enumerate(cfg):
      layers = []
      for width in widths:
        layers += [_conv3x3(in_channels, width, bias=True), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        in_channels = width
      setattr(self, f"block{b}", nn.Sequential(*layers[:-1]))  # last ReLU: in forward
    self.pool0 = nn.MaxPool2d(2, 2)
    self.pool1 = nn.MaxPool2d(2, 2)
    self.pool2 = nn.MaxPool2d(2, 2)
    self.pool3 = nn.MaxPool2d(2, 2)
    self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x, return_features: bool = False):
    h = x.shape[2]
    x = self.pool0(F.relu(self.block0(x)))
    x = self.pool1(F.relu(self.block1(x)))
    x = self.pool2(F.relu(self.block2(x)))
    x = F.relu(self.block3(x))
    if h == 64:
      x = self.pool3(x)
    x = F.relu(self.block4(x))
    features = self.pool4(x).flatten(1)
    return _with_features(self.classifier(features), features, return_features)


_VGG_S = [[64], [128], [256], [512], [512]]
_VGG_A = [[64], [128], [256, 256], [512, 512], [512, 512]]

_BUILDERS = {
    "resnet8": lambda c: AkaResNet([1, 1, 1], c),
    "resnet20": lambda c: AkaResNet([3, 3, 3], c),
    "resnet32": lambda c: AkaResNet([5, 5, 5], c),
    "resnet44": lambda c: AkaResNet([7, 7, 7], c),
    "resnet56": lambda c: AkaResNet([9, 9, 9], c),
    "resnet110": lambda c: AkaResNet([18, 18, 18], c),
    "resnet_tiny_a": lambda c: AkaResNet([1, 1, 1], c, width=4),
    "resnet18": lambda c: ResNet(BasicBlock, [2, 2, 2, 2], c),
    "resnet34": lambda c: ResNet(BasicBlock, [3, 4, 6, 3], c),
    "resnet50": lambda c: ResNet(Bottleneck, [3, 4, 6, 3], c, imagenet=True),
    "resnet_tiny_b": lambda c: ResNet(BasicBlock, [1, 1, 1, 1], c, width=8),
    "wrn16_1": lambda c: WideResNet(16, 1, c),
    "wrn16_2": lambda c: WideResNet(16, 2, c),
    "wrn40_1": lambda c: WideResNet(40, 1, c),
    "wrn40_2": lambda c: WideResNet(40, 2, c),
    "wrn_tiny": lambda c: WideResNet(10, 1, c),
    "vgg8": lambda c: VGG(_VGG_S, c),
    "vgg11": lambda c: VGG(_VGG_A, c),
}
ARCHS = tuple(_BUILDERS)


def build(arch: str, num_classes: int) -> nn.Module:
  """The PyTorch reference of a zoo arch (PyTorch's default init, train mode)."""
  if arch not in _BUILDERS:
    raise ValueError(f"no PyTorch reference for arch {arch!r}; known: {', '.join(ARCHS)}.")
  return _BUILDERS[arch](num_classes)
