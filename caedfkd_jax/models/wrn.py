"""Wide ResNets WRN-d-w of the DFKD CIFAR zoo (ZSKT / Wei Yang `wresnet.py`).

Pre-activation blocks. Names mirror the PyTorch state dict:
`block1.layer.0.convShortcut.weight` <-> `block1/layer_0/convShortcut/kernel`.
"""

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import (BatchNorm, conv1x1, conv3x3, global_avg_pool,
                                      refuse_output_stride, torch_default_kernel_init)

GROUPS = ((16, 1), (32, 2), (64, 2))  # (channels before widening, stride) of each block group


class WideBasicBlock(nn.Module):
  """bn-relu-conv3x3-bn-relu-conv3x3 plus a shortcut.

  Identity on the raw x when in == out; otherwise a 1x1 `convShortcut` (which
  only exists then) on the *activated* relu(bn1(x)), as in the PyTorch zoo.
  """
  planes: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    equal_in_out = x.shape[-1] == self.planes
    activated = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, not train))
    out = conv3x3(self.planes, self.stride, dtype=self.dtype, name="conv1")(activated)
    out = nn.relu(BatchNorm(dtype=self.dtype, name="bn2")(out, not train))
    out = conv3x3(self.planes, dtype=self.dtype, name="conv2")(out)
    if equal_in_out:
      return x + out
    shortcut = conv1x1(self.planes, self.stride, dtype=self.dtype, name="convShortcut")
    return shortcut(activated) + out


class NetworkBlock(nn.Module):
  """A stage; PyTorch keeps its blocks in a Sequential named `layer`."""
  num_blocks: int
  planes: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i in range(self.num_blocks):
      x = WideBasicBlock(self.planes, self.stride if i == 0 else 1, self.dtype,
                         name=f"layer_{i}")(x, train)
    return x


class WideResNet(nn.Module):
  """Returns (logits, {"features": pooled penultimate, "stages": one map per block group}).

  The blocks are pre-activation, so the last stage is taken after the final
  bn-relu: the map the classifier pools, normalised as a dense head wants it.
  The first two are the raw block-group sums (RepDistiller's feature list).
  `output_stride` exists for a uniform `create_model`; only the natural 4 is accepted.
  """
  depth: int
  widen_factor: int
  num_classes: int = 10
  dtype: Any = jnp.float32
  output_stride: int | None = None

  def __post_init__(self):
    super().__post_init__()
    refuse_output_stride(self, self.stage_strides(32)[-1:])

  @nn.nowrap
  def stage_strides(self, image_size: int) -> tuple[int, ...]:
    """Input size / size of each "stages" output; the same at every image size."""
    del image_size  # fully convolutional up to the pool
    strides, reached = [], 1
    for _, stride in GROUPS:
      reached *= stride
      strides.append(reached)
    return tuple(strides)

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WRN depth must be 6n+4 (e.g. 16, 40), got {self.depth}.")
    num_blocks = (self.depth - 4) // 6
    x = conv3x3(16, dtype=self.dtype, name="conv1")(x_BxHxWxC.astype(self.dtype))
    stages = []
    for b, (channels, stride) in enumerate(GROUPS):
      x = NetworkBlock(num_blocks, channels * self.widen_factor, stride, self.dtype,
                       name=f"block{b + 1}")(x, train)
      stages.append(x)
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, not train))
    stages[-1] = x
    features = global_avg_pool(x)
    # The zoo zero-initialises the classifier's bias.
    logits = nn.Dense(self.num_classes, kernel_init=torch_default_kernel_init,
                      name="fc")(features)
    return logits.astype(jnp.float32), {"features": features, "stages": tuple(stages)}


WRN16_1 = partial(WideResNet, depth=16, widen_factor=1)
WRN16_2 = partial(WideResNet, depth=16, widen_factor=2)
WRN40_1 = partial(WideResNet, depth=40, widen_factor=1)
WRN40_2 = partial(WideResNet, depth=40, widen_factor=2)
# For tests only: one block per stage (block1 identity, block2/3 convShortcut).
WRNTiny = partial(WideResNet, depth=10, widen_factor=1)
