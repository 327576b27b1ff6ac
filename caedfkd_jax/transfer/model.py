"""A zoo backbone with one dense head per task: the network `caedfkd transfer` trains.

The backbone is a bundle's network (a distilled student, a converted teacher, or the same
architecture freshly initialised); its `aux["stages"]` feed every task's head. Under the
`frozen` protocol the backbone runs in eval mode (running BatchNorm statistics, never updated)
behind a stop_gradient, so only the heads learn; under `finetune` everything does, as the
paper's Tables V-VI.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from caedfkd_jax import models
from caedfkd_jax.eval import finetune
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.transfer import heads as heads_lib

HEADS = ("deeplabv3plus", "deeplabv3", "linear")
PROTOCOLS = ("finetune", "frozen")
DEFAULT_HEAD = {"finetune": "deeplabv3plus", "frozen": "linear"}
TASK_CHANNELS = {"depth": 1, "normal": 3}   # segmentation: the data's class count
BACKBONE = "backbone"


def default_rates(total_stride: int) -> tuple[int, int, int]:
  """ASPP rates: DeepLabV3's for output stride 8 and 16, and the same image-space reach at
  other strides (rate x stride = 96 pixels for the widest branch at stride 16: 18 x 16 / s)."""
  if total_stride in heads_lib.ATROUS_RATES:
    return heads_lib.atrous_rates(total_stride)
  base = heads_lib.ATROUS_RATES[16]
  return tuple(max(1, round(r * 16 / total_stride)) for r in base)


class DenseModel(nn.Module):
  """backbone -> stages -> {task: head(stages)}; outputs at the input's size (BxHxWxK)."""
  backbone: nn.Module
  tasks: tuple[str, ...]
  num_classes: int
  head: str = "deeplabv3plus"
  head_features: int = 256
  rates: tuple[int, ...] = heads_lib.ATROUS_RATES[16]

  def _head(self, task: str) -> nn.Module:
    outputs = self.num_classes if task == "segmentation" else TASK_CHANNELS[task]
    name = f"head_{task}"
    if self.head == "linear":
      return heads_lib.LinearProbeHead(outputs, name=name)
    if self.head == "deeplabv3":
      return heads_lib.DeepLabV3Head(outputs, self.rates, self.head_features, name=name)
    return heads_lib.DeepLabV3PlusHead(outputs, self.rates, features=self.head_features, name=name)

  @nn.compact
  def __call__(self, x_BxHxWx3: jax.Array, train: bool, train_backbone: bool = True
               ) -> dict[str, jax.Array]:
    _, aux = self.backbone(x_BxHxWx3, train=train and train_backbone)
    stages = tuple(aux["stages"])
    if not train_backbone:
      stages = jax.lax.stop_gradient(stages)
    return {task: self._head(task)(stages, x_BxHxWx3.shape[1:3], train).astype(jnp.float32)
            for task in self.tasks}


@dataclasses.dataclass(frozen=True)
class DenseSpec:
  """What builds the network: the bundle's arch and the transfer's choices."""
  arch: str
  tasks: tuple[str, ...]
  num_classes: int
  head: str
  head_features: int
  rates: tuple[int, ...]
  output_stride: int | None = None


def check_head(head: str) -> None:
  if head not in HEADS:
    raise ValueError(f"head {head!r}: use one of {', '.join(HEADS)}.")


def total_stride(arch: str, image_size: int, output_stride: int | None) -> int:
  """The deepest stage's stride: what the input's sides must be multiples of."""
  strides = models.stage_strides(arch, image_size, output_stride)
  if not strides:
    raise ValueError(f"{arch} exposes no stage outputs, so it has nothing for a dense head.")
  return int(strides[-1])


def build(spec: DenseSpec) -> DenseModel:
  check_head(spec.head)
  backbone = models.create_model(spec.arch, 1, output_stride=spec.output_stride)
  return DenseModel(backbone, spec.tasks, spec.num_classes, spec.head, spec.head_features,
                    tuple(spec.rates), name=None)


def init_variables(model: DenseModel, bundle: bundle_lib.Bundle, image_shape: Sequence[int],
                   rng: jax.Array, random_backbone: bool = False) -> dict[str, Any]:
  """Fresh heads; the bundle's backbone weights (all but its classifier), or fresh ones too
  when `random_backbone` (the random-initialisation row)."""
  x = jnp.zeros((1, *image_shape, 3), jnp.float32)
  variables = jax.jit(lambda r: model.init({"params": r, "dropout": r}, x, train=False))(rng)
  variables = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
  if random_backbone:
    return variables
  classifier = finetune.head_paths(bundle.spec.arch, bundle.spec.num_classes,
                                   bundle.spec.image_size)
  for collection in ("params", "batch_stats"):
    fresh = traverse_util.flatten_dict(variables[collection].get(BACKBONE, {}))
    saved = traverse_util.flatten_dict(bundle.variables.get(collection, {}))
    for path, value in fresh.items():
      if collection == "params" and path in classifier:
        continue   # The bundle's classifier: no dense head reads it.
      if path not in saved or saved[path].shape != value.shape:
        found = "missing" if path not in saved else f"shaped {saved[path].shape}"
        raise ValueError(f"{bundle.spec.arch} bundle: {collection} {'/'.join(path)} is {found}; "
                         f"the backbone wants {value.shape}. Is the bundle's arch right?")
      # A copy: the train step donates its state, and must not delete the bundle's arrays.
      fresh[path] = jnp.array(saved[path], value.dtype, copy=True)
    variables[collection] = {**variables[collection],
                             BACKBONE: traverse_util.unflatten_dict(fresh)}
  return variables


def param_labels(params: dict[str, Any], frozen: bool) -> dict[str, Any]:
  """"frozen" for the backbone's params under the frozen protocol, "train" for the rest."""
  return {name: jax.tree.map(lambda _: "frozen" if frozen and name == BACKBONE else "train", sub)
          for name, sub in params.items()}
