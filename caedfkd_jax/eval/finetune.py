"""Fine-tuning a bundle on labelled images with a fresh head: `caedfkd probe --protocol finetune`.

Every weight trains (SGD with momentum, cosine learning rate, random crop + flip); the
classifier is new, sized for the data's classes, so the probe never uses what the model's
own head learned and works on classes the model never saw.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from caedfkd_jax import models
from caedfkd_jax.eval import supervised
from caedfkd_jax.io import bundle as bundle_lib


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  padding: int = 4          # random crop: zero padding on each side


def head_paths(arch: str, num_classes: int, image_size: int) -> set[tuple[str, ...]]:
  """Param paths whose shape follows the class count: the classifier, whatever its name."""
  def shapes(k):
    spec = bundle_lib.ModelSpec(arch, k, image_size)
    params = jax.eval_shape(lambda: bundle_lib.init_variables(spec))["params"]
    return {p: v.shape for p, v in traverse_util.flatten_dict(params).items()}
  a, b = shapes(num_classes), shapes(num_classes + 1)
  return {p for p in a if a[p] != b.get(p)}


def with_fresh_head(bundle: bundle_lib.Bundle, num_classes: int, rng: jax.Array | int = 0
                    ) -> tuple[Any, dict[str, Any]]:
  """(model, variables) for `num_classes` classes: a new head, every other weight the bundle's."""
  spec = dataclasses.replace(bundle.spec, num_classes=num_classes, class_names=None)
  head = head_paths(spec.arch, num_classes, spec.image_size)
  if not head:
    raise ValueError(f"cannot find the classifier of {spec.arch}: no parameter's shape depends "
                     "on the class count, so there is no head to replace for fine-tuning.")
  fresh = bundle_lib.init_variables(spec, rng)
  old = traverse_util.flatten_dict(bundle.variables["params"])
  params = {p: (v if p in head else old[p])
            for p, v in traverse_util.flatten_dict(fresh["params"]).items()}
  variables = {"params": traverse_util.unflatten_dict(params),
               "batch_stats": bundle.variables["batch_stats"]}
  return models.create_model(spec.arch, num_classes), variables


@functools.lru_cache(maxsize=8)
def _train_step(model, config: FinetuneConfig, total_steps: int, mean: tuple, std: tuple):
  """(optimizer, jitted step); cached so that every draw of the same size reuses the compilation."""
  tx = supervised.optimizer(config.learning_rate, config.momentum, config.weight_decay,
                            total_steps)
  return tx, supervised.make_step(model, tx, mean, std, padding=config.padding)


def finetune(bundle: bundle_lib.Bundle, images_uint8: np.ndarray, labels: np.ndarray,
             num_classes: int, config: FinetuneConfig = FinetuneConfig(), seed: int = 0,
             draw: int = 0, progress: bool = True) -> tuple[Any, dict[str, Any], float]:
  """Trains all weights with a fresh head; returns (model, variables, last loss).

  Batches have one size (min(batch_size, N)); an epoch is ceil(N / batch) steps over a
  fresh permutation, wrapping around to fill the last batch.
  """
  if config.epochs < 1:
    raise ValueError(f"--finetune-epochs {config.epochs}: give 1 or more.")
  key = jax.random.fold_in(jax.random.key(seed), draw)
  head_key, key = jax.random.split(key)
  model, variables = with_fresh_head(bundle, num_classes, head_key)
  n = len(images_uint8)
  batch = min(config.batch_size, n)
  steps_per_epoch = -(-n // batch)
  total = config.epochs * steps_per_epoch
  tx, step = _train_step(model, config, total, tuple(bundle.spec.mean), tuple(bundle.spec.std))
  variables = jax.tree.map(jnp.array, variables)  # own buffers: the step donates them
  opt_state = tx.init(variables["params"])
  order_rng = np.random.default_rng([seed, draw, n, 2])
  loss = float("nan")
  bar = tqdm(total=total, desc="finetune", unit="step", disable=not progress)
  for epoch in range(config.epochs):
    order = np.resize(order_rng.permutation(n), steps_per_epoch * batch)
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      rng = jax.random.fold_in(key, epoch * steps_per_epoch + i)
      variables, opt_state, loss = step(variables, opt_state, images_uint8[idx], labels[idx], rng)
      bar.update()
  bar.close()
  return model, variables, float(loss)
