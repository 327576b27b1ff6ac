"""`caedfkd train`: supervised training of a zoo network on labelled images, as a resumable run.

The train split sits on the devices as uint8, replicated; each step gathers its batch by index
(the indices sharded over the ("data",) mesh), augments it on the device and runs the shared
supervised step (eval/supervised.py). Epoch e visits the images in a permutation drawn from
(seed, e); a *unit* is `steps_per_call` of its steps (one lax.scan on accelerators, one call a
step on CPUs). Every random draw is folded from (seed, epoch, step), so a run stopped at any
unit resumes exactly as the uninterrupted run continues.

The epoch kept is chosen on a stratified held-out part of the train split, never on the test
split, which is only reported. Importable from a notebook: `train(config, workdir)`.
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caedfkd_jax import models
from caedfkd_jax.config import fields, train_defaults
from caedfkd_jax.engine import checkpoint, steps as steps_lib
from caedfkd_jax.engine.clock import Clock
from caedfkd_jax.engine.metrics_writer import MetricsWriter
from caedfkd_jax.eval import evaluate, supervised
from caedfkd_jax.io import atomic_files, bundle as bundle_lib, class_names, data as data_lib
from caedfkd_jax.runtime import (cpu_devices, interrupts, mesh as mesh_lib, multihost, platform,
                                 xla_cpu)

MODEL_DIR = "model"
HOLDOUT_SALT = 7919   # Seeds the held-out draw apart from every other draw of the seed.


class NonFiniteLossError(RuntimeError):
  pass


class State(struct.PyTreeNode):
  """Everything a run needs to continue exactly where it stopped."""
  variables: Any          # {"params", "batch_stats"} being trained.
  opt_state: Any
  best: Any               # The variables at the end of the best held-out epoch so far.
  best_top1: jax.Array    # float32: its held-out top-1 (-1 before any).
  best_epoch: jax.Array   # int32: epochs done when it was reached (0 before any).
  epoch: jax.Array        # int32: the current epoch.
  unit: jax.Array         # int32: the next unit inside it.


# --------------------------------------------------------------------------- #
# Config checks, data, schedule
# --------------------------------------------------------------------------- #


def check_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
  """Refuses a value no run could use, before any work: one line naming the field and the fix."""
  def bad(field, why):
    raise ValueError(f"config.{field}={fields.get_field(config, field)!r}: {why}")
  if config.arch not in models.ARCHS:
    bad("arch", f"not a zoo network; use one of {', '.join(sorted(models.ARCHS))}.")
  if not config.data:
    raise ValueError("config.data is empty: pass --config.data=SPEC, " + data_lib.SPEC_HELP + ".")
  for field in ("epochs", "batch_size", "steps_per_call", "eval_batch_size"):
    if int(fields.get_field(config, field)) < 1:
      bad(field, "give 1 or more.")
  if config.batch_size % num_devices:
    bad("batch_size", f"the global batch is split over {num_devices} devices; give a multiple "
        f"of {num_devices}.")
  if not config.learning_rate > 0:
    bad("learning_rate", "give a positive rate.")
  for field in ("momentum", "weight_decay", "label_smoothing", "warmup_epochs", "padding",
                "time_budget_minutes", "checkpoint_every_minutes", "max_units"):
    if fields.get_field(config, field) < 0:
      bad(field, "cannot be negative.")
  if not 0 <= config.momentum < 1:
    bad("momentum", "give a value in [0, 1).")
  if config.label_smoothing >= 1:
    bad("label_smoothing", "give a value in [0, 1).")
  if config.schedule not in train_defaults.SCHEDULES:
    bad("schedule", f"use one of {', '.join(train_defaults.SCHEDULES)}.")
  if config.schedule == "steps":
    milestones = list(config.milestones)
    if milestones != sorted(set(milestones)) or any(not 0 < m < config.epochs for m in milestones):
      bad("milestones", f"give increasing epochs between 1 and epochs - 1 ({config.epochs - 1}).")
    if not 0 < config.gamma <= 1:
      bad("gamma", "give a factor in (0, 1].")
  if config.warmup_epochs >= config.epochs:
    bad("warmup_epochs", f"must be fewer than epochs ({config.epochs}).")
  if config.augment not in supervised.AUGMENTS:
    bad("augment", f"use one of {', '.join(supervised.AUGMENTS)}.")
  low, high = config.crop_scale
  if not 0 < low <= high <= 1:
    bad("crop_scale", "give (min, max) with 0 < min <= max <= 1.")
  if not 0 <= config.holdout_fraction <= 0.5:
    bad("holdout_fraction", "give a fraction in [0, 0.5]; 0 keeps the last epoch.")
  if bool(config.mean) != bool(config.std) or (config.mean and (
      len(config.mean) != 3 or len(config.std) != 3 or min(config.std) <= 0)):
    raise ValueError(f"config.mean={tuple(config.mean)!r}, config.std={tuple(config.std)!r}: give "
                     "both as three channel values (std positive), or leave both empty to compute "
                     "them from the train images.")
  try:
    platform.compute_dtype(config.compute_dtype)
    xla_cpu.compiler_options(config.cpu_kernels, "gpu")
  except ValueError as e:
    raise ValueError(f"config.{e}") from None


def holdout_indices(labels: np.ndarray, num_classes: int, fraction: float, seed: int
                    ) -> np.ndarray:
  """Sorted indices of a stratified `fraction` of every class (at least one image of a class
  with two or more while fraction > 0), drawn from the seed alone."""
  if fraction <= 0:
    return np.zeros((0,), np.int64)
  rng = np.random.default_rng([seed, HOLDOUT_SALT])
  chosen = []
  for k in range(num_classes):
    members = np.flatnonzero(labels == k)
    n = min(max(1, round(fraction * len(members))), len(members) - 1)
    chosen.append(rng.permutation(members)[:n])
  return np.sort(np.concatenate(chosen))


def _subset(dataset: data_lib.Dataset, index: np.ndarray, what: str) -> data_lib.Dataset:
  return data_lib.Dataset(dataset.images[index], dataset.labels[index], dataset.class_names,
                          source=f"{dataset.source} ({what})")


def channel_stats(images_uint8: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], ...]:
  """Per-channel mean and std of images scaled to [0, 1], accumulated in float64."""
  total = np.zeros(3)
  squares = np.zeros(3)
  for start in range(0, len(images_uint8), chunk):
    x = images_uint8[start:start + chunk].reshape(-1, 3).astype(np.float64) / 255.0
    total += x.sum(0)
    squares += (x * x).sum(0)
  n = images_uint8.size // 3
  mean = total / n
  std = np.sqrt(np.maximum(squares / n - mean * mean, 0.0))
  return tuple(round(float(v), 6) for v in mean), tuple(round(float(max(v, 1e-6)), 6) for v in std)


def data_sha256(dataset: data_lib.Dataset) -> str:
  """What `train` identifies its train images by: sha256 of their uint8 bytes and labels."""
  digest = hashlib.sha256()
  digest.update(f"{dataset.images.shape}:{dataset.class_names}".encode())
  digest.update(np.ascontiguousarray(dataset.images).tobytes())
  digest.update(dataset.labels.astype(np.int32).tobytes())
  return digest.hexdigest()


@dataclasses.dataclass
class Splits:
  train: data_lib.Dataset
  holdout: data_lib.Dataset | None
  test: data_lib.Dataset | None


def load_splits(config, progress: bool = True, log: Callable[[str], None] = print) -> Splits:
  """The train split less its held-out part, the held-out part, and the test split (or None)."""
  full = data_lib.load_dataset(config.data, config.train_split, progress=progress)
  if full.image_shape[0] != full.image_shape[1]:
    raise ValueError(f"config.data={config.data!r}: the images are {full.image_shape[1]}x"
                     f"{full.image_shape[0]}; train needs square images (a bundle records one "
                     "input size): resize them first.")
  held = holdout_indices(full.labels, full.num_classes, config.holdout_fraction, config.seed)
  kept = np.setdiff1d(np.arange(len(full)), held)
  if len(kept) < config.batch_size:
    raise ValueError(f"config.batch_size={config.batch_size} is more than the {len(kept)} train "
                     f"images of {full.source} (after holding out {len(held)}); lower it.")
  train = _subset(full, kept, "train part") if len(held) else full
  holdout = _subset(full, held, f"held out, {config.holdout_fraction:g}") if len(held) else None
  test = None
  if config.test_split:
    try:
      test = data_lib.load_dataset(config.data, config.test_split, progress=progress)
    except (FileNotFoundError, ValueError) as e:
      log(f"No test split {config.test_split!r} in {config.data} ({str(e).split(';')[0]}): "
          "only the held-out part is scored. Set --config.test_split='' to say so.")
    if test is not None and test.source == full.source:   # A split folder given as the data.
      log(f"{config.data} is one split folder: it has no separate test split, so none is "
          "scored. Set --config.test_split='' to say so.")
      test = None
    if test is not None and ([class_names.name_key(n) for n in test.class_names]
                             != [class_names.name_key(n) for n in full.class_names]):
      raise ValueError(f"config.data={config.data!r}: the {config.test_split!r} split's classes "
                       f"({', '.join(test.class_names[:5])}, ...) are not the "
                       f"{config.train_split!r} split's ({', '.join(full.class_names[:5])}, ...); "
                       "both splits need the same class folders.")
    if test is not None:
      evaluate.check_image_size(bundle_lib.ModelSpec(config.arch, full.num_classes,
                                                     full.image_shape[0]), test, "The train split")
  return Splits(train, holdout, test)


def learning_rate_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The rate at each step: linear warm-up, then cosine to 0 / steps at milestone epochs /
  constant. Milestone m multiplies the rate by gamma from the first step of epoch m on, as
  PyTorch's MultiStepLR stepped once an epoch."""
  total = config.epochs * steps_per_epoch
  warm = config.warmup_epochs * steps_per_epoch
  lr = config.learning_rate
  if config.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, total - warm)
  elif config.schedule == "steps":
    # optax applies a boundary's scale from that count on (tested against MultiStepLR).
    main = optax.piecewise_constant_schedule(
        lr, {m * steps_per_epoch - warm: config.gamma for m in config.milestones})
  else:
    main = optax.constant_schedule(lr)
  if not warm:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(config, steps_per_epoch: int) -> tuple[optax.GradientTransformation,
                                                          optax.Schedule]:
  """torch.optim.SGD(momentum, weight_decay, nesterov) with the schedule, and the schedule."""
  schedule = learning_rate_schedule(config, steps_per_epoch)
  return supervised.sgd(schedule, config.momentum, config.weight_decay, config.nesterov), schedule


