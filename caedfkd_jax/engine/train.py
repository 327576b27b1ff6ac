"""A DFKD run of any method (`config.method`): setup, the epoch loop, checkpoints, logs, bundle.

Importable from a notebook: `train_and_evaluate(config, workdir)` is the whole
run; `create_setup` / `create_state` / `steps.make_step_fns` are the pieces.
An epoch is a list of *units* (the method's `epoch_plan`: e.g. generator rounds, then KD
calls). The
state records the next unit, so a run stopped anywhere resumes at the last
checkpointed unit and, all randomness being folded from (seed, epoch, unit),
continues exactly as the uninterrupted run would.
"""

import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caedfkd_jax.io import atomic_files, bundle as bundle_lib
from caedfkd_jax.runtime import cpu_devices
from caedfkd_jax.io import embeddings
from caedfkd_jax import methods
from caedfkd_jax.runtime import multihost
from caedfkd_jax.engine import checkpoint as resume, runs as runs_lib, steps
from caedfkd_jax.config.checks import validate_config
from caedfkd_jax.engine.metrics_writer import MetricsWriter, save_image_grid

STUDENT_DIR = "student"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(RuntimeError):
  pass


def compute_dtype(name: str, platform: str | None = None):
  """The activation dtype: "auto" is bfloat16 on accelerators and float32 on CPUs.

  XLA:CPU has no fast bfloat16 convolutions, so "auto" keeps CPUs in float32.
  """
  if name == "auto":
    platform = platform or jax.default_backend()
    return jnp.float32 if platform == "cpu" else jnp.bfloat16
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"compute_dtype {name!r}: use auto, float32, bfloat16 or float16") from None


def _devices(config) -> list | None:
  """The devices a run uses: all (None), or the first `config.num_devices` of one process."""
  n = config.get("num_devices", 0)
  if not n:
    return None
  if jax.process_count() > 1 or n > jax.device_count():
    raise ValueError(f"config.num_devices={n}: a single process has {jax.device_count()} "
                     "devices; use 0 (all of them), which is also the only choice multi-host.")
  return jax.devices()[:n]


