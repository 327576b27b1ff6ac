"""What a DFKD method is to the engine: its setup, its state, its units and its epoch plan."""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Method:
  """A DFKD method: pure functions the training loop (train.py) calls. One per file in methods/.

  The shared pieces (losses, bank, augment, models, checkpoints, logging, the mesh)
  stay outside; a method picks from them.
  """
  name: str
  summary: str              # One line: what the method does (README table, CLI help).
  create_setup: Callable    # (config, teacher Bundle, EmbeddingTable) -> steps.Setup
  init_state: Callable      # (setup, teacher_vars, rng, image_size) -> the method's state pytree
  phases: Callable          # (setup, mesh | None) -> {unit name: steps.Phase}
  epoch_plan: Callable      # (config, epoch) -> tuple of unit names, in order
  unit_labels: dict[str, str]  # unit name -> words for messages ("generator round")
  latest_images: Callable   # (setup, method_state) -> (images01_BxHxWxC, labels_B): the grid
  epoch_scalars: Callable   # (method_state) -> {name: scalar} logged each epoch
  finite_parts: Callable    # (method_state) -> {"part name": pytree} checked after every unit
  bundle_fields: Callable   # (config) -> what the student bundle records about the method
  ignores: tuple[str, ...] = ()  # Config fields the method never reads; "cend." and
                                 # "student.cncl_" name every field they begin.
  check_config: Callable | None = None  # (config, num_devices) -> None; raises ValueError
                                        # naming a bad value of the method's own fields.
  renews: Callable[[Any, int], bool] = lambda config, epoch: False  # A new generator at `epoch`?
  renew: Callable | None = None  # (setup, state) -> state with it (jitted by the loop)
  frozen_vars: Callable | None = None  # (setup, teacher_vars) -> what every unit receives as
                                       # its frozen networks' variables (DiffDFKD: the teacher's
                                       # and Stable Diffusion's); None: teacher_vars.

  def units_per_epoch(self, config) -> list[int]:
    return [len(self.epoch_plan(config, e)) for e in range(config.epochs)]


def teacher_judgement(t_logits: jax.Array, labels_B: jax.Array, num_classes: int,
                      low_confidence: float) -> tuple[jax.Array, jax.Array]:
  """How the teacher sees a synthetic batch: per class, the share of its images the teacher is
  unsure about (max softmax < `low_confidence`; the paper's Figure 2a), and the teacher's
  accuracy on the labels the images were made for."""
  probs = jax.nn.softmax(t_logits.astype(jnp.float32))
  unsure = jnp.max(probs, axis=-1) < low_confidence
  onehot = jax.nn.one_hot(labels_B, num_classes)
  low_conf_K = jnp.sum(onehot * unsure[:, None], 0) / jnp.maximum(jnp.sum(onehot, 0), 1)
  return low_conf_K, jnp.mean(jnp.argmax(probs, -1) == labels_B)


def fold(rng: jax.Array, *values) -> jax.Array:
  """`rng` with each of `values` folded in: every draw of a run is a function of its position."""
  for v in values:
    rng = jax.random.fold_in(rng, v)
  return rng

