"""A DFKD run of any method (`config.method`): prepare, the epochs, their ends, finish.

Importable from a notebook: `train_and_evaluate(config, workdir)` is the whole run;
`create_setup` / `create_state` / `steps.make_step_fns` are the pieces. The engine knows no
method: it builds what they share (teacher, student, dtype, mesh), and the method adds its
own (methods/base.py). An epoch is a list of *units* (the method's `epoch_plan`); the state
records the next unit, so a run stopped anywhere resumes at the last checkpointed unit and,
all randomness being folded from (seed, epoch, unit), continues exactly as the
uninterrupted run would.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caedfkd_jax import models
from caedfkd_jax.config import checks, defaults
from caedfkd_jax.engine import checkpoint, runs as runs_lib, steps
from caedfkd_jax.engine.clock import Clock
from caedfkd_jax.engine.epoch_log import EpochLog
from caedfkd_jax.engine.metrics_writer import MetricsWriter, save_image_grid
from caedfkd_jax.io import atomic_files, bundle as bundle_lib, embeddings
from caedfkd_jax.methods import registry
from caedfkd_jax.methods.base import Method, Phase, Setup, TrainState
from caedfkd_jax.runtime import cpu_devices, interrupts, mesh as mesh_lib, multihost, platform

STUDENT_DIR = "student"
GRID_ROWS = 100   # The epoch grid's rows: the classes its batch holds, at most this many.
CHECKPOINT_DIR = checkpoint.CHECKPOINT_DIR


class NonFiniteLossError(RuntimeError):
  pass


# --------------------------------------------------------------------------- #
# The static setup and the first state
# --------------------------------------------------------------------------- #


def shared_setup(config, teacher: bundle_lib.Bundle,
                 table: embeddings.EmbeddingTable | None = None) -> Setup:
  """What every method shares: teacher, student, dtype, and the embedding table for a method
  that reads one (`table`, or the one `config.embeddings` names, checked against the
  teacher's classes)."""
  method = registry.get(config.method)
  spec = teacher.spec
  if config.student_arch not in models.ARCHS:
    raise ValueError(f"Unknown student_arch {config.student_arch!r}. Known archs: "
                     f"{', '.join(sorted(models.ARCHS))}.")
  if method.embeddings:
    table = embeddings.load_table(config.embeddings) if table is None else table
    embeddings.check_table_fits(table, spec, config.embeddings)
  dtype = platform.compute_dtype(config.compute_dtype)
  return Setup(config=config, method=method, dtype=dtype, num_classes=spec.num_classes,
               teacher=models.create_model(spec.arch, spec.num_classes, dtype),
               student=models.create_model(config.student_arch, spec.num_classes, dtype),
               mean=tuple(spec.mean), std=tuple(spec.std), image_size=spec.image_size,
               teacher_arch=spec.arch,
               class_names=tuple(spec.class_names) if spec.class_names else None,
               table=table if method.embeddings else None)


def create_setup(config, teacher: bundle_lib.Bundle,
                 table: embeddings.EmbeddingTable | None = None) -> Setup:
  """The shared setup, extended by `config.method` (its `create_setup`)."""
  setup = registry.get(config.method).create_setup(shared_setup(config, teacher, table))
  assert setup.student_tx is not None and setup.student_lr is not None, (
      f"method {config.method}'s create_setup must set student_tx and student_lr")
  return setup


def create_state(setup: Setup, teacher_vars, seed: int | None = None) -> TrainState:
  """A run's first state; `seed` defaults to config.seed."""
  config = setup.config
  rng = jax.random.key(config.seed if seed is None else seed)
  rng_method, rng_s = jax.random.split(jax.random.fold_in(rng, 2**31 - 1))
  student = bundle_lib.init_variables(
      bundle_lib.ModelSpec(config.student_arch, setup.num_classes, setup.image_size), rng_s)
  return TrainState(
      epoch=jnp.int32(0), unit=jnp.int32(0), kd_step=jnp.int32(0), student=student,
      student_opt_state=setup.student_tx.init(student["params"]),
      method=setup.method.init_state(setup, teacher_vars, rng_method), rng=rng)


def create_run_states(setup: Setup, teacher_vars, runs: list[runs_lib.Run] | None) -> TrainState:
  """The first state of one run (`runs` None), or of every run stacked on a leading axis."""
  if runs is None:
    return create_state(setup, teacher_vars)
  return runs_lib.stack([create_state(setup, teacher_vars, run.seed).replace(
      hparams=runs_lib.hparams(run)) for run in runs])


def finite_parts(setup: Setup, state: TrainState) -> dict[str, jax.Array]:
  """Whether each learnt part of the state is finite: checked after every unit, on the device."""
  all_finite = lambda tree: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.bool_(True)]))
  parts = {"student params": state.student["params"],
           "student batch_stats": state.student["batch_stats"],
           "student optimiser state": state.student_opt_state,
           **setup.method.finite_parts(state.method)}
  return {name: all_finite(tree) for name, tree in parts.items()}


