"""ResNet-18/34 of the DFKD CIFAR zoo and ResNet-50 in torchvision's layout.

Names mirror the PyTorch state dicts (Fast/CMI/NAYER `resnet.py`, torchvision
`resnet50`), so the converter maps `layer1.0.shortcut.0.weight` to
`layer1_0/shortcut_0/kernel` and `layer2.0.downsample.1.*` to
`layer2_0/downsample_1/*`. Submodules are created in PyTorch's order. The
basic block is `layers.BasicBlock` (shared with `resnet_cifar`) with its
option-B shortcut, a 1x1 conv + BN.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import (BasicBlock, BatchNorm, conv1x1, conv3x3, conv_init,
                                      global_avg_pool, linear)


class Bottleneck(nn.Module):
  """torchvision v1.5 bottleneck: the stride sits on the 3x3 conv; expansion 4."""
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = conv1x1(self.planes, dtype=self.dtype, name="conv1")(x)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(out, not train))
    out = conv3x3(self.planes, self.stride, dtype=self.dtype, name="conv2")(out)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, not train))
    out = conv1x1(self.planes * self.expansion, dtype=self.dtype, name="conv3")(out)
    out = BatchNorm(dtype=self.dtype, name="bn3")(out, not train)
    if self.stride != 1 or x.shape[-1] != self.planes * self.expansion:
      x = conv1x1(self.planes * self.expansion, self.stride, dtype=self.dtype,
                  name="downsample_0")(x)
      x = BatchNorm(dtype=self.dtype, name="downsample_1")(x, not train)
    return nn.relu(out + x)


class ResNet(nn.Module):
  """Returns (logits, {"features": pooled penultimate features}).

  `imagenet_stem` picks torchvision's 7x7/2 conv + 3x3/2 max-pool stem instead
  of the CIFAR 3x3/1 conv; `head` is the classifier's PyTorch name.
  """
  stage_sizes: Sequence[int]
  block_cls: Any = BasicBlock
  num_classes: int = 10
  width: int = 64
  imagenet_stem: bool = False
  head: str = "linear"
  dtype: Any = jnp.float32

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
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = self.block_cls(self.width * 2**i, stride, self.dtype,
                           name=f"layer{i + 1}_{j}")(x, train)
    features = global_avg_pool(x)
    logits = linear(self.num_classes, features.shape[-1], name=self.head)(features)
    return logits.astype(jnp.float32), {"features": features}


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3))
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck,
                   imagenet_stem=True, head="fc")
# For tests only: one block per stage, 8 base channels.
ResNetTinyB = partial(ResNet, stage_sizes=(1, 1, 1, 1), width=8)
