"""Model zoo: every network returns (logits, aux) and sows BN input stats.

aux["features"] is the classifier's input; aux["stages"] the multi-scale maps a
dense head reads, at the strides `stage_strides` gives (each net says which maps).
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from caedfkd_jax.models import resnet, resnet_cifar, vgg, wrn

# arch name -> constructor taking num_classes (and dtype). Names follow the
# zoos they come from (akamaster resnet20.., DFKD resnet18/34, wrn*, vgg*).
ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet8": resnet_cifar.ResNet8,
    "resnet20": resnet_cifar.ResNet20,
    "resnet32": resnet_cifar.ResNet32,
    "resnet44": resnet_cifar.ResNet44,
    "resnet56": resnet_cifar.ResNet56,
    "resnet110": resnet_cifar.ResNet110,
    "resnet_tiny_a": resnet_cifar.ResNetTinyA,
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,  # torchvision's ImageNet layout (FC named `fc`)
    "resnet_tiny_b": resnet.ResNetTinyB,
    "wrn16_1": wrn.WRN16_1,
    "wrn16_2": wrn.WRN16_2,
    "wrn40_1": wrn.WRN40_1,
    "wrn40_2": wrn.WRN40_2,
    "wrn_tiny": wrn.WRNTiny,
    "vgg8": vgg.VGG8,
    "vgg11": vgg.VGG11,
}


def create_model(arch: str, num_classes: int, dtype: Any = jnp.float32,
                 output_stride: int | None = None) -> nn.Module:
  """Builds a zoo model; the error lists the known archs.

  `output_stride` (None: the arch's own) dilates the last stages of Bottleneck
  ResNets (resnet50: 32, 16 or 8) for dense heads, with the same params; the
  other archs accept only their natural stride, so a typo fails here, not later.
  """
  if arch not in ARCHS:
    raise ValueError(
        f"Unknown arch {arch!r}. Known archs: {', '.join(sorted(ARCHS))}.")
  # Passed only when asked for, so an arch registered without the field still builds.
  extra = {} if output_stride is None else {"output_stride": output_stride}
  return ARCHS[arch](num_classes=num_classes, dtype=dtype, **extra)


def stage_strides(arch: str, image_size: int,
                  output_stride: int | None = None) -> tuple[int, ...]:
  """Input size / spatial size of each aux["stages"] map, read off the architecture."""
  return create_model(arch, 1, output_stride=output_stride).stage_strides(image_size)