# --------------------------------------------------------------------------- #
# A run's context: what `prepare` builds once and every later piece reads
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  workdir: str
  method: Method
  setup: Setup
  teacher: bundle_lib.Bundle
  teacher_vars: Any               # On the devices, replicated.
  unit_vars: Any                  # What every unit reads: teacher_vars or the method's frozen_vars.
  runs: list[runs_lib.Run] | None
  run_dirs: list[str]
  phases: dict[str, Phase]
  fns: dict[str, Callable]        # The compiled units (steps.make_step_fns).
  finite_fn: Callable
  renew_fn: Callable | None
  grid_fn: Callable
  eval_data: Any
  writers: list[MetricsWriter]
  checkpoints: checkpoint.Checkpoints
  clock: Clock
  bar: Any                        # tqdm
  identity: dict[str, str]        # The teacher's fingerprint and the state's shapes.
  config_history: list[dict]      # Allowed config changes, per resume.
  last_epoch: int                 # Where this invocation stops: epochs or stop_after_epochs.
  units_run: int = 0
  stop: interrupts.StopRequest = dataclasses.field(default_factory=interrupts.StopRequest)
  stop_reason: str | None = None  # Why this invocation stopped short of the schedule's end.
  saved_at: tuple[int, int] = (0, 0)   # The latest checkpoint's (epoch, unit).
  budget_warned: bool = False

  def progress(self, log: EpochLog | None = None) -> dict[str, Any]:
    """The checkpoint's JSON beside the state; `log`: the unfinished epoch's numbers."""
    return {**self.clock.state(), **self.identity, "config_changes": self.config_history,
            "partial_epoch": None if log is None else log.to_json()}

  def save(self, state: TrainState, epoch: int, unit: int, log: EpochLog | None = None) -> None:
    self.checkpoints.save(state, epoch, unit, self.config, self.progress(log))
    self.clock.saved()
    self.saved_at = (epoch, unit)

  def per_class(self):
    return [p for phase in self.phases.values() for p in phase.per_class]


def _position(x: jax.Array) -> int:
  """An int of the state (epoch, unit, ...): every run holds the same one."""
  return int(np.asarray(multihost.to_host(x)).reshape(-1)[0])


def _load_teacher(config) -> bundle_lib.Bundle:
  if not config.teacher:
    raise ValueError("config.teacher is empty: pass --config.teacher=PATH_TO_TEACHER_BUNDLE "
                     "(make one with `caedfkd convert`).")
  teacher = bundle_lib.load_bundle(config.teacher)
  if config.teacher_arch_expected and teacher.spec.arch != config.teacher_arch_expected:
    raise ValueError(f"The teacher bundle {config.teacher} is a {teacher.spec.arch}, but this config "
                     f"is for a {config.teacher_arch_expected} teacher.")
  return teacher


def _load_eval_data(config, spec: bundle_lib.ModelSpec):
  """The eval split, refused before any work (not at the first evaluation) if the teacher's
  student could not be scored on it."""
  if not config.eval_data:
    return None
  from caedfkd_jax.eval import evaluate
  from caedfkd_jax.io import data
  from caedfkd_jax.io import class_names
  dataset = data.load_dataset(config.eval_data, config.eval_split)
  evaluate.check_fits(spec, dataset, f"config.eval_data={config.eval_data!r}: the teacher")
  class_names.check_class_names(spec.class_names, dataset.class_names,
                                f"config.eval_data={config.eval_data!r}",
                                "--config.eval_allow_class_mismatch=True",
                                config.get("eval_allow_class_mismatch", False), tqdm.write)
  return dataset


