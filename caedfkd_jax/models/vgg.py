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

from caedfkd_jax.models.layers import BatchNorm, conv3x3, global_avg_pool

CFG_S = ((64,), (128,), (256,), (512,), (512,))  # VGG-8
CFG_A = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # VGG-11


class VGG(nn.Module):
  """Returns (logits, {"features": pooled penultimate features}).

  Max-pools after blocks 0-2; after block 3 only for 64x64 inputs (as the zoo
  does), so a 32x32 image reaches block 4 at 4x4.
  """
  cfg: Sequence[Sequence[int]]
  num_classes: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool = False):
    input_size = x_BxHxWxC.shape[1]
    x = x_BxHxWxC.astype(self.dtype)
    for b, widths in enumerate(self.cfg):
      for k, width in enumerate(widths):
        if k > 0:
          x = nn.relu(x)
        x = conv3x3(width, use_bias=True, dtype=self.dtype, name=f"block{b}_{3 * k}")(x)
        x = BatchNorm(dtype=self.dtype, name=f"block{b}_{3 * k + 1}")(x, not train)
      x = nn.relu(x)
      if b < 3 or (b == 3 and input_size == 64):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    features = global_avg_pool(x)
    logits = nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                      name="classifier")(features)
    return logits.astype(jnp.float32), {"features": features}


VGG8 = partial(VGG, cfg=CFG_S)
VGG11 = partial(VGG, cfg=CFG_A)
