"""VGG-8 / VGG-11 with BatchNorm, in RepDistiller's layout (used by the DFKD zoo).

PyTorch keeps each block in a Sequential of (conv, bn, relu) triples whose last
ReLU is dropped and applied after the block, so block b's k-th conv is
`block{b}.{3k}` and its BN `block{b}.{3k+1}`; here they are `block{b}_{3k}` and
`block{b}_{3k+1}`.
"""

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import BatchNorm, conv3x3, global_avg_pool, refuse_output_stride

CFG_S = ((64,), (128,), (256,), (512,), (512,))  # VGG-8
CFG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # VGG-11


class VGG(nn.Module):
  """Returns (logits, {"features": pooled penultimate, "stages": one map per resolution}).

  Max-pools after blocks 0-2; after block 3 only for 64x64 inputs (as the zoo
  does), so a 32x32 image reaches block 4 at 4x4. A stage is the last block's
  output at each resolution, taken before its max-pool (the richest map there,
  where FCN/U-Net heads tap a VGG), so 32 px gives strides 1, 2, 4, 8 and 64 px
  1, 2, 4, 8, 16. `output_stride` exists for a uniform `create_model`: only the
  natural one (8, or 16 at 64 px) is accepted, checked when the input size is known.
  """
  cfg: Sequence[Sequence[int]]
  num_classes: int = 10
  dtype: Any = jnp.float32
  output_stride: int | None = None

  def __post_init__(self):
    super().__post_init__()
    refuse_output_stride(self, (self._strides(32)[-1], self._strides(64)[-1]))

  @nn.nowrap
  def pools_after(self, image_size: int) -> tuple[bool, ...]:
    """Which blocks end in a 2x2 max-pool (block 3's depends on the input size)."""
    return tuple(b < 3 or (b == 3 and image_size == 64) for b in range(len(self.cfg)))

  @nn.nowrap
  def _strides(self, image_size: int) -> tuple[int, ...]:
    strides, reached = [], 1
    for b, pool in enumerate(self.pools_after(image_size)):
      if pool or b == len(self.cfg) - 1:
        strides.append(reached)
      reached *= 2 if pool else 1
    return tuple(strides)

  @nn.nowrap
  def stage_strides(self, image_size: int) -> tuple[int, ...]:
    """Input size / size of each "stages" output at this input size.

    Also where a wrong output_stride is refused: VGG's natural one depends on the size.
    """
    strides = self._strides(image_size)
    refuse_output_stride(self, strides[-1:])
    return strides

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False):
    pools_after = self.pools_after(x_BxHxWxC.shape[1])
    self.stage_strides(x_BxHxWxC.shape[1])  # refuse an output_stride this size cannot give
    x = x_BxHxWxC.astype(self.dtype)
    stages = []
    for b, widths in enumerate(self.cfg):
      for k, width in enumerate(widths):
        if k > 0:
          x = nn.relu(x)
        x = conv3x3(width, use_bias=True, dtype=self.dtype, name=f"block{b}_{3 * k}")(x)
        x = BatchNorm(dtype=self.dtype, name=f"block{b}_{3 * k + 1}")(x, not train)
      x = nn.relu(x)
      if pools_after[b] or b == len(self.cfg) - 1:
        stages.append(x)
      if pools_after[b]:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = global_avg_pool(x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      name="classifier")(features)
    return logits.astype(jnp.float32), {"features": features, "stages": tuple(stages)}


VGG8 = partial(VGG, cfg=CFG_S)
VGG11 = partial(VGG, cfg=CFG_A)