# --------------------------------------------------------------------------- #
# The compiled step
# --------------------------------------------------------------------------- #


def make_step_fns(model, tx, config, mean, std, mesh) -> tuple[Callable, bool]:
  """(unit, fused): `unit(variables, opt_state, images, labels, idx_SxB, epoch, first_step) ->
  (variables, opt_state, losses_S)`, one compiled scan when fused, else one call per step."""
  mean_a, std_a = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
  key = jax.random.key(config.seed)
  platform_name = mesh.devices.flat[0].platform

  def one_step(variables, opt_state, images_all, labels_all, idx_B, epoch, step):
    idx_B = mesh_lib.constrain_batch(idx_B, mesh)
    images, labels = mesh_lib.constrain_batch(
        (jnp.take(images_all, idx_B, axis=0), jnp.take(labels_all, idx_B, axis=0)), mesh)
    rng = jax.random.fold_in(jax.random.fold_in(key, epoch), step)
    return supervised.train_step(
        model, tx, variables, opt_state, images, labels, rng, mean_a, std_a, config.padding,
        augment_kind=config.augment, crop_scale=tuple(config.crop_scale),
        label_smoothing=config.label_smoothing)

  fused = steps_lib.resolve_fuse(config, platform=platform_name)
  kernels = functools.partial(xla_cpu.jit, choice=config.cpu_kernels, platform=platform_name)
  if fused:
    def scanned(variables, opt_state, images_all, labels_all, idx_SxB, epoch, first_step):
      def body(carry, xs):
        idx_B, i = xs
        variables, opt_state, loss = one_step(*carry, images_all, labels_all, idx_B, epoch,
                                              first_step + i)
        return (variables, opt_state), loss
      (variables, opt_state), losses = jax.lax.scan(
          body, (variables, opt_state), (idx_SxB, jnp.arange(idx_SxB.shape[0])))
      return variables, opt_state, losses
    return kernels(scanned, elementwise=False, donate_argnums=(0, 1)), True

  step = kernels(one_step, elementwise=True, donate_argnums=(0, 1))

  def stepped(variables, opt_state, images_all, labels_all, idx_SxB, epoch, first_step):
    losses = []
    for i in range(idx_SxB.shape[0]):
      variables, opt_state, loss = step(variables, opt_state, images_all, labels_all, idx_SxB[i],
                                        epoch, first_step + i)
      losses.append(loss)
    return variables, opt_state, jnp.stack(losses)
  return stepped, False


