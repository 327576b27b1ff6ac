"""Fine-tuning a backbone with dense heads on one seed: the loop behind `caedfkd transfer`.

LibMTL's NYUv2 recipe is the default (Adam 1e-4 with PyTorch's L2 weight decay 1e-5, the
learning rate halved every 100 epochs, 200 epochs of batch 8, the last incomplete batch
dropped), with its three losses equally weighted and its metrics on the whole validation split
after the last epoch: the final network is scored, never a best epoch. One seed runs in its own
folder: Orbax checkpoints while it trains (every few minutes, at a time budget, on Ctrl-C), and
`result.json` once it is done, so a rerun of the same command resumes it or reads it back.
"""

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caedfkd_jax.io import atomic_files
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.io import data as data_io
from caedfkd_jax.runtime import mesh as mesh_lib
from caedfkd_jax.transfer import data as data_lib
from caedfkd_jax.transfer import losses, metrics
from caedfkd_jax.transfer import model as model_lib

RESULT = "result.json"
CHECKPOINTS = "checkpoints"
# Settings that steer one invocation, not what a seed computes: free to change on a resume.
INVOCATION = frozenset({"time_budget_minutes", "checkpoint_every_minutes", "predictions",
                        "progress"})


@dataclasses.dataclass(frozen=True)
class TransferConfig:
  protocol: str = "finetune"          # finetune: every weight; frozen: the heads only
  head: str | None = None             # None: deeplabv3plus (finetune) or linear (frozen)
  head_features: int = 256
  aspp_rates: tuple[int, ...] | None = None   # None: model_lib.default_rates
  output_stride: int | None = None    # Bottleneck ResNets: 8 or 16 dilates the last stages
  epochs: int = 200
  batch_size: int = 8
  learning_rate: float = 1e-4
  weight_decay: float = 1e-5          # PyTorch Adam's (coupled) L2, as LibMTL's
  lr_halve_every: int = 100           # epochs; 0: constant
  augment: bool = False               # NYUv2: scale-crop + flip; segmentation: resize-crop +
                                      # flip (LibMTL's --aug, off by default)
  eval_batch_size: int = 8
  random_backbone: bool = False       # the random-initialisation row: fresh backbone weights
  time_budget_minutes: float = 0.0    # 0: none; the seed checkpoints and stops when it is spent
  checkpoint_every_minutes: float = 5.0
  predictions: bool = False           # also write the validation predictions as .npy files
  progress: bool = True

  @property
  def head_name(self) -> str:
    return self.head or model_lib.DEFAULT_HEAD[self.protocol]

  def computing(self) -> dict[str, Any]:
    """The fields that decide the numbers (a resume must not change them)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in INVOCATION}


class State(struct.PyTreeNode):
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array


def check_config(config: TransferConfig) -> None:
  if config.protocol not in model_lib.PROTOCOLS:
    raise ValueError(f"protocol {config.protocol!r}: use one of {', '.join(model_lib.PROTOCOLS)}.")
  model_lib.check_head(config.head_name)
  for name in ("epochs", "batch_size", "eval_batch_size", "head_features"):
    if getattr(config, name) < 1:
      raise ValueError(f"{name}={getattr(config, name)}: give 1 or more.")
  if config.learning_rate <= 0 or config.weight_decay < 0 or config.lr_halve_every < 0:
    raise ValueError(f"learning_rate={config.learning_rate}, weight_decay={config.weight_decay}, "
                     f"lr_halve_every={config.lr_halve_every}: need lr > 0 and the others >= 0.")


def make_optimizer(config: TransferConfig, steps_per_epoch: int, params: Any
                   ) -> optax.GradientTransformation:
  """LibMTL's: torch Adam(lr, weight_decay) (L2 added to the gradient) and StepLR(100, 0.5)
  stepped each epoch; under `frozen` the backbone's params get no update and no state."""
  lr = config.learning_rate
  if config.lr_halve_every:
    lr = optax.exponential_decay(lr, config.lr_halve_every * steps_per_epoch, 0.5, staircase=True)
  train = optax.chain(optax.add_decayed_weights(config.weight_decay), optax.adam(lr))
  labels = model_lib.param_labels(params, config.protocol == "frozen")
  return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, labels)


