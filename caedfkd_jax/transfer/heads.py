"""Dense-prediction heads for `caedfkd transfer` (issue 27): DeepLabV3's ASPP, the DeepLabV3+
decoder, DeepLabV3's plain head (LibMTL's NYUv2 decoder) and a BN + 1x1 probe for the `frozen`
protocol.

Every head takes the backbone's stage feature maps, shallow to deep, each BxHxWxC, and the
input's (H, W), and returns BxHxWxK logits at the input size: K = num_classes for segmentation,
1 for depth, 3 for normals (unnormalised: the loss or metric normalises, as LibMTL's). No
backbone here. Layer for layer they restate PyTorch references (see each docstring), with our
PyTorch-semantics `BatchNorm` and PyTorch's default initialisers, so that weights copied across
give the same outputs (tests/transfer_heads_test.py).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from caedfkd_jax.models.layers import BatchNorm, torch_default_bias_init, torch_default_kernel_init

ATROUS_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}  # DeepLabV3 sec. 3.3: doubled at stride 8.
LOW_LEVEL_FEATURES = 48   # DeepLabV3+ sec. 3.1: few channels, so the deep features dominate.
PROBE_KERNEL_STD = 0.01   # mmseg's BaseDecodeHead.init_weights for conv_seg (DINOv2's BNHead).


def atrous_rates(output_stride: int) -> tuple[int, int, int]:
  """ASPP's rates for a backbone's output stride (8 or 16)."""
  if output_stride not in ATROUS_RATES:
    raise ValueError(f"output_stride={output_stride}: ASPP rates are defined for 8 and 16.")
  return ATROUS_RATES[output_stride]


def resize_bilinear(x_BxHxWxC: jax.Array, size: Sequence[int]) -> jax.Array:
  """PyTorch's F.interpolate(mode="bilinear", align_corners=False), up or down.

  Half-pixel centres as jax.image.resize's; antialias=False because PyTorch's bilinear does not
  antialias when it shrinks (jax's default does; upsampling is the same either way)."""
  b, h, w, c = x_BxHxWxC.shape
  if (h, w) == tuple(size):
    return x_BxHxWxC
  return jax.image.resize(x_BxHxWxC, (b, *size, c), "bilinear", antialias=False)


def _conv(features: int, kernel: int, rate: int = 1, bias_fan_in: int | None = None,
          dtype: Any = jnp.float32, name: str | None = None) -> nn.Conv:
  """Conv with PyTorch's padding=rate*(k//2), dilation=rate and default init; a bias (with
  PyTorch's init) only where `bias_fan_in` is given, since BN follows the others."""
  pad = rate * (kernel // 2)
  bias_init = torch_default_bias_init(bias_fan_in) if bias_fan_in else nn.initializers.zeros
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)),
                 kernel_dilation=(rate, rate), use_bias=bias_fan_in is not None,
                 kernel_init=torch_default_kernel_init, bias_init=bias_init, dtype=dtype,
                 name=name)