def _all_finite(variables) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(variables)]))


# --------------------------------------------------------------------------- #
# A run
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: str
  splits: Splits
  mean: tuple[float, ...]
  std: tuple[float, ...]
  model: Any                      # In the compute dtype (training).
  eval_model: Any                 # float32 (evaluation, the bundle).
  schedule: optax.Schedule
  steps_per_epoch: int
  units_per_epoch: int
  unit_fn: Callable
  finite_fn: Callable
  images: jax.Array               # The train split on the devices (uint8, replicated).
  labels: jax.Array
  batch_sharding: NamedSharding
  checkpoints: checkpoint.Checkpoints
  clock: Clock
  writer: MetricsWriter
  bar: Any
  identity: dict[str, str]
  config_history: list[dict]
  saved_at: tuple[int, int] = (0, 0)
  units_run: int = 0
  stop: interrupts.StopRequest = dataclasses.field(default_factory=interrupts.StopRequest)

  def progress(self, partial: dict | None = None) -> dict[str, Any]:
    return {**self.clock.state(), **self.identity, "mean": list(self.mean), "std": list(self.std),
            "config_changes": self.config_history, "partial_epoch": partial}

  def save(self, state: State, epoch: int, unit: int, partial: dict | None = None) -> None:
    self.checkpoints.save(state, epoch, unit, self.config, self.progress(partial))
    self.clock.saved()
    self.saved_at = (epoch, unit)