def enable_compilation_cache(directory: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` ("auto": the user cache).

  JAX fixes the directory once a process first uses the cache, so a directory
  already configured (e.g. by JAX_COMPILATION_CACHE_DIR) is kept. Returns the
  directory in use, or None when off.
  """
  current = jax.config.jax_compilation_cache_dir
  if not directory or current:
    return current or None
  if directory == "auto":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = os.path.join(base, "caedfkd_jax", "xla")
  directory = os.path.abspath(os.path.expanduser(directory))
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def create_setup(config, teacher: bundle_lib.Bundle, table: embeddings.EmbeddingTable) -> steps.Setup:
  """The static side of a run of `config.method` (methods.get)."""
  return methods.get(config.method).create_setup(config, teacher, table)


def create_state(setup: steps.Setup, teacher_vars, image_size: int,
                 seed: int | None = None) -> steps.TrainState:
  """A run's first state; `seed` defaults to config.seed."""
  config = setup.config
  rng = jax.random.key(config.seed if seed is None else seed)
  rng_method, rng_s = jax.random.split(jax.random.fold_in(rng, 2**31 - 1))
  student = bundle_lib.init_variables(
      bundle_lib.ModelSpec(config.student_arch, setup.num_classes, image_size), rng_s)
  return steps.TrainState(
      epoch=jnp.int32(0), unit=jnp.int32(0), kd_step=jnp.int32(0),
      student=student,
      student_opt_state=setup.student_tx.init(student["params"]),
      method=setup.method.init_state(setup, teacher_vars, rng_method, image_size),
      rng=rng)


def create_run_states(setup: steps.Setup, teacher_vars, image_size: int,
                      runs: list[runs_lib.Run] | None) -> steps.TrainState:
  """The first state of one run (`runs` None), or of every run stacked on a leading axis."""
  if runs is None:
    return create_state(setup, teacher_vars, image_size)
  return runs_lib.stack([create_state(setup, teacher_vars, image_size, run.seed).replace(
      hparams=runs_lib.hparams(run)) for run in runs])


def finite_parts(setup: steps.Setup, state: steps.TrainState) -> dict[str, jax.Array]:
  """Whether each learnt part of the state is finite: checked after every unit, on the device."""
  all_finite = lambda tree: jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.bool_(True)]))
  parts = {"student params": state.student["params"],
           "student batch_stats": state.student["batch_stats"],
           "student optimiser state": state.student_opt_state,
           **setup.method.finite_parts(state.method)}
  return {name: all_finite(tree) for name, tree in parts.items()}


def _in_run(runs: list[runs_lib.Run] | None, index: int) -> str:
  if runs is None:
    return ""
  run = runs[index]
  return f" in {run.name} (seed {run.seed}{'; ' + run.label if run.label else ''})"


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, unit: int, what: str,
                  runs: list[runs_lib.Run] | None = None) -> None:
  for name, values in metrics.items():
    values = np.asarray(values).reshape(len(runs) if runs else 1, -1)  # runs x steps
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
      r, step = bad[0]
      raise NonFiniteLossError(
          f"{name} became {values[r, step]}{_in_run(runs, r)} at epoch {epoch}, {what} (unit "
          f"{unit}), step {step} of that call. The run stopped; the last good checkpoint is kept. "
          "Lower the learning rate or loss weight of that term, or try compute_dtype=float32.")


def partial_epoch(epoch: int, epoch_metrics: dict[str, list]) -> dict[str, Any]:
  """The per-unit numbers of an unfinished epoch, as JSON for its checkpoint."""
  metrics = {k: (list(map(lambda x: np.asarray(x).tolist(), multihost.to_host(v)))
                 if k == "low_conf" else v) for k, v in epoch_metrics.items()}
  return {"epoch": epoch, "metrics": metrics}


def _check_finite_parts(finite: dict[str, np.ndarray], epoch: int, unit: int, what: str,
                        runs: list[runs_lib.Run] | None = None) -> None:
  ok = np.stack([np.asarray(v).reshape(-1) for v in finite.values()])  # parts x runs
  if not ok.all():
    bad_run = int(np.argwhere(~ok)[0, 1])
    bad = [name for name, v in zip(finite, ok) if not v[bad_run]]
    raise NonFiniteLossError(
        f"The {' and '.join(bad)} became non-finite{_in_run(runs, bad_run)} at epoch {epoch}, "
        f"{what} (unit {unit}), while its losses stayed finite. The run stopped; the last good "
        "checkpoint is kept. Lower the learning rates, or try compute_dtype=float32.")


def _student_spec(config, teacher: bundle_lib.Bundle, progress: dict[str, Any]) -> bundle_lib.ModelSpec:
  t = teacher.spec
  method = methods.get(config.method)
  extra = {"distilled_from": config.teacher, "teacher_sha256": progress["teacher_sha256"],
           "method": method.name, **method.bundle_fields(config),
           "config": json.loads(json.dumps(config.to_dict()))}
  if progress.get("config_changes"):
    extra["config_changes"] = progress["config_changes"]
  return bundle_lib.ModelSpec(
      arch=config.student_arch, num_classes=t.num_classes, image_size=t.image_size,
      mean=t.mean, std=t.std, class_names=t.class_names, extra=extra)


def _position(x: jax.Array) -> int:
  """An int of the state (epoch, unit, ...): every run holds the same one."""
  return int(np.asarray(multihost.to_host(x)).reshape(-1)[0])


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def _save(mngr: ocp.CheckpointManager, state: steps.TrainState, config,
          progress: dict[str, Any]) -> None:
  """Orbax writes into a temporary directory and renames it when complete: a kill mid-save
  leaves the previous checkpoint as the latest."""
  step = _position(state.epoch) * 10_000 + _position(state.unit)
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
      progress=ocp.args.JsonSave(progress)))
  mngr.wait_until_finished()


def _restore_json(mngr: ocp.CheckpointManager, step: int, name: str) -> dict[str, Any]:
  try:
    return dict(mngr.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name])
  except (FileNotFoundError, KeyError, ValueError):
    return {}  # Written by an older version without it.


def _restore(mngr: ocp.CheckpointManager, abstract_state, check) -> tuple[steps.TrainState | None, dict]:
  """(state, progress) of the latest checkpoint, or (None, {}).

  `check(saved_config, saved_progress)` runs before the state is read, so a refused
  resume fails with its own message, not with Orbax's shape mismatch.
  """
  step = mngr.latest_step()
  if step is None:
    return None, {}
  progress = _restore_json(mngr, step, "progress")
  check(_restore_json(mngr, step, "config"), progress)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  return restored["state"], progress


def _load_eval_data(config, spec: bundle_lib.ModelSpec):
  """The eval split, refused before any work (not at the first evaluation) if the teacher's
  student could not be scored on it."""
  if not config.eval_data:
    return None
  from caedfkd_jax.io import data
  from caedfkd_jax.eval import evaluate
  dataset = data.load_dataset(config.eval_data, config.eval_split)
  evaluate.check_fits(spec, dataset, f"config.eval_data={config.eval_data!r}: the teacher")
  return dataset


def _top1(model, variables, dataset, setup, config) -> float:
  from caedfkd_jax.eval import evaluate
  # On the host: every process evaluates alone, with no collective.
  logits = evaluate.predict(model, variables, dataset.images, setup.mean, setup.std,
                            config.eval_batch_size, progress=False)
  return float(np.mean(np.argmax(logits, -1) == dataset.labels) * 100)


def _epoch_summary(epoch_metrics: dict[str, list], run: int | None) -> dict[str, float]:
  """The epoch's row of one run from its per-unit numbers (`run` None: no run axis)."""
  pick = (lambda x: x) if run is None else (lambda x: x[run])
  summary = {k: float(np.mean([pick(x) for x in v])) for k, v in epoch_metrics.items()
             if k != "low_conf"}
  if epoch_metrics["low_conf"]:
    low_conf = np.mean(np.stack([pick(np.asarray(x, np.float32))
                                 for x in multihost.to_host(epoch_metrics["low_conf"])]), 0)
    summary["gen/low_confidence_share"] = float(low_conf.mean())
    for k, share in enumerate(low_conf):
      summary[f"low_confidence/class_{k}"] = float(share)
  return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) `config.method`; writes checkpoints, logs and `workdir/student`.

  With `config.num_runs` > 1 or a `config.sweep`, every run of `runs.plan_runs` is trained in
  the same program; each writes `runs/run_XX/` (metrics, samples) and `student/run_XX`, and
  `summary.json` holds the statistics over seeds per sweep point.
  """
  start = time.time()
  cpu_devices.reserve_intra_op_threads()  # Simulated CPU devices need spare threads.
  multihost.initialize(config)  # Before any other JAX call.
  enable_compilation_cache(config.compilation_cache_dir)
  if not config.teacher:
    raise ValueError("config.teacher is empty: pass --config.teacher=PATH_TO_TEACHER_BUNDLE "
                     "(make one with `caedfkd convert`).")
  method = methods.get(config.method)  # An unknown name is refused before any work.
  runs = runs_lib.plan_runs(config) if runs_lib.is_multi(config) else None
  teacher = bundle_lib.load_bundle(config.teacher)
  if config.teacher_arch_expected and teacher.spec.arch != config.teacher_arch_expected:
    raise ValueError(f"The teacher bundle {config.teacher} is a {teacher.spec.arch}, but this config "
                     f"is for a {config.teacher_arch_expected} teacher.")
  table = embeddings.load_table(config.embeddings)
  mesh = steps.make_mesh(_devices(config))
  group_size = teacher.spec.num_classes * (config.cend.num_sources + 1)
  for run_cfg in ([config] if runs is None else [runs_lib.run_config(config, r) for r in runs]):
    validate_config(run_cfg, mesh.size, group_size)  # Every swept value too.
  setup = create_setup(config, teacher, table)
  eval_data = _load_eval_data(config, teacher.spec)  # A bad eval_data is refused before any work.
  os.makedirs(workdir, exist_ok=True)

  replicated = NamedSharding(mesh, P())
  teacher_vars = multihost.put(
      {"params": teacher.variables["params"], "batch_stats": teacher.variables["batch_stats"]},
      replicated)
  initial_state = lambda: create_run_states(setup, teacher_vars, teacher.spec.image_size, runs)
  abstract = jax.eval_shape(initial_state)
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  identity = {"teacher_sha256": resume.tree_sha256(teacher.variables),
              "state_shapes": resume.shapes_signature(abstract)}
  changes: dict[str, tuple[Any, Any]] = {}

  def check(saved_config, saved_progress):
    changes.update(resume.check_resume(workdir, saved_config, saved_progress, config, identity))

  mngr = _checkpoint_manager(workdir, config)
  state, saved = _restore(mngr, abstract, check)
  resumed = state is not None
  if state is None:
    state = multihost.put(initial_state(), replicated)
  # Every per-run piece maps over the run axis; `over_runs` None: one run, no axis.
  vectorize = runs is not None and runs_lib.resolve_vectorize(config, mesh.devices.flat[0].platform)
  over_runs = None if runs is None else functools.partial(
      runs_lib.over_runs, num_runs=len(runs), vectorize=vectorize)
  per_run = over_runs or (lambda fn, in_axes: fn)
  fns = steps.make_step_fns(setup, mesh, over_runs=over_runs, vmapped_runs=vectorize)
  # What the units read besides the state: the teacher, and any other frozen network a method
  # needs (DiffDFKD's Stable Diffusion), put on the devices once for the whole run.
  unit_vars = (multihost.put(method.frozen_vars(setup, teacher_vars), replicated)
               if method.frozen_vars else teacher_vars)
  run_dirs = [workdir] if runs is None else [os.path.join(workdir, "runs", r.name) for r in runs]
  # Rows logged after the checkpoint being resumed are logged again: drop them first.
  writers = [MetricsWriter(d, enabled=jax.process_index() == 0,
                           keep_through_epoch=_position(state.epoch) if resumed else 0)
             for d in run_dirs]

  # Host mirrors of the state's position: reading state.epoch / state.unit would wait for
  # the device after every unit. Metrics of a unit are fetched after the next one is
  # dispatched, so the device always has work queued while the host logs.
  epoch, unit = _position(state.epoch), _position(state.unit)
  units_per_epoch = method.units_per_epoch(config)
  last_epoch = min(config.epochs, config.stop_after_epochs or config.epochs)
  bar = tqdm(total=sum(units_per_epoch[:last_epoch]), initial=sum(units_per_epoch[:epoch]) + unit,
             unit="unit", dynamic_ncols=True,
             desc=method.name if runs is None else f"{method.name} x{len(runs)} runs",
             disable=jax.process_index() != 0)
  if not multihost.is_primary():
    bar.write = lambda *args, **kwargs: None  # tqdm.write ignores `disable`: one process speaks.
  if resumed:
    bar.write(f"Resumed from {mngr.directory} at epoch {epoch}, unit {unit}.")
  # Times add up over every invocation of the run, so a resumed run keeps its budget and
  # its time axis. Evaluation is measurement, not training: kept out of train_seconds.
  config_history = list(saved.get("config_changes", []))
  if changes:
    config_history.append({"epoch": epoch, "unit": unit,
                           "changes": {k: list(v) for k, v in changes.items()}})
    bar.write("Continuing with a changed config: " + ", ".join(
        f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()))
  train_before = float(saved.get("train_seconds", 0.0))
  wall_before = float(saved.get("wall_seconds", saved.get("train_seconds", 0.0)))
  eval_seconds = 0.0
  train_seconds = lambda: train_before + time.time() - start - eval_seconds
  run_seconds = lambda: wall_before + time.time() - start
  progress = lambda partial=None: {
      "train_seconds": train_seconds(), "wall_seconds": run_seconds(), **identity,
      "config_changes": config_history, "partial_epoch": partial}
  budget_s = config.time_budget_minutes * 60
  finite_fn = jax.jit(per_run(functools.partial(finite_parts, setup), (0,)))
  renew_fn = method.renew and jax.jit(per_run(functools.partial(method.renew, setup), (0,)),
                                      donate_argnums=(0,))
  grid_fn = jax.jit(per_run(functools.partial(_latest_with_teacher_guesses, setup), (0, None)))
  grid_names = teacher.spec.class_names or table.classes  # Rows named; indices if neither.
  last_save = time.time()
  stopped_early = bool(budget_s) and wall_before >= budget_s and epoch < config.epochs
  if stopped_early:
    bar.write(f"The time budget of {config.time_budget_minutes:g} minutes is spent "
              f"({wall_before / 60:.1f} minutes so far); raise --config.time_budget_minutes "
              "to continue this run.")
  units_run = 0
  summaries: list[dict[str, Any]] = []

  # The epoch's per-unit numbers so far; a run resumed mid-epoch gets them from its checkpoint,
  # so that the epoch's row is the one the uninterrupted run logs. With a run axis every
  # number is a list over the runs.
  partial = saved.get("partial_epoch") or {}
  epoch_metrics: dict[str, list] = (partial["metrics"] if unit and partial.get("epoch") == epoch
                                    else {"low_conf": []})
  while epoch < last_epoch and not stopped_early:
    plan = method.epoch_plan(config, epoch)
    if unit == 0 and method.renews(config, epoch):
      state = renew_fn(state)
    if unit == 0:
      epoch_metrics = {"low_conf": []}
    in_flight = None  # (metrics, finite parts, unit, what) of the last dispatched unit.

    def record(metrics, finite, unit_done: int, what: str) -> None:
      metrics, finite = multihost.to_host((metrics, finite))  # Waits for that unit only.
      _check_finite(metrics, epoch, unit_done, what, runs)
      _check_finite_parts(finite, epoch, unit_done, what, runs)
      for k, v in metrics.items():
        epoch_metrics.setdefault(k, []).append(np.mean(v, axis=-1).tolist())  # per run
      bar.update(1)
      bar.set_postfix({k.split("/")[1]: f"{np.mean(v):.3g}" for k, v in metrics.items()
                       if k in ("gen/loss", "kd/kl", "kd/cncl")}, refresh=False)

    while unit < len(plan):
      name = plan[unit]
      state, metrics, outputs = fns[name](state, unit_vars)
      if "low_conf" in outputs:
        epoch_metrics["low_conf"].append(outputs["low_conf"])
      # "generator round 3": the unit's kind and its index among the epoch's units of that kind.
      label = method.unit_labels[name]
      what = f"{label} {sum(method.unit_labels[n] == label for n in plan[:unit])}"
      finite = finite_fn(state)
      if in_flight is not None:
        record(*in_flight)
      in_flight = (metrics, finite, unit, what)
      unit += 1
      units_run += 1
      now = time.time()
      # Each host has its own clock: process 0's decisions hold for all, or one process would
      # stop or checkpoint alone and the others wait for it in their next collective.
      out_of_time, save_due = multihost.agree(
          bool(budget_s) and run_seconds() > budget_s,
          now - last_save > config.checkpoint_every_minutes * 60)
      if out_of_time or (config.max_units and units_run >= config.max_units):
        stopped_early = True
        break
      if save_due:
        record(*in_flight)  # Never checkpoint a state whose losses were not checked.
        in_flight = None
        _save(mngr, state, config, progress(partial_epoch(epoch, epoch_metrics)))
        last_save = now
    if in_flight is not None:
      record(*in_flight)
    if stopped_early:
      break

    # End of epoch: logs, images, evaluation, checkpoint; one row per run.
    # student/lr: the rate of the epoch's last student step (kd_step counts the steps taken).
    shared = {"student/lr": float(setup.student_lr(max(_position(state.kd_step) - 1, 0))),
              **{k: _position(v) for k, v in method.epoch_scalars(state.method).items()},
              "time/minutes": run_seconds() / 60, "time/train_minutes": train_seconds() / 60}
    summaries = [{**_epoch_summary(epoch_metrics, None if runs is None else r), **shared}
                 for r in range(len(run_dirs))]
    if eval_data is not None and epoch >= config.warmup_epochs and (
        (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == last_epoch):
      eval_start = time.time()
      students = multihost.to_host(state.student)
      for r, summary in enumerate(summaries):
        student = students if runs is None else runs_lib.unstack(students, r)
        summary["eval/top1"] = _top1(setup.student, student, eval_data, setup, config)
      eval_seconds += time.time() - eval_start
    for writer, summary in zip(writers, summaries):
      writer.write(epoch + 1, summary)
    if any("round" in name for name in plan):  # The last round's batch, read back from the
      grids = multihost.to_host(grid_fn(state.method, teacher_vars))  # state (also after a resume).
      for r, run_dir in enumerate(run_dirs):
        images, labels, predicted, confidence = grids if runs is None else runs_lib.unstack(grids, r)
        save_image_grid(os.path.join(run_dir, "samples", f"epoch_{epoch + 1:04d}.png"),
                        images, labels, setup.num_classes, config.grid_images_per_class,
                        enabled=jax.process_index() == 0, class_names=grid_names,
                        predicted_B=predicted, confidence_B=confidence)
    bar.write(_format_summary(epoch + 1, config.epochs, summaries[0]) if runs is None else
              runs_lib.format_epoch(epoch + 1, config.epochs, runs, summaries))
    state = state.replace(epoch=state.epoch + 1, unit=jnp.zeros_like(state.unit))  # keeps its sharding
    epoch, unit = epoch + 1, 0
    _save(mngr, state, config, progress())
    last_save = time.time()

  bar.close()
  _save(mngr, state, config, progress(partial_epoch(epoch, epoch_metrics) if unit else None))
  mngr.close()
  students = multihost.to_host(state.student)  # On every process: may be a collective.
  for writer in writers:
    writer.close()
  # Short of the schedule's end: the time budget, max_units or stop_after_epochs stopped it.
  done = {"epoch": _position(state.epoch), "stopped_early": epoch < config.epochs,
          "minutes": run_seconds() / 60, "train_minutes": train_seconds() / 60}
  student_dir = os.path.join(workdir, STUDENT_DIR)
  if runs is None:
    if multihost.is_primary():
      bundle_lib.save_bundle(student_dir, _student_spec(config, teacher, progress()), students)
    result = {**(summaries[0] if summaries else {}), **done, "student": student_dir}
  else:
    result = {**done, "student": student_dir,
              **_finish_runs(config, workdir, runs, teacher, students, progress(), setup, eval_data,
                             bar.write)}
  if multihost.is_primary():
    atomic_files.write_text(os.path.join(workdir, "result.json"), json.dumps(result, indent=2))
  return result


def _finish_runs(config, workdir: str, runs: list[runs_lib.Run], teacher: bundle_lib.Bundle,
                 students, progress: dict[str, Any], setup: steps.Setup, eval_data,
                 write) -> dict[str, Any]:
  """Each run's student bundle, and the summary over seeds per sweep point (summary.json)."""
  levels = []
  if eval_data is not None and config.accuracy_levels:
    teacher_top1 = _top1(setup.teacher, teacher.variables, eval_data, setup, config)
    levels = [round(f * teacher_top1, 2) for f in config.accuracy_levels]
  rows = [runs_lib.read_rows(os.path.join(workdir, "runs", run.name)) for run in runs]
  points = runs_lib.summarize(runs, rows, levels)
  summary = {"runs": len(runs), "num_runs": config.num_runs, "sweep": config.sweep,
             "accuracy_levels": {"fractions_of_teacher": list(config.accuracy_levels),
                                 "top1": levels},
             "points": points}
  if multihost.is_primary():
    for r, run in enumerate(runs):
      spec = _student_spec(runs_lib.run_config(config, run), teacher, progress)
      spec.extra["run"] = {"name": run.name, "index": run.index, "seed": run.seed,
                           "sweep_point": dict(run.values), "of_runs": len(runs)}
      bundle_lib.save_bundle(os.path.join(workdir, STUDENT_DIR, run.name), spec,
                             runs_lib.unstack(students, r))
    atomic_files.write_text(os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2))
    if any(p["final_top1"]["n"] for p in points):
      write(runs_lib.format_summary(points))
    else:
      write("No accuracy to summarise over the runs: set --config.eval_data to a labelled test "
            "split (each run's student is in student/run_XX).")
  return {"summary": summary}


def _latest_with_teacher_guesses(setup: steps.Setup, method_state, teacher_vars):
  """The method's latest images in [0, 1], their intended labels, and the teacher's guesses."""
  images, labels = setup.method.latest_images(setup, method_state)
  logits, _ = setup.teacher.apply(teacher_vars, bundle_lib.normalize(images, setup.mean, setup.std),
                                  train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32))
  return images, labels, jnp.argmax(probs, -1), jnp.max(probs, -1)


def _format_summary(epoch: int, epochs: int, s: dict[str, Any]) -> str:
  keys = ["gen/loss", "gen/ce", "gen/bn", "gen/adv", "gen/cr", "gen/teacher_acc_on_best",
          "gen/low_confidence_share", "kd/kl", "kd/cncl", "kd/agreement", "eval/top1", "time/minutes"]
  parts = [f"{k.split('/')[1]}={s[k]:.4g}" for k in keys if k in s]
  return f"epoch {epoch}/{epochs}: " + " ".join(parts)