STATE_MEMORY_SHARE = 0.5   # Of one device's memory; the rest is for the networks' activations.


def check_state_fits(abstract_state: TrainState, device) -> None:
  """Refuses a run whose state (replicated: every device holds all of it) takes more than
  STATE_MEMORY_SHARE of one device's memory, naming the memory bank's part: at ImageNet's
  224 px the bank of every image the schedule makes would not fit (150 kB an image)."""
  limit = platform.device_memory_bytes(device)
  nbytes = lambda tree: sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))
  total = nbytes(abstract_state)
  if limit is None or total <= STATE_MEMORY_SHARE * limit:
    return
  bank = getattr(abstract_state.method, "bank", None)
  gb = lambda n: f"{n / 1e9:.1f} GB"
  part = ""
  if bank is not None:
    images = bank.images   # (runs x) capacity x H x W x C uint8
    part = (f", of which the memory bank holds {gb(nbytes(bank))} ({images.shape[-4]} images "
            f"of {'x'.join(map(str, images.shape[-3:]))}"
            + (f", for each of {images.shape[0]} runs" if images.ndim == 5 else "") + ")")
  raise ValueError(f"The run's state needs {gb(total)} on every device{part}, more than "
                   f"{STATE_MEMORY_SHARE:.0%} of this {device.platform} device's "
                   f"{gb(limit)}; lower --config.bank_capacity (oldest images are overwritten "
                   "once it is full) or num_runs.")


def _validated(config, method: Method, num_devices: int, num_classes: int):
  """Every value checked (every run's of a multi-run job too) before any work; the runs."""
  sweep = checks.check_sweep(config, method)
  runs = runs_lib.plan_runs(config, sweep) if runs_lib.is_multi(config) else None
  for run_cfg in ([config] if runs is None else [runs_lib.run_config(config, r) for r in runs]):
    checks.validate_config(run_cfg, num_devices, num_classes, swept=tuple(sweep))
  checkpoint.check_units_per_epoch(method.units_per_epoch(config))
  return runs


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[Run, TrainState, int, int,
                                                                       EpochLog]:
  """Everything a run needs, checked before any work; (run, state, epoch, unit, log) to go on
  from (the latest checkpoint's, or a fresh start's)."""
  cpu_devices.reserve_intra_op_threads()  # Simulated CPU devices need spare threads.
  multihost.initialize(config)  # Before any other JAX call.
  platform.enable_compilation_cache(config.compilation_cache_dir)
  method = registry.get(config.method)  # An unknown name is refused before any work.
  defaults.add_method_sections(config)  # --config.method=X on a config made for another.
  teacher = _load_teacher(config)
  mesh = mesh_lib.make_mesh(mesh_lib.select_devices(config.get("num_devices", 0)))
  runs = _validated(config, method, mesh.size, teacher.spec.num_classes)
  setup = create_setup(config, teacher)
  eval_data = _load_eval_data(config, teacher.spec)  # A bad eval_data is refused before any work.
  os.makedirs(workdir, exist_ok=True)

  replicated = NamedSharding(mesh, P())
  teacher_vars = multihost.put({k: teacher.variables[k] for k in ("params", "batch_stats")},
                               replicated)
  initial_state = lambda: create_run_states(setup, teacher_vars, runs)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                          jax.eval_shape(initial_state))
  check_state_fits(abstract, jax.local_devices()[0])   # This process's: they hold the state.
  identity = {"teacher_sha256": checkpoint.tree_sha256(teacher.variables),
              "state_shapes": checkpoint.shapes_signature(abstract)}
  changes: dict[str, tuple[Any, Any]] = {}
  checkpoints = checkpoint.Checkpoints(workdir, config.max_checkpoints)
  state, saved = checkpoints.restore(abstract, lambda saved_config, saved_progress: changes.update(
      checkpoint.check_resume(workdir, saved_config, saved_progress, config, identity, method)))
  resumed = state is not None
  state = state if resumed else multihost.put(initial_state(), replicated)
  epoch, unit = _position(state.epoch), _position(state.unit)

  # Every per-run piece maps over the run axis; `over_runs` None: one run, no axis.
  vectorize = runs is not None and runs_lib.resolve_vectorize(config, mesh.devices.flat[0].platform)
  over_runs = None if runs is None else functools.partial(
      runs_lib.over_runs, num_runs=len(runs), vectorize=vectorize)
  per_run = over_runs or (lambda fn, in_axes: fn)
  run_dirs = [workdir] if runs is None else [os.path.join(workdir, "runs", r.name) for r in runs]
  last_epoch = min(config.epochs, config.stop_after_epochs or config.epochs)
  run = Run(
      config=config, workdir=workdir, method=method, setup=setup, teacher=teacher,
      teacher_vars=teacher_vars,
      # What the units read besides the state: the teacher, and any other frozen network a
      # method needs (DiffDFKD's Stable Diffusion), put on the devices once for the whole run.
      unit_vars=(multihost.put(method.frozen_vars(setup, teacher_vars), replicated)
                 if method.frozen_vars else teacher_vars),
      runs=runs, run_dirs=run_dirs, phases=method.phases(setup, mesh),
      fns=steps.make_step_fns(setup, mesh, over_runs=over_runs, vmapped_runs=vectorize),
      finite_fn=jax.jit(per_run(functools.partial(finite_parts, setup), (0,))),
      renew_fn=method.renew and jax.jit(per_run(functools.partial(method.renew, setup), (0,)),
                                        donate_argnums=(0,)),
      grid_fn=jax.jit(per_run(functools.partial(_latest_with_teacher_guesses, setup), (0, None))),
      eval_data=eval_data,
      # Rows logged after the checkpoint being resumed are logged again: drop them first.
      writers=[MetricsWriter(d, enabled=multihost.is_primary(),
                             keep_through_epoch=epoch if resumed else 0) for d in run_dirs],
      checkpoints=checkpoints,
      clock=Clock(saved.get("train_seconds", 0.0), saved.get("wall_seconds")),
      bar=_progress_bar(method, config, runs, epoch, unit, last_epoch),
      identity=identity, config_history=list(saved.get("config_changes", [])),
      last_epoch=last_epoch, saved_at=(epoch, unit))
  _banner(run, mesh, epoch, unit)
  _announce(run, resumed, epoch, unit, changes)
  log = EpochLog(epoch, run.per_class(), saved.get("partial_epoch") if unit else None)
  return run, state, epoch, unit, log