def _check_resume(workdir: str, saved_config: dict, saved_progress: dict, config,
                  identity: dict[str, str]) -> dict[str, tuple[Any, Any]]:
  """Refuses to continue a checkpoint of another kind of run, other data or other settings."""
  if saved_config and "arch" not in saved_config:
    raise ValueError(f"{workdir} holds a `caedfkd distill` run, not a `caedfkd train` run; use a "
                     "new --workdir.")
  if saved_progress.get("data_sha256") not in (None, identity["data_sha256"]):
    raise ValueError(f"{workdir} holds a run trained on other images than config.data="
                     f"{config.data!r} gives (their sha256 differs); a run cannot switch data. "
                     "Use the same data or a new --workdir.")
  changes = checkpoint.config_changes(saved_config, config,
                                      reference=train_defaults.get_config(),
                                      invocation_fields=train_defaults.INVOCATION_FIELDS)
  if saved_progress.get("state_shapes") not in (None, identity["state_shapes"]):
    raise ValueError(f"{workdir} holds a run whose saved state has other shapes "
                     f"({checkpoint.listed(changes) or 'another network'}); use the saved values "
                     "or a new --workdir.")
  checkpoint.refuse_config_changes(workdir, changes, config, "the bundle")
  return changes


def prepare(config: ml_collections.ConfigDict, workdir: str, log: Callable[[str], None] = print
            ) -> tuple[Run, State, int, int, dict | None]:
  """Everything a run needs, checked before any work; (run, state, epoch, unit, partial epoch)."""
  cpu_devices.reserve_intra_op_threads()
  multihost.initialize(config)
  platform.enable_compilation_cache(config.compilation_cache_dir)
  mesh = mesh_lib.make_mesh(mesh_lib.select_devices(config.num_devices))
  check_config(config, mesh.size)
  splits = load_splits(config, progress=multihost.is_primary(), log=log)
  train_set = splits.train
  num_classes, image_size = train_set.num_classes, train_set.image_shape[0]
  os.makedirs(workdir, exist_ok=True)

  steps_per_epoch = len(train_set) // config.batch_size
  units_per_epoch = -(-steps_per_epoch // config.steps_per_call)
  checkpoint.check_units_per_epoch([units_per_epoch])
  tx, schedule = make_optimizer(config, steps_per_epoch)
  dtype = platform.compute_dtype(config.compute_dtype)
  model = models.create_model(config.arch, num_classes, dtype)
  spec = bundle_lib.ModelSpec(config.arch, num_classes, image_size)

  def initial_state():
    variables = bundle_lib.init_variables(spec, jax.random.fold_in(jax.random.key(config.seed), 1))
    # `best` is a copy: the step donates the buffers of `variables`.
    return State(variables=variables, opt_state=tx.init(variables["params"]),
                 best=jax.tree.map(jnp.copy, variables),
                 best_top1=jnp.float32(-1), best_epoch=jnp.int32(0), epoch=jnp.int32(0),
                 unit=jnp.int32(0))

  replicated = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          jax.eval_shape(initial_state))
  identity = {"data_sha256": data_sha256(train_set),
              "state_shapes": checkpoint.shapes_signature(abstract)}
  changes: dict[str, tuple[Any, Any]] = {}
  checkpoints = checkpoint.Checkpoints(workdir, config.max_checkpoints)
  state, saved = checkpoints.restore(abstract, lambda c, p: changes.update(
      _check_resume(workdir, c, p, config, identity)))
  resumed = state is not None
  if not resumed:
    state = multihost.put(initial_state(), replicated)
  if config.mean:
    mean, std = tuple(config.mean), tuple(config.std)
  elif resumed and saved.get("mean"):
    mean, std = tuple(saved["mean"]), tuple(saved["std"])
  else:
    mean, std = channel_stats(train_set.images)
  epoch, unit = int(state.epoch), int(state.unit)
  unit_fn, fused = make_step_fns(model, tx, config, mean, std, mesh)
  bar = tqdm(total=config.epochs * steps_per_epoch,
             initial=epoch * steps_per_epoch + min(unit * config.steps_per_call, steps_per_epoch),
             unit="step", desc=f"train {config.arch}", dynamic_ncols=True,
             disable=not multihost.is_primary())
  run = Run(
      config=config, workdir=workdir, splits=splits, mean=mean, std=std, model=model,
      eval_model=models.create_model(config.arch, num_classes), schedule=schedule,
      steps_per_epoch=steps_per_epoch, units_per_epoch=units_per_epoch, unit_fn=unit_fn,
      finite_fn=jax.jit(_all_finite),
      images=multihost.put(train_set.images, replicated),
      labels=multihost.put(train_set.labels, replicated),
      batch_sharding=NamedSharding(mesh, P(None, mesh_lib.DATA)),
      checkpoints=checkpoints, clock=Clock(saved.get("train_seconds", 0.0),
                                           saved.get("wall_seconds")),
      writer=MetricsWriter(workdir, enabled=multihost.is_primary(),
                           keep_through_epoch=epoch if resumed else 0),
      bar=bar, identity=identity, config_history=list(saved.get("config_changes", [])),
      saved_at=(epoch, unit))
  if not multihost.is_primary():
    bar.write = lambda *args, **kwargs: None
  _banner(run, mesh, fused, resumed, epoch, unit, changes)
  return run, state, epoch, unit, (saved.get("partial_epoch") if resumed and unit else None)