def _normalise(image: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  return (data_lib.image_as_float(image) - mean) / std


def augment_batch(rng: jax.Array, batch: dict[str, jax.Array], mean: jax.Array
                  ) -> dict[str, jax.Array]:
  """LibMTL's NYUv2 augmentation where the batch has depth or normals, else mmsegmentation's
  resize-crop-flip at the stored size (padding with the mean colour, as after normalising)."""
  if "depth" in batch or "normal" in batch:
    return data_lib.nyu_augment(rng, batch)
  size = batch["image"].shape[1:3]
  return data_lib.segmentation_augment(rng, batch, size, image_pad=mean)


def train_step(model: model_lib.DenseModel, tx: optax.GradientTransformation, state: State,
               batch: dict[str, jax.Array], rng: jax.Array, mean: jax.Array, std: jax.Array,
               *, frozen: bool, augment: bool) -> tuple[State, dict[str, jax.Array]]:
  """One optimiser step on a batch; returns the new state and the losses (total and per task)."""
  k_aug, k_drop = jax.random.split(rng)
  if augment:
    batch = augment_batch(k_aug, batch, mean)
  x = _normalise(batch["image"], mean, std)
  targets = {t: batch[t] for t in model.tasks}

  def loss_fn(params):
    outputs, new = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                               train=True, train_backbone=not frozen, mutable=["batch_stats"],
                               rngs={"dropout": k_drop})
    total, terms = losses.multitask_loss(outputs, targets)
    return total, (terms, new["batch_stats"])

  (total, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = State(optax.apply_updates(state.params, updates), batch_stats, opt_state, state.step + 1)
  return state, {"loss": total, **terms}


def predict(model: model_lib.DenseModel, variables: dict[str, Any], images: jax.Array,
            mean: jax.Array, std: jax.Array) -> dict[str, jax.Array]:
  """Eval-mode outputs: segmentation class ids, depth, unit normals."""
  out = model.apply(variables, _normalise(images, mean, std), train=False)
  if "segmentation" in out:
    out["segmentation"] = jnp.argmax(out["segmentation"], axis=-1).astype(jnp.int32)
  if "normal" in out:
    n = out["normal"]
    out["normal"] = n * jax.lax.rsqrt(jnp.sum(n * n, axis=-1, keepdims=True) + 1e-12)
  return out


def epoch_order(seed: int, epoch: int, num_examples: int, batch: int) -> np.ndarray:
  """The transfer's epoch batches: `io.data.epoch_order` salted with (num_examples, 27), the
  orders every recorded transfer run used."""
  return data_io.epoch_order(seed, epoch, num_examples, batch, salt=(num_examples, 27))


def default_mesh(batch: int, eval_batch: int):
  """The data-parallel mesh over as many of this process's devices as split both batches
  evenly (all of them for LibMTL's batch 8 on 1, 2, 4 or 8 devices)."""
  count = math.gcd(batch, eval_batch, jax.local_device_count())
  return mesh_lib.make_mesh(jax.local_devices()[:count])


class Trainer:
  """One seed of one transfer: model, optimiser and compiled steps."""

  def __init__(self, bundle: bundle_lib.Bundle, train: data_lib.DenseDataset,
               config: TransferConfig, seed: int, mesh=None):
    check_config(config)
    self.config, self.seed, self.bundle = config, seed, bundle
    self.tasks = train.tasks
    stride = model_lib.total_stride(bundle.spec.arch, bundle.spec.image_size,
                                    config.output_stride)
    data_lib.check_size(*train.image_shape, stride)
    self.batch = min(config.batch_size, len(train))
    self.mesh = mesh if mesh is not None else default_mesh(self.batch, config.eval_batch_size)
    if self.batch % self.mesh.size or config.eval_batch_size % self.mesh.size:
      raise ValueError(f"batch {self.batch} and eval batch {config.eval_batch_size} must be "
                       f"multiples of the {self.mesh.size} devices the batch is split over.")
    self.steps_per_epoch = len(train) // self.batch
    self.spec = model_lib.DenseSpec(
        bundle.spec.arch, self.tasks, train.num_classes, config.head_name, config.head_features,
        tuple(config.aspp_rates or model_lib.default_rates(stride)), config.output_stride)
    self.model = model_lib.build(self.spec)
    self.mean = jnp.asarray(bundle.spec.mean, jnp.float32)
    self.std = jnp.asarray(bundle.spec.std, jnp.float32)
    self.key = jax.random.key(seed)
    init_key, self.step_key = jax.random.split(self.key)
    variables = model_lib.init_variables(self.model, bundle, train.image_shape, init_key,
                                         config.random_backbone)
    self.tx = make_optimizer(config, self.steps_per_epoch, variables["params"])
    replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(mesh_lib.DATA))
    state = State(variables["params"], variables["batch_stats"],
                  self.tx.init(variables["params"]), jnp.zeros((), jnp.int32))
    self.initial_state = jax.device_put(state, replicated)
    step = functools.partial(train_step, self.model, self.tx, frozen=config.protocol == "frozen",
                             augment=config.augment)
    self._step = jax.jit(lambda s, b, r: step(s, b, r, self.mean, self.std), donate_argnums=0)
    self._predict = jax.jit(lambda v, x: predict(self.model, v, x, self.mean, self.std))

  @property
  def total_steps(self) -> int:
    return self.config.epochs * self.steps_per_epoch

  def step(self, state: State, batch: dict[str, np.ndarray]) -> tuple[State, dict]:
    rng = jax.random.fold_in(self.step_key, int(state.step))
    return self._step(state, jax.device_put(batch, self.batch_sharding), rng)

  def predictions(self, state: State, dataset: data_lib.DenseDataset
                  ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Yields (indices, outputs as numpy) over `dataset` in eval batches; the last batch is
    padded with repeats to keep one compiled shape, and the repeats are dropped."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    n, b = len(dataset), self.config.eval_batch_size
    for start in range(0, n, b):
      idx = np.arange(start, min(start + b, n))
      padded = np.resize(idx, b)
      images = jax.device_put(dataset.images[padded], self.batch_sharding)
      out = jax.device_get(self._predict(variables, images))
      yield idx, {k: v[:len(idx)] for k, v in out.items()}

  def evaluate(self, state: State, dataset: data_lib.DenseDataset,
               write_to: str | None = None) -> dict[str, dict[str, float]]:
    """LibMTL's metrics over `dataset`; with `write_to`, its predictions as .npy files too."""
    seg = metrics.SegmentationMetric(dataset.num_classes, data_lib.IGNORE_LABEL)
    depth, normal = metrics.DepthMetric(), metrics.NormalMetric()
    files = {}
    for idx, out in self.predictions(state, dataset):
      if write_to is not None and not files:
        os.makedirs(write_to, exist_ok=True)
        files = {k: np.lib.format.open_memmap(os.path.join(write_to, f"{k}.npy"), "w+",
                                              v.dtype, (len(dataset), *v.shape[1:]))
                 for k, v in out.items()}
      for k, f in files.items():
        f[idx] = out[k]
      seg.update(out["segmentation"], dataset.labels[idx])
      if dataset.depth is not None:
        depth.update(out["depth"], dataset.depth[idx])
      if dataset.normal is not None:
        normal.update(out["normal"], dataset.normal[idx])
    for f in files.values():
      f.flush()
    result = {"segmentation": seg.result()}
    if dataset.depth is not None:
      result["depth"] = depth.result()
    if dataset.normal is not None:
      result["normal"] = normal.result()
    return result


def _checkpoints(folder: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.join(os.path.abspath(folder), CHECKPOINTS),
                               options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))