def _progress_bar(method: Method, config, runs, epoch: int, unit: int, last_epoch: int):
  units_per_epoch = method.units_per_epoch(config)
  bar = tqdm(total=sum(units_per_epoch[:last_epoch]), initial=sum(units_per_epoch[:epoch]) + unit,
             unit="unit", dynamic_ncols=True,
             desc=method.name if runs is None else f"{method.name} x{len(runs)} runs",
             disable=not multihost.is_primary())
  if not multihost.is_primary():
    bar.write = lambda *args, **kwargs: None  # tqdm.write ignores `disable`: one process speaks.
  return bar


def _banner(run: Run, mesh, epoch: int, unit: int) -> None:
  """What the run is: method, teacher, student, devices, schedule, budget, workdir."""
  config, say = run.config, run.bar.write
  spec = run.teacher.spec
  units = run.method.units_per_epoch(config)
  budget = (f"{config.time_budget_minutes:g} min over all invocations"
            if config.time_budget_minutes else "none")
  say(f"distill: method {run.method.name}; teacher {config.teacher} ({spec.arch}, "
      f"{spec.num_classes} classes, weights sha256 {run.identity['teacher_sha256'][:12]}...); "
      f"student {config.student_arch}; {mesh.size} {mesh.devices.flat[0].platform} device(s).")
  say(f"schedule: {config.epochs} epochs of {units[0]}-{max(units)} units; time budget {budget}; "
      f"workdir {run.workdir}" + (f"; from epoch {epoch}, unit {unit}" if epoch or unit else "")
      + ".")
  say("The first units compile the run's steps (tens of seconds on a CPU; cached for reruns).")


def _warn_if_budget_ends_first_epoch(run: Run, epoch: int, unit: int) -> None:
  """After this invocation's first unit: warns, once, when the budget will run out before the
  first epoch ends (its student would be untrained)."""
  config = run.config
  if run.budget_warned or epoch > 0 or not config.time_budget_minutes:
    return
  run.budget_warned = True
  per_unit = (run.clock.wall() - run.clock.wall_before) / max(run.units_run, 1)
  left = config.time_budget_minutes * 60 - run.clock.wall()
  needed = per_unit * (run.method.units_per_epoch(config)[0] - unit)
  if needed > left:
    run.bar.write(f"Warning: at about {per_unit:.1f} s a unit, the first epoch needs about "
                  f"{needed / 60:.1f} more minutes but the time budget leaves {left / 60:.1f}: the "
                  "run would stop with an untrained student. Raise "
                  "--config.time_budget_minutes.")