class ConvBNReLU(nn.Module):
  """conv (no bias) - BN - ReLU, the unit of every DeepLab branch."""
  features: int
  kernel: int = 1
  rate: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = _conv(self.features, self.kernel, self.rate, dtype=self.dtype, name="conv")(x)
    return nn.relu(BatchNorm(dtype=self.dtype, name="bn")(x, not train))


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling (Chen et al. 2017, DeepLabV3, sec. 3.3).

  As torchvision's segmentation/deeplabv3.py ASPP: branches `branch0` (1x1), `atrous{i}` (3x3 at
  rates[i]) and `pool` (global average, 1x1, BN, ReLU, spread back over HxW), concatenated, then
  `project` (1x1, BN, ReLU) and dropout. The pooled branch's BN sees one value per image and
  channel: PyTorch raises for that in training at batch 1, ours returns its bias.
  """
  rates: Sequence[int] = ATROUS_RATES[16]
  features: int = 256
  dropout: float = 0.5      # torchvision and LibMTL; VainF's DeepLabV3+ uses 0.1.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jax.Array, train: bool) -> jax.Array:
    unit = lambda kernel, rate, name: ConvBNReLU(self.features, kernel, rate, self.dtype, name=name)
    branches = [unit(1, 1, "branch0")(x_BxHxWxC, train)]
    branches += [unit(3, r, f"atrous{i}")(x_BxHxWxC, train) for i, r in enumerate(self.rates)]
    pooled = jnp.mean(x_BxHxWxC, axis=(1, 2), keepdims=True)
    pooled = unit(1, 1, "pool")(pooled, train)
    # Bilinear from 1x1 is a copy to every pixel (align_corners=False clamps to the one source).
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    x = unit(1, 1, "project")(jnp.concatenate(branches, axis=-1), train)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class DeepLabV3Head(nn.Module):
  """DeepLabV3's head: ASPP on the deepest stage, 3x3 conv-BN-ReLU, 1x1 to num_outputs.

  torchvision's DeepLabHead and LibMTL's NYUv2 decoder (examples/nyu/aspp.py, rates 12, 24, 36
  on a stride-8 dilated ResNet-50); the baseline head of LibMTL's published NYUv2 numbers.
  """
  num_outputs: int
  rates: Sequence[int] = ATROUS_RATES[8]
  features: int = 256
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array], out_size: Sequence[int],
               train: bool) -> jax.Array:
    x = ASPP(self.rates, self.features, self.dropout, self.dtype, name="aspp")(stages[-1], train)
    x = ConvBNReLU(self.features, 3, dtype=self.dtype, name="conv")(x, train)
    x = _conv(self.num_outputs, 1, bias_fan_in=x.shape[-1], dtype=self.dtype,
              name="classifier")(x)
    return resize_bilinear(x, out_size)


class DeepLabV3PlusHead(nn.Module):
  """DeepLabV3+'s decoder (Chen et al. 2018, sec. 3.1 and Fig. 2).

  ASPP on the deepest stage; `low_level` (1x1 to 48, BN, ReLU) on stages[low_level_index];
  the ASPP output resized to the low-level size and concatenated after it (as VainF's
  DeepLabHeadV3Plus); `decoder{i}` 3x3 conv-BN-ReLUs (two, as the paper and the TF reference;
  VainF keeps one); `classifier` 1x1 with bias to num_outputs; resized to out_size.
  """
  num_outputs: int
  rates: Sequence[int] = ATROUS_RATES[16]
  low_level_index: int = 0
  features: int = 256
  low_level_features: int = LOW_LEVEL_FEATURES
  decoder_convs: int = 2
  dropout: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array], out_size: Sequence[int],
               train: bool) -> jax.Array:
    if len(stages) < 2:
      raise ValueError(f"DeepLabV3+ needs a low-level and a deep stage, got {len(stages)}.")
    x = ASPP(self.rates, self.features, self.dropout, self.dtype, name="aspp")(stages[-1], train)
    low = ConvBNReLU(self.low_level_features, dtype=self.dtype, name="low_level")(
        stages[self.low_level_index], train)
    x = jnp.concatenate([low, resize_bilinear(x, low.shape[1:3]).astype(low.dtype)], axis=-1)
    for i in range(self.decoder_convs):
      x = ConvBNReLU(self.features, 3, dtype=self.dtype, name=f"decoder{i}")(x, train)
    x = _conv(self.num_outputs, 1, bias_fan_in=x.shape[-1], dtype=self.dtype,
              name="classifier")(x)
    return resize_bilinear(x, out_size)


class LinearProbeHead(nn.Module):
  """DINOv2's BNHead (eval/segmentation/models/decode_heads/linear_head.py): the `frozen` probe.

  The stages picked by `stage_indices` (all by default) resized to the finest one's size and
  concatenated ("resize_concat"), then `bn`, dropout (0 in DINOv2's configs), `classifier` 1x1
  with bias (init N(0, 0.01), zero bias, as mmseg's conv_seg) and a resize to out_size.
  Linear in the features, so it measures what the frozen backbone already separates.
  """
  num_outputs: int
  stage_indices: Sequence[int] | None = None
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, stages: Sequence[jax.Array], out_size: Sequence[int],
               train: bool) -> jax.Array:
    picked = [stages[i] for i in self.stage_indices] if self.stage_indices is not None else stages
    if not picked:
      raise ValueError("LinearProbeHead: no stage picked.")
    finest = max((s.shape[1:3] for s in picked), key=lambda hw: hw[0] * hw[1])
    x = jnp.concatenate([resize_bilinear(s, finest) for s in picked], axis=-1)
    x = BatchNorm(dtype=self.dtype, name="bn")(x, not train)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Conv(self.num_outputs, (1, 1), kernel_init=nn.initializers.normal(PROBE_KERNEL_STD),
                bias_init=nn.initializers.zeros, dtype=self.dtype, name="classifier")(x)
    return resize_bilinear(x, out_size)
