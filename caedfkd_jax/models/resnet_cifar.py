"""CIFAR ResNet-20/32/44/56/110 with option-A shortcuts (He et al. 2016).

Layout and names follow akamaster/pytorch_resnet_cifar10 so that the
converter maps `layer{L}.{j}.conv1.weight` to `layer{L}_{j}/conv1/kernel`.
The block is `layers.BasicBlock` with its parameter-free option-A shortcut.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import (BasicBlock, BatchNorm, conv3x3, global_avg_pool, linear,
                                      refuse_output_stride)


class CifarResNet(nn.Module):
  """Returns (logits, {"features": pooled penultimate, "stages": each layerN's output}).

  The stem keeps stride 1, so the stages sit at strides 1, 2, 4. `output_stride`
  exists for a uniform `create_model`; only the natural 4 is accepted.
  """
  stage_sizes: Sequence[int]
  num_classes: int = 10
  width: int = 16
  dtype: Any = jnp.float32
  output_stride: int | None = None

  def __post_init__(self):
    super().__post_init__()
    refuse_output_stride(self, self.stage_strides(32)[-1:])

  @nn.nowrap
  def stage_strides(self, image_size: int) -> tuple[int, ...]:
    """Input size / size of each "stages" output; the same at every image size."""
    del image_size  # fully convolutional up to the pool
    return tuple(2**i for i in range(len(self.stage_sizes)))

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False):
    x = conv3x3(self.width, dtype=self.dtype, name="conv1")(x_BxHxWxC.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, not train))
    stages = []
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        x = BasicBlock(planes, stride, self.dtype, shortcut="A",
                       name=f"layer{i + 1}_{j}")(x, train)
      stages.append(x)
    features = global_avg_pool(x)
    logits = linear(self.num_classes, features.shape[-1], name="linear")(features)
    return logits.astype(jnp.float32), {"features": features, "stages": tuple(stages)}


# ResNet-8: the smallest of the family (one block per stage); the demo's student.
ResNet8 = partial(CifarResNet, stage_sizes=(1, 1, 1))
ResNet20 = partial(CifarResNet, stage_sizes=(3, 3, 3))
ResNet32 = partial(CifarResNet, stage_sizes=(5, 5, 5))
ResNet44 = partial(CifarResNet, stage_sizes=(7, 7, 7))
ResNet56 = partial(CifarResNet, stage_sizes=(9, 9, 9))
ResNet110 = partial(CifarResNet, stage_sizes=(18, 18, 18))
# For tests only: one block per stage, 4 base channels.
ResNetTinyA = partial(CifarResNet, stage_sizes=(1, 1, 1), width=4)