def _announce(run: Run, resumed: bool, epoch: int, unit: int, changes: dict) -> None:
  """Says where the run resumes, what config change it continues with, and a spent budget."""
  if resumed:
    run.bar.write(f"Resumed from {run.checkpoints.directory} at epoch {epoch}, unit {unit}.")
  if changes:
    run.config_history.append({"epoch": epoch, "unit": unit,
                               "changes": {k: list(v) for k, v in changes.items()}})
    run.bar.write("Continuing with a changed config: " + ", ".join(
        f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
  if _budget_spent(run, epoch):
    run.bar.write(f"The time budget of {run.config.time_budget_minutes:g} minutes is spent "
                  f"({run.clock.wall_before / 60:.1f} minutes so far); raise "
                  "--config.time_budget_minutes to continue this run.")


def _budget_spent(run: Run, epoch: int) -> bool:
  budget = run.config.time_budget_minutes * 60
  return bool(budget) and run.clock.wall_before >= budget and epoch < run.config.epochs


# --------------------------------------------------------------------------- #
# An epoch's units, and the end of an epoch
# --------------------------------------------------------------------------- #


def _in_run(runs: list[runs_lib.Run] | None, index: int) -> str:
  if runs is None:
    return ""
  run = runs[index]
  return f" in {run.name} (seed {run.seed}{'; ' + run.label if run.label else ''})"


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, unit: int, what: str,
                  runs: list[runs_lib.Run] | None = None) -> None:
  """Stops the run at a non-finite loss, naming the run, unit, step and term."""
  for name, values in metrics.items():
    values = np.asarray(values).reshape(len(runs) if runs else 1, -1)  # runs x steps
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
      r, step = bad[0]
      raise NonFiniteLossError(
          f"{name} became {values[r, step]}{_in_run(runs, r)} at epoch {epoch}, {what} (unit "
          f"{unit}), step {step} of that call. The run stopped; the last good checkpoint is kept. "
          "Lower the learning rate or loss weight of that term, or try compute_dtype=float32.")


def _check_finite_parts(finite: dict[str, np.ndarray], epoch: int, unit: int, what: str,
                        runs: list[runs_lib.Run] | None = None) -> None:
  """Stops the run at a learnt part of the state that turned non-finite while its losses did not."""
  ok = np.stack([np.asarray(v).reshape(-1) for v in finite.values()])  # parts x runs
  if not ok.all():
    bad_run = int(np.argwhere(~ok)[0, 1])
    bad = [name for name, v in zip(finite, ok) if not v[bad_run]]
    raise NonFiniteLossError(
        f"The {' and '.join(bad)} became non-finite{_in_run(runs, bad_run)} at epoch {epoch}, "
        f"{what} (unit {unit}), while its losses stayed finite. The run stopped; the last good "
        "checkpoint is kept. Lower the learning rates, or try compute_dtype=float32.")


def _process_metrics(run: Run, log: EpochLog, pending) -> None:
  """A dispatched unit's metrics, read (waiting for that unit only), checked and logged.

  The loop calls this for unit k after it has queued unit k + 1 (nanodo's
  `_process_metrics`): the device always has work while the host reads.
  """
  if pending is None:
    return
  metrics, finite, epoch, unit, what, phase = pending
  metrics, finite = multihost.to_host((metrics, finite))
  _check_finite(metrics, epoch, unit, what, run.runs)
  _check_finite_parts(finite, epoch, unit, what, run.runs)
  log.add_metrics(metrics)
  run.bar.update(1)
  run.bar.set_postfix({k.split("/")[1]: f"{np.mean(metrics[k]):.3g}" for k in phase.shows[:2]
                       if k in metrics}, refresh=False)


def run_epoch(run: Run, state: TrainState, epoch: int, unit: int, log: EpochLog
              ) -> tuple[TrainState, int, bool]:
  """Units `unit`.. of `epoch`; (state, the next unit, whether the run stopped early)."""
  config = run.config
  plan = run.method.epoch_plan(config, epoch)
  if unit == 0 and run.method.renews(config, epoch):
    state = run.renew_fn(state)
  pending = None   # The last dispatched unit, whose metrics are not read yet.
  while unit < len(plan):
    phase = run.phases[plan[unit]]
    state, metrics, outputs = run.fns[plan[unit]](state, run.unit_vars)
    log.add_outputs(phase, outputs)
    # "generator round 3": the unit's kind and its index among the epoch's units of that kind.
    what = f"{phase.label} {sum(run.phases[n].label == phase.label for n in plan[:unit])}"
    finite = run.finite_fn(state)
    _process_metrics(run, log, pending)
    pending = (metrics, finite, epoch, unit, what, phase)
    unit += 1
    run.units_run += 1
    # Each host has its own clock: process 0's decisions hold for all, or one process would
    # stop or checkpoint alone and the others wait for it in their next collective.
    if run.units_run == 1:
      _warn_if_budget_ends_first_epoch(run, epoch, unit)
    out_of_time, save_due, interrupted = multihost.agree(
        run.clock.out_of(config.time_budget_minutes * 60),
        run.clock.save_due(config.checkpoint_every_minutes * 60), run.stop.requested)
    if interrupted or out_of_time or (config.max_units and run.units_run >= config.max_units):
      _process_metrics(run, log, pending)
      run.stop_reason = ("interrupted" if interrupted else
                         "the time budget" if out_of_time else "max_units")
      # After an epoch's last unit, the epoch ends first (its row, evaluation, checkpoint).
      return state, unit, unit < len(plan)
    if save_due:
      _process_metrics(run, log, pending)  # Never checkpoint a state whose losses were not checked.
      pending = None
      run.save(state, epoch, unit, log)
  _process_metrics(run, log, pending)
  return state, unit, False


def _evaluate(run: Run, state: TrainState, epoch: int, kd_step: int) -> list[float] | None:
  """Each run's student's top-1 on `eval_data`, when due: the student has trained, and the
  epoch is an `eval_every_epochs` one or this invocation's last."""
  config = run.config
  if run.eval_data is None or not kd_step or not (
      (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == run.last_epoch):
    return None
  with run.clock.paused():   # Evaluation is measurement, not training.
    students = multihost.to_host(state.student)
    return [_top1(run.setup.student, students if run.runs is None
                  else runs_lib.unstack(students, r), run.eval_data, run.setup, config)
            for r in range(len(run.run_dirs))]


def end_epoch(run: Run, state: TrainState, epoch: int, log: EpochLog
              ) -> tuple[TrainState, list[dict[str, Any]]]:
  """The epoch's rows (one per run), evaluation, sample grids, a checkpoint; the next epoch's
  state."""
  kd_step = _position(state.kd_step)
  shared = {"student/lr": float(run.setup.student_lr(max(kd_step - 1, 0))),  # its last step's
            **{k: _position(v) for k, v in run.method.epoch_scalars(state.method).items()},
            "time/minutes": run.clock.wall() / 60, "time/train_minutes": run.clock.train() / 60}
  summaries = [{**log.summary(None if run.runs is None else r), **shared}
               for r in range(len(run.run_dirs))]
  top1 = _evaluate(run, state, epoch, kd_step)
  for r, summary in enumerate(summaries):
    if top1 is not None:
      summary["eval/top1"] = top1[r]
    run.writers[r].write(epoch + 1, summary)
  plan = run.method.epoch_plan(run.config, epoch)
  if any(run.phases[name].makes_images for name in plan):
    _save_grids(run, state, epoch)   # The epoch's last batch, read back from the state.
  run.bar.write(_format_summary(run, epoch + 1, summaries))
  state = state.replace(epoch=state.epoch + 1, unit=jnp.zeros_like(state.unit))  # same sharding
  run.save(state, epoch + 1, 0)
  return state, summaries


def _save_grids(run: Run, state: TrainState, epoch: int) -> None:
  grids = multihost.to_host(run.grid_fn(state.method, run.teacher_vars))
  setup = run.setup
  names = setup.class_names or (setup.table.classes if setup.table else None)  # else indices
  for r, run_dir in enumerate(run.run_dirs):
    images, labels, predicted, confidence = (grids if run.runs is None
                                             else runs_lib.unstack(grids, r))
    save_image_grid(os.path.join(run_dir, "samples", f"epoch_{epoch + 1:04d}.png"),
                    images, labels, setup.num_classes, run.config.grid_images_per_class,
                    enabled=multihost.is_primary(), class_names=names,
                    predicted_B=predicted, confidence_B=confidence,
                    rows=np.unique(np.asarray(labels))[:GRID_ROWS])


def _shown(run: Run) -> list[str]:
  """The metrics the phases show, in order, then the engine's."""
  shown = [k for phase in run.phases.values() for k in phase.shows]
  return list(dict.fromkeys(shown + ["eval/top1", "time/minutes"]))


def _format_summary(run: Run, epoch: int, summaries: list[dict[str, Any]]) -> str:
  if run.runs is not None:
    keys = ["eval/top1"] + list(dict.fromkeys(p.shows[0] for p in run.phases.values() if p.shows))
    return runs_lib.format_epoch(epoch, run.config.epochs, run.runs, summaries, keys)
  s = summaries[0]
  parts = [f"{k.split('/')[1]}={s[k]:.4g}" for k in _shown(run) if k in s]
  return f"epoch {epoch}/{run.config.epochs}: " + " ".join(parts)


# --------------------------------------------------------------------------- #
# The end of a run
# --------------------------------------------------------------------------- #


def finish(run: Run, state: TrainState, epoch: int, unit: int, log: EpochLog,
           summaries: list[dict[str, Any]]) -> dict[str, Any]:
  """The last checkpoint, the student bundle(s), the multi-run summary and result.json."""
  run.bar.close()
  run.save(state, epoch, unit, log if unit else None)
  run.checkpoints.close()
  students = multihost.to_host(state.student)  # On every process: may be a collective.
  for writer in run.writers:
    writer.close()
  # Short of the schedule's end: the time budget, max_units, stop_after_epochs or a signal.
  done = {"epoch": epoch, "unit": unit, "stopped_early": epoch < run.config.epochs,
          "stop_reason": ("completed" if epoch >= run.config.epochs
                          else run.stop_reason or "stop_after_epochs"),
          "student_steps": _position(state.kd_step),
          "minutes": run.clock.wall() / 60, "train_minutes": run.clock.train() / 60,
          "last_eval_top1": _last_eval_top1(run.workdir if run.runs is None else
                                            os.path.join(run.workdir, "runs", run.runs[0].name))}
  student_dir = os.path.join(run.workdir, STUDENT_DIR)
  if run.runs is None:
    if multihost.is_primary():
      bundle_lib.save_bundle(student_dir, _student_spec(run, run.config, done), students)
    result = {**(summaries[0] if summaries else {}), **done, "student": student_dir}
  else:
    result = {**done, "student": student_dir, **_finish_runs(run, students, done)}
  if multihost.is_primary():
    atomic_files.write_text(os.path.join(run.workdir, "result.json"), json.dumps(result, indent=2))
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `config.method`; writes checkpoints, logs and `workdir/student`.

  With `config.num_runs` > 1 or a `config.sweep`, every run of `runs.plan_runs` is trained in
  the same program; each writes `runs/run_XX/` (metrics, samples) and `student/run_XX`, and
  `summary.json` holds the statistics over seeds per sweep point.
  """
  run, state, epoch, unit, log = prepare(config, workdir)
  summaries: list[dict[str, Any]] = []
  stopped = _budget_spent(run, epoch)
  if stopped:
    run.stop_reason = "the time budget"
  with interrupts.stop_on_signals("checkpointing after this unit",
                                  enabled=multihost.is_primary()) as run.stop:
    while epoch < run.last_epoch and not stopped:
      if unit == 0:
        log = EpochLog(epoch, run.per_class())
      state, unit, stopped = run_epoch(run, state, epoch, unit, log)
      if not stopped:
        state, summaries = end_epoch(run, state, epoch, log)
        epoch, unit = epoch + 1, 0
        if run.stop.requested and not run.stop_reason:   # A signal during the epoch's end.
          run.stop_reason = "interrupted"
        stopped = epoch < run.last_epoch and run.stop_reason is not None
  return finish(run, state, epoch, unit, log, summaries)


def _last_eval_top1(run_dir: str) -> float | None:
  """The last evaluated top-1 of the run (over every invocation), from its metrics.jsonl."""
  return next((row["eval/top1"] for row in reversed(runs_lib.read_rows(run_dir))
               if "eval/top1" in row), None)


def _student_spec(run: Run, config, done: dict[str, Any]) -> bundle_lib.ModelSpec:
  """The student bundle's model.json; `training` records how far the run got (a student of 0
  epochs is untrained, and `evaluate`, `export` and `probe` say so)."""
  t = run.teacher.spec
  progress = run.progress()
  extra = {"distilled_from": config.teacher,
           # sha256 of the teacher's weights (checkpoint.tree_sha256), as `convert` prints it.
           "teacher_sha256": progress["teacher_sha256"],
           "training": {"epochs_done": done["epoch"], "epochs": config.epochs,
                        "units_done_in_next_epoch": done["unit"],
                        "student_steps": done["student_steps"],
                        "stop_reason": done["stop_reason"],
                        "last_eval_top1": done["last_eval_top1"],
                        "minutes": round(done["minutes"], 3),
                        "train_minutes": round(done["train_minutes"], 3)},
           "method": run.method.name, **run.method.bundle_fields(config),
           "config": json.loads(json.dumps(config.to_dict()))}
  if progress.get("config_changes"):
    extra["config_changes"] = progress["config_changes"]
  return bundle_lib.ModelSpec(
      arch=config.student_arch, num_classes=t.num_classes, image_size=t.image_size,
      mean=t.mean, std=t.std, class_names=t.class_names, extra=extra)


def _top1(model, variables, dataset, setup: Setup, config) -> float:
  from caedfkd_jax.eval import evaluate
  # On the host: every process evaluates alone, with no collective.
  logits = evaluate.predict(model, variables, dataset.images, setup.mean, setup.std,
                            config.eval_batch_size, progress=False)
  return float(np.mean(np.argmax(logits, -1) == dataset.labels) * 100)


def _finish_runs(run: Run, students, done: dict[str, Any]) -> dict[str, Any]:
  """Each run's student bundle, and the summary over seeds per sweep point (summary.json)."""
  config, runs = run.config, run.runs
  levels = []
  if run.eval_data is not None and config.accuracy_levels:
    teacher_top1 = _top1(run.setup.teacher, run.teacher.variables, run.eval_data, run.setup, config)
    levels = [round(f * teacher_top1, 2) for f in config.accuracy_levels]
  rows = [runs_lib.read_rows(os.path.join(run.workdir, "runs", r.name)) for r in runs]
  points = runs_lib.summarize(runs, rows, levels)
  summary = {"runs": len(runs), "num_runs": config.num_runs, "sweep": config.sweep,
             "accuracy_levels": {"fractions_of_teacher": list(config.accuracy_levels),
                                 "top1": levels},
             "points": points}
  if multihost.is_primary():
    for r, lone in enumerate(runs):
      lone_done = {**done, "last_eval_top1": _last_eval_top1(
          os.path.join(run.workdir, "runs", lone.name))}
      spec = _student_spec(run, runs_lib.run_config(config, lone), lone_done)
      spec.extra["run"] = {"name": lone.name, "index": lone.index, "seed": lone.seed,
                           "sweep_point": dict(lone.values), "of_runs": len(runs)}
      bundle_lib.save_bundle(os.path.join(run.workdir, STUDENT_DIR, lone.name), spec,
                             runs_lib.unstack(students, r))
    atomic_files.write_text(os.path.join(run.workdir, "summary.json"), json.dumps(summary, indent=2))
    if any(p["final_top1"]["n"] for p in points):
      run.bar.write(runs_lib.format_summary(points))
    else:
      run.bar.write("No accuracy to summarise over the runs: set --config.eval_data to a labelled "
                    "test split (each run's student is in student/run_XX).")
  return {"summary": summary}


def _latest_with_teacher_guesses(setup: Setup, method_state, teacher_vars):
  """The method's latest images in [0, 1], their intended labels, and the teacher's guesses."""
  images, labels = setup.method.latest_images(setup, method_state)
  logits, _ = setup.teacher.apply(teacher_vars, bundle_lib.normalize(images, setup.mean, setup.std),
                                  train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32))
  return images, labels, jnp.argmax(probs, -1), jnp.max(probs, -1)