def _banner(run: Run, mesh, fused: bool, resumed: bool, epoch: int, unit: int,
            changes: dict) -> None:
  config, splits = run.config, run.splits
  say = run.bar.write
  held = f", {len(splits.holdout)} held out" if splits.holdout else ", none held out"
  test = f", {len(splits.test)} test" if splits.test else ", no test split"
  say(f"train {config.arch} ({config.recipe}) on {config.data}: {len(splits.train)} train images"
      f"{held}{test}; {splits.train.num_classes} classes, {splits.train.image_shape[0]} px.")
  say(f"{config.epochs} epochs of {run.steps_per_epoch} steps (batch {config.batch_size}, "
      f"{config.schedule} from {config.learning_rate:g}) on {mesh.size} "
      f"{mesh.devices.flat[0].platform} device(s){', fused' if fused else ''}; mean "
      f"{run.mean}, std {run.std}; budget "
      f"{f'{config.time_budget_minutes:g} min' if config.time_budget_minutes else 'none'}; "
      f"workdir {run.workdir}.")
  if resumed:
    say(f"Resumed from {run.checkpoints.directory} at epoch {epoch}, unit {unit} "
        f"({run.clock.wall_before / 60:.1f} minutes so far).")
  if changes:
    run.config_history.append({"epoch": epoch, "unit": unit,
                               "changes": {k: list(v) for k, v in changes.items()}})
    say("Continuing with a changed config: " + ", ".join(f"{k}: {a!r} -> {b!r}"
                                                         for k, (a, b) in changes.items()))
  say("The first steps compile the train step (tens of seconds on a CPU).")


