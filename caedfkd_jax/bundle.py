"""Model bundles: the on-disk form of every teacher and student.

A bundle is a directory holding `model.json` (what the network is and how its
inputs are normalised) and `variables/`, an Orbax checkpoint of `params` and
`batch_stats`. Loading needs nothing else.
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from caedfkd_jax import models

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclasses.dataclass
class ModelSpec:
  """Everything in model.json. `extra` keeps provenance (source sha256, preset...)."""
  arch: str
  num_classes: int
  image_size: int = 32
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  class_names: list[str] | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mean"], d["std"] = list(self.mean), list(self.std)
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"model.json has unknown fields {sorted(unknown)}")
    d = dict(d)
    d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
    return cls(**d)


@dataclasses.dataclass
class Bundle:
  spec: ModelSpec
  variables: dict[str, Any]   # {"params": ..., "batch_stats": ...}

  @property
  def model(self) -> nn.Module:
    return models.create_model(self.spec.arch, self.spec.num_classes)

  def normalize(self, images01_BxHxWxC: jax.Array) -> jax.Array:
    """Maps images in [0, 1] to the network's input space."""
    return normalize(images01_BxHxWxC, self.spec.mean, self.spec.std)


def normalize(images01: jax.Array, mean, std) -> jax.Array:
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images01.astype(jnp.float32) - mean) / std


def init_variables(spec: ModelSpec, rng: jax.Array | int = 0) -> dict[str, Any]:
  """Fresh variables (params and batch_stats) for a spec."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  model = models.create_model(spec.arch, spec.num_classes)
  x = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
  variables = model.init(rng, x, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def save_bundle(directory: str, spec: ModelSpec, variables: dict[str, Any]) -> str:
  """Writes a bundle (overwriting one that is there) and returns its path."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}
  variables = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
  tmp = os.path.join(directory, MODEL_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(spec.to_json(), f, indent=2)
  os.replace(tmp, os.path.join(directory, MODEL_JSON))
  return directory


def load_bundle(directory: str) -> Bundle:
  """Reads a bundle; errors say which file is missing or unreadable."""
  directory = os.path.abspath(directory)
  json_path = os.path.join(directory, MODEL_JSON)
  if not os.path.isfile(json_path):
    raise FileNotFoundError(
        f"{directory} is not a model bundle: {MODEL_JSON} is missing. Create one "
        "with `caedfkd convert` (PyTorch teacher) or `caedfkd distill` (student).")
  with open(json_path) as f:
    spec = ModelSpec.from_json(json.load(f))
  target = jax.eval_shape(lambda: init_variables(spec))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(os.path.join(directory, VARIABLES_DIR), target)
  return Bundle(spec, variables)
