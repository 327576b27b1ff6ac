"""Model zoo: every network returns (logits, {"features": ...}) and sows BN input stats."""

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


def create_model(arch: str, num_classes: int, dtype: Any = jnp.float32) -> nn.Module:
  """Builds a zoo model; the error lists the known archs."""
  if arch not in ARCHS:
    raise ValueError(
        f"Unknown arch {arch!r}. Known archs: {', '.join(sorted(ARCHS))}.")
  return ARCHS[arch](num_classes=num_classes, dtype=dtype)