def _budget_spent(run: Run) -> bool:
  budget = run.config.time_budget_minutes * 60
  return bool(budget) and run.clock.out_of(budget)


def run_epoch(run: Run, state: State, epoch: int, unit: int, partial: dict | None
              ) -> tuple[State, int, dict, str | None]:
  """Units `unit`.. of `epoch`; (state, next unit, the epoch's running sums, stop reason)."""
  config = run.config
  order = data_lib.epoch_order(config.seed, epoch, len(run.splits.train), config.batch_size)
  sums = partial or {"loss_sum": 0.0, "steps": 0, "train_seconds_at_start": run.clock.train()}
  variables, opt_state = state.variables, state.opt_state
  while unit < run.units_per_epoch:
    first = unit * config.steps_per_call
    idx = order[first:first + config.steps_per_call]
    idx = multihost.put(idx, run.batch_sharding)
    variables, opt_state, losses = run.unit_fn(variables, opt_state, run.images, run.labels, idx,
                                               jnp.int32(epoch), jnp.int32(first))
    losses, finite = multihost.to_host((losses, run.finite_fn(variables)))
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size or not finite:
      where = (f"the loss became {losses[bad[0]]} at step {first + bad[0]}" if bad.size
               else f"the weights became non-finite in steps {first}-{first + len(losses) - 1}")
      raise NonFiniteLossError(
          f"{where} of epoch {epoch}. The run stopped; its last checkpoint (epoch "
          f"{run.saved_at[0]}, unit {run.saved_at[1]}) is kept. Lower --config.learning_rate, or "
          "try --config.compute_dtype=float32.")
    sums["loss_sum"] += float(np.sum(losses, dtype=np.float64))
    sums["steps"] += len(losses)
    unit += 1
    run.units_run += 1
    run.bar.update(len(losses))
    run.bar.set_postfix({"loss": f"{float(losses[-1]):.3g}"}, refresh=False)
    mid_epoch = unit < run.units_per_epoch   # (at the epoch's end, end_epoch moves it on)
    state = state.replace(variables=variables, opt_state=opt_state,
                          unit=jnp.int32(unit) if mid_epoch else state.unit)
    out_of_time, save_due, interrupted = multihost.agree(
        _budget_spent(run), run.clock.save_due(config.checkpoint_every_minutes * 60),
        run.stop.requested)
    stop = ("interrupted" if interrupted else "the time budget" if out_of_time else
            "max_units" if config.max_units and run.units_run >= config.max_units else None)
    if mid_epoch and (stop or save_due):
      run.save(state, epoch, unit, sums)
    if mid_epoch and stop:
      return state, unit, sums, stop
  return state, unit, sums, None


