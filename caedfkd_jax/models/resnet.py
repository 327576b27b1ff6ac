"""ResNet-18/34 of the DFKD CIFAR zoo and ResNet-50 in torchvision's layout.

Names mirror the PyTorch state dicts (Fast/CMI/NAYER `resnet.py`, torchvision
`resnet50`), so the converter maps `layer1.0.shortcut.0.weight` to
`layer1_0/shortcut_0/kernel` and `layer2.0.downsample.1.*` to
`layer2_0/downsample_1/*`. Submodules are created in PyTorch's order. The
basic block is `layers.BasicBlock` (shared with `resnet_cifar`) with its
option-B shortcut, a 1x1 conv + BN.

`output_stride` dilates Bottleneck ResNets for dense heads, as torchvision's
`replace_stride_with_dilation` and LibMTL's dilated ResNet-50 do; the params
are those of the undilated net, so converted teachers load unchanged.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import (BasicBlock, BatchNorm, conv1x1, conv3x3, conv_init,
                                      global_avg_pool, linear, refuse_output_stride)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: the stride (or dilation) sits on the 3x3 conv; expansion 4."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  dilation: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv1x1(self.planes, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, not train))
    out = conv3x3(self.planes, self.stride, dtype=self.dtype, name="conv2",
                  dilation=self.dilation)(out)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, not train))
    out = conv1x1(self.planes * self.expansion, dtype=self.dtype, name="conv3")(out)
    out = BatchNorm(dtype=self.dtype, name="bn3")(out, not train)
    if self.stride != 1 or x.shape[-1] != self.planes * self.expansion:
      x = conv1x1(self.planes * self.expansion, self.stride, dtype=self.dtype,
                  name="downsample_0")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, not train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """Returns (logits, {"features": pooled penultimate, "stages": each layerN's output}).

  `imagenet_stem` picks torchvision's 7x7/2 conv + 3x3/2 max-pool stem instead
  of the CIFAR 3x3/1 conv; `head` is the classifier's PyTorch name.
  `output_stride` (None: the natural 32 / 8) trades the last stages' strides
  for dilation; Bottleneck nets only, as in torchvision.
  """
  stage_sizes: Sequence[int]
  block_cls: Any = BasicBlock
  num_classes: int = 10
  width: int = 64
  imagenet_stem: bool = False
  head: str = "linear"
  dtype: Any = jnp.float32
  output_stride: int | None = None

  def __post_init__(self):
    super().__post_init__()
    self.stage_plan()  # refuse a bad output_stride when built, not when first called

  @nn.nowrap
  def stage_plan(self) -> tuple[tuple[int, int, int], ...]:
    """(stride, first block's dilation, later blocks' dilation) of each stage.

    A stage whose stride would overshoot `output_stride` runs at stride 1 and
    doubles the dilation; its first block keeps the previous dilation (torchvision's
    `_make_layer(dilate=True)`, LibMTL's `_nostride_dilate`).
    """
    stem = 4 if self.imagenet_stem else 1
    natural = stem * 2 ** (len(self.stage_sizes) - 1)
    dilatable = min(2, len(self.stage_sizes) - 1) if self.block_cls is Bottleneck else 0
    refuse_output_stride(self, tuple(natural // 2**k for k in range(dilatable, -1, -1)))
    target = self.output_stride or natural
    plan, reached, dilation = [], stem, 1
    for i in range(len(self.stage_sizes)):
      stride, previous = (2 if i > 0 else 1), dilation
      if reached * stride > target:
        stride, dilation = 1, dilation * stride
      reached *= stride
      plan.append((stride, previous, dilation))
    return tuple(plan)

  @nn.nowrap
  def stage_strides(self, image_size: int) -> tuple[int, ...]:
    """Input size / size of each "stages" output; the same at every image size."""
    del image_size  # fully convolutional up to the pool
    strides, reached = [], 4 if self.imagenet_stem else 1
    for stride, _, _ in self.stage_plan():
      reached *= stride
      strides.append(reached)
    return tuple(strides)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False):
    x = x_BxHxWxC.astype(self.dtype)
    if self.imagenet_stem:
      x = nn.Conv(self.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                  use_bias=False, kernel_init=conv_init, dtype=self.dtype, name="conv1")(x)
    else:
      x = conv3x3(self.width, dtype=self.dtype, name="conv1")(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, not train))
    if self.imagenet_stem:
      # Flax pads max-pool windows with -inf, as PyTorch's MaxPool2d(3, 2, 1) does.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    stages = []
    for i, (num_blocks, (stride, first_dilation, dilation)) in enumerate(
        zip(self.stage_sizes, self.stage_plan())):
      for j in range(num_blocks):
        d = first_dilation if j == 0 else dilation
        x = self.block_cls(self.width * 2**i, stride if j == 0 else 1, self.dtype,
                           name=f"layer{i + 1}_{j}", **({"dilation": d} if d > 1 else {}))(x, train)
      stages.append(x)
    features = global_avg_pool(x)
    logits = linear(self.num_classes, features.shape[-1], name=self.head)(features)
    return logits.astype(jnp.float32), {"features": features, "stages": tuple(stages)}


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck,
                   imagenet_stem=True, head="fc")
# For tests only: one block per stage, 8 base channels.
ResNetTinyB = partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