def _save(manager: ocp.CheckpointManager, state: State, progress: dict) -> None:
  at = int(state.step)
  if manager.latest_step() == at:
    return
  manager.save(at, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           progress=ocp.args.JsonSave(progress)))
  manager.wait_until_finished()


def check_resume(folder: str, settings: dict[str, Any]) -> None:
  """Refuses to resume or read back a seed whose folder was made with other settings: the
  checkpoint's state would continue a different transfer, its result report another."""
  path = os.path.join(folder, "settings.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
  if changed:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
    raise ValueError(f"{folder} holds a transfer made with other settings ({listed}); pass "
                     "another --out, or the same settings to resume it.")


def fit_seed(trainer: Trainer, train: data_lib.DenseDataset, val: data_lib.DenseDataset,
             folder: str, settings: dict[str, Any], stop=None, log: Callable[[str], None] = print
             ) -> dict[str, Any] | None:
  """Trains and scores one seed in `folder`; returns its result, or None when the time budget
  or a stop request checkpointed it first (rerun to resume). A finished seed is read back."""
  result_path = os.path.join(folder, RESULT)
  check_resume(folder, settings)
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  os.makedirs(folder, exist_ok=True)
  atomic_files.write_text(os.path.join(folder, "settings.json"),
                          json.dumps(settings, indent=2, sort_keys=True) + "\n")
  config = trainer.config
  manager = _checkpoints(folder)
  state, progress = trainer.initial_state, {"train_seconds": 0.0}
  if manager.latest_step() is not None:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()))
    state, progress = restored["state"], dict(restored["progress"])
    log(f"seed {trainer.seed}: resumed at step {int(state.step)} of {trainer.total_steps}")
  start, seconds_before = time.time(), float(progress["train_seconds"])
  last_save = start
  elapsed = lambda: seconds_before + time.time() - start
  budget = 60.0 * config.time_budget_minutes
  bar = tqdm(total=trainer.total_steps, initial=int(state.step), unit="step",
             desc=f"seed {trainer.seed} {config.protocol}", disable=not config.progress)
  losses_sum = dict(progress.get("last_epoch_loss_sums", {}))
  losses_count = int(progress.get("last_epoch_steps", 0))
  progress_now = lambda: {"train_seconds": elapsed(), "last_epoch_steps": losses_count,
                          "last_epoch_loss_sums": {k: float(v) for k, v in losses_sum.items()}}
  stopped = None
  try:
    while int(state.step) < trainer.total_steps:
      epoch, within = divmod(int(state.step), trainer.steps_per_epoch)
      order = epoch_order(trainer.seed, epoch, len(train), trainer.batch)
      for idx in order[within:]:
        state, terms = trainer.step(state, train.batch(idx))
        bar.update()
        if epoch == config.epochs - 1:
          for k, v in terms.items():
            losses_sum[k] = losses_sum.get(k, 0.0) + v
          losses_count += 1
        if stop is not None and stop.requested:
          stopped = f"stopped by {stop.signal_name}"
        elif budget and elapsed() > budget:
          stopped = f"its time budget ({config.time_budget_minutes:g} minutes) spent"
        if stopped:
          break
        if time.time() - last_save > 60.0 * config.checkpoint_every_minutes:
          _save(manager, state, progress_now())
          last_save = time.time()
      if stopped:
        break
    bar.close()
    if stopped:
      _save(manager, state, progress_now())
      log(f"seed {trainer.seed}: {stopped} at step {int(state.step)} of {trainer.total_steps}; "
          "checkpointed: rerun the same command to resume.")
      return None
    losses_last = {k: float(v) / max(losses_count, 1) for k, v in losses_sum.items()}
    if not all(np.isfinite(v) for v in losses_last.values()):
      raise FloatingPointError(f"seed {trainer.seed}: the last epoch's losses are not finite "
                               f"({losses_last}); lower --lr.")
    train_seconds = elapsed()
    log(f"seed {trainer.seed}: {int(state.step)} steps in {train_seconds:.0f} s "
        f"({int(state.step) / max(train_seconds, 1e-9):.2f} steps/s, compilation included); "
        f"scoring {len(val)} val images")
    scores = trainer.evaluate(state, val, os.path.join(folder, "predictions")
                              if config.predictions else None)
    from caedfkd_jax.transfer import figures   # PIL only where a figure is drawn
    figures.save_predictions_png(os.path.join(folder, "predictions.png"), trainer, state, val)
    result = {"seed": trainer.seed, "steps": int(state.step), "train_seconds": train_seconds,
              "last_epoch_losses": losses_last, **scores}
    _save(manager, state, progress_now())
    atomic_files.write_text(result_path, json.dumps(result, indent=2) + "\n")
    return result
  finally:
    bar.close()
    manager.close()