def _top1(run: Run, variables, dataset: data_lib.Dataset | None) -> tuple[float | None, Any]:
  if dataset is None:
    return None, None
  logits = evaluate.predict(run.eval_model, variables, dataset.images, run.mean, run.std,
                            run.config.eval_batch_size, progress=False)
  correct = np.argmax(logits, -1) == dataset.labels
  return float(correct.mean() * 100), correct


def end_epoch(run: Run, state: State, epoch: int, sums: dict) -> State:
  """Scores the epoch, keeps the best held-out variables, logs a row, checkpoints."""
  with run.clock.paused():
    variables = multihost.to_host(state.variables)
    holdout, _ = _top1(run, variables, run.splits.holdout)
    test, _ = _top1(run, variables, run.splits.test)
  seconds = run.clock.train() - sums["train_seconds_at_start"]
  row = {"train/loss": sums["loss_sum"] / max(sums["steps"], 1),
         "train/lr": float(run.schedule((epoch + 1) * run.steps_per_epoch - 1)),
         "time/epoch_seconds": seconds,
         "train/images_per_second": sums["steps"] * run.config.batch_size / max(seconds, 1e-9),
         "time/minutes": run.clock.wall() / 60, "time/train_minutes": run.clock.train() / 60}
  if holdout is not None:
    row["holdout/top1"] = holdout
  if test is not None:
    row["test/top1"] = test
  run.writer.write(epoch + 1, row)
  if holdout is not None and holdout > float(state.best_top1):
    state = state.replace(best=jax.tree.map(jnp.copy, state.variables),  # The step donates.
                          best_top1=jnp.float32(holdout),
                          best_epoch=jnp.int32(epoch + 1))
  run.bar.write(f"epoch {epoch + 1}/{run.config.epochs}: " + " ".join(
      f"{k.split('/')[1] if k.startswith('train') else k.replace('/top1', '')}={v:.4g}"
      for k, v in row.items() if k in ("train/loss", "holdout/top1", "test/top1")) +
      f" ({seconds:.0f} s)")
  state = state.replace(epoch=jnp.int32(epoch + 1), unit=jnp.int32(0))
  run.save(state, epoch + 1, 0)
  return state


def train(config: ml_collections.ConfigDict, workdir: str,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) `config.arch` on `config.data`; writes checkpoints, metrics.jsonl,
  TensorBoard events, `workdir/model` (the chosen epoch's bundle) and `result.json`."""
  workdir = os.path.abspath(workdir)
  run, state, epoch, unit, partial = prepare(config, workdir, log or tqdm.write)
  stop = "the time budget" if _budget_spent(run) and epoch < config.epochs else None
  if stop:
    run.bar.write(f"The time budget of {config.time_budget_minutes:g} minutes is spent "
                  f"({run.clock.wall_before / 60:.1f} minutes so far).")
  try:
    with interrupts.stop_on_signals("checkpointing after this unit",
                                    enabled=multihost.is_primary()) as run.stop:
      while epoch < config.epochs and not stop:
        state, unit, sums, stop = run_epoch(run, state, epoch, unit, partial)
        partial = None
        if stop is None:
          state = end_epoch(run, state, epoch, sums)
          epoch, unit = epoch + 1, 0
          if epoch < config.epochs and run.stop.requested:
            stop = "interrupted"
          elif _budget_spent(run) and epoch < config.epochs:
            stop = "the time budget"
          elif config.max_units and run.units_run >= config.max_units and epoch < config.epochs:
            stop = "max_units"
  except KeyboardInterrupt:
    run.bar.close()
    run.checkpoints.close()
    raise KeyboardInterrupt(f"interrupted; the last checkpoint is at epoch {run.saved_at[0]}, "
                            f"unit {run.saved_at[1]}: rerun the same command to resume.") from None
  return finish(run, state, epoch, unit, stop)


def finish(run: Run, state: State, epoch: int, unit: int, stop: str | None) -> dict[str, Any]:
  """The final scores, per-class accuracy, the bundle of the chosen epoch and result.json."""
  config = run.config
  run.bar.close()
  run.checkpoints.close()
  run.writer.close()
  state = multihost.to_host(state)
  by_holdout = run.splits.holdout is not None and int(state.best_epoch) > 0
  chosen = state.best if by_holdout else state.variables
  result: dict[str, Any] = {
      "epochs_done": epoch, "unit": unit, "epochs": config.epochs,
      "stopped_early": epoch < config.epochs,
      "stop_reason": stop or "completed", "minutes": run.clock.wall() / 60,
      "train_minutes": run.clock.train() / 60,
      "selected": {"by": "held-out top-1" if by_holdout else "last epoch",
                   "epoch": int(state.best_epoch) if by_holdout else epoch}}
  with run.clock.paused():
    if epoch:
      holdout, _ = _top1(run, chosen, run.splits.holdout)
      test, correct = _top1(run, chosen, run.splits.test)
      scored = run.splits.test or run.splits.holdout
      if correct is None and scored is not None:
        _, correct = _top1(run, chosen, scored)
      result.update({"holdout_top1": holdout, "test_top1": test})
      if scored is not None:
        result["per_class"] = {"split": "test" if run.splits.test else "held-out",
                               "top1": {name: float(correct[scored.labels == k].mean() * 100)
                                        for k, name in enumerate(scored.class_names)
                                        if np.any(scored.labels == k)}}
  model_dir = os.path.join(run.workdir, MODEL_DIR)
  if epoch and multihost.is_primary():
    bundle_lib.save_bundle(model_dir, _spec(run, result), chosen)
    result["model"] = model_dir
  if multihost.is_primary():
    atomic_files.write_text(os.path.join(run.workdir, "result.json"), json.dumps(result, indent=2))
  return result


def _spec(run: Run, result: dict[str, Any]) -> bundle_lib.ModelSpec:
  config, train_set = run.config, run.splits.train
  extra = {"trained_by": "caedfkd train", "recipe": config.recipe,
           "trained_on": f"{config.data} ({config.train_split})",
           "train_images": len(train_set),
           "holdout_images": len(run.splits.holdout) if run.splits.holdout else 0,
           "data_sha256": run.identity["data_sha256"],
           **{k: result[k] for k in ("epochs_done", "epochs", "stopped_early", "stop_reason",
                                     "selected", "holdout_top1", "test_top1", "train_minutes")},
           "config": json.loads(json.dumps(config.to_dict()))}
  if run.config_history:
    extra["config_changes"] = run.config_history
  return bundle_lib.ModelSpec(config.arch, train_set.num_classes, train_set.image_shape[0],
                              mean=run.mean, std=run.std, class_names=list(train_set.class_names),
                              extra=extra)
