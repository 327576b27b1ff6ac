"""The CAE-DFKD run: setup, the epoch loop, checkpoints, logs and the student bundle.

Importable from a notebook: `train_and_evaluate(config, workdir)` is the whole
run; `create_setup` / `create_state` / `steps.make_step_fns` are the pieces.
An epoch is a list of *units*: its generator rounds, then its KD calls. The
state records the next unit, so a run stopped anywhere resumes at the last
checkpointed unit and, all randomness being folded from (seed, epoch, unit),
continues exactly as the uninterrupted run would.
"""

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from caedfkd_jax import bundle as bundle_lib
from caedfkd_jax import cend, embeddings, generator as generator_lib, memory_bank, models, steps
from caedfkd_jax.metrics_writer import MetricsWriter, save_image_grid

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


def epoch_plan(config, epoch: int) -> tuple[int, int]:
  """(generator rounds, KD calls) of an epoch."""
  warm = epoch < config.warmup_epochs
  rounds = config.warmup_g_loops if warm else config.g_loops
  kd_calls = 0 if warm else config.student.kd_steps // config.student.steps_per_call
  return rounds, kd_calls


def total_kd_steps(config) -> int:
  return max(config.epochs - config.warmup_epochs, 0) * config.student.kd_steps


def default_bank_capacity(config, synthesis_batch: int) -> int:
  rounds = sum(epoch_plan(config, e)[0] for e in range(config.epochs))
  return rounds * synthesis_batch


def validate_config(config, num_devices: int, group_size: int) -> None:
  """Catches the mistakes that would otherwise surface as shape errors mid-run."""
  s = config.student
  if s.kd_steps % s.steps_per_call:
    raise ValueError(f"student.kd_steps={s.kd_steps} must be a multiple of "
                     f"student.steps_per_call={s.steps_per_call}")
  syn, kd = config.num_groups * group_size, s.batch_groups * group_size
  for name, size in (("synthesis batch (num_groups*K*(N+1))", syn),
                     ("KD batch (student.batch_groups*K*(N+1))", kd)):
    if size % num_devices:
      raise ValueError(f"The {name} = {size} is not divisible by the {num_devices} devices; "
                       "change num_groups / student.batch_groups.")
  if config.epochs <= config.warmup_epochs:
    raise ValueError(f"epochs={config.epochs} leaves no KD epoch after "
                     f"warmup_epochs={config.warmup_epochs}")


def create_setup(config, teacher: bundle_lib.Bundle, table: embeddings.EmbeddingTable) -> steps.Setup:
  dtype = compute_dtype(config.compute_dtype)
  num_classes = teacher.spec.num_classes
  if table.vectors.shape[0] != num_classes:
    raise ValueError(
        f"The embedding table {config.embeddings!r} has {table.vectors.shape[0]} classes but the "
        f"teacher has {num_classes}; make a table for the teacher's classes with `caedfkd embed`.")
  if config.student_arch not in models.ARCHS:
    raise ValueError(f"Unknown student_arch {config.student_arch!r}. Known archs: "
                     f"{', '.join(sorted(models.ARCHS))}.")
  s = config.student
  schedule = optax.cosine_decay_schedule(s.lr, max(total_kd_steps(config), 1), alpha=s.eta_min / s.lr)
  student_tx = optax.chain(optax.add_decayed_weights(s.weight_decay),
                           optax.sgd(schedule, momentum=s.momentum))
  generator_tx = optax.adam(config.generator.lr, b1=config.generator.b1, b2=config.generator.b2)
  return steps.Setup(
      teacher=models.create_model(teacher.spec.arch, num_classes, dtype),
      student=models.create_model(config.student_arch, num_classes, dtype),
      generator=generator_lib.Generator(
          num_classes=num_classes, img_size=teacher.spec.image_size,
          noise_dim=config.generator.noise_dim, ngf=config.generator.ngf, dtype=dtype),
      table_KxD=jnp.asarray(table.vectors, jnp.float32),
      mean=tuple(teacher.spec.mean), std=tuple(teacher.spec.std),
      student_tx=student_tx, generator_tx=generator_tx, config=config)


def new_generator_params(setup: steps.Setup, rng: jax.Array):
  return generator_lib.init_generator(rng, setup.generator, setup.synthesis_batch,
                                      setup.table_KxD.shape[1])


def create_state(setup: steps.Setup, teacher_vars, image_size: int) -> steps.TrainState:
  config = setup.config
  rng = jax.random.key(config.seed)
  rng_g, rng_s = jax.random.split(jax.random.fold_in(rng, 2**31 - 1))
  student = bundle_lib.init_variables(
      bundle_lib.ModelSpec(config.student_arch, setup.num_classes, image_size), rng_s)
  capacity = config.bank_capacity or default_bank_capacity(config, setup.synthesis_batch)
  capacity = math.ceil(capacity / setup.group_size) * setup.group_size
  return steps.TrainState(
      epoch=jnp.int32(0), unit=jnp.int32(0), kd_step=jnp.int32(0),
      generator_params=new_generator_params(setup, rng_g),
      student=student,
      student_opt_state=setup.student_tx.init(student["params"]),
      bn_ema=jax.tree.map(jnp.zeros_like, teacher_vars["batch_stats"]),
      bn_ema_valid=jnp.bool_(False),
      bank=memory_bank.create_bank(capacity, (image_size, image_size, 3)),
      rng=rng)


def _check_finite(metrics: dict[str, np.ndarray], epoch: int, unit: int, what: str) -> None:
  for name, values in metrics.items():
    values = np.asarray(values).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
      raise NonFiniteLossError(
          f"{name} became {values[bad[0]]} at epoch {epoch}, {what} (unit {unit}), step {bad[0]} "
          "of that call. The run stopped; the last good checkpoint is kept. Lower the learning "
          "rate or loss weight of that term, or try compute_dtype=float32.")


def _student_spec(config, teacher: bundle_lib.Bundle) -> bundle_lib.ModelSpec:
  t = teacher.spec
  return bundle_lib.ModelSpec(
      arch=config.student_arch, num_classes=t.num_classes, image_size=t.image_size,
      mean=t.mean, std=t.std, class_names=t.class_names,
      extra={"distilled_from": config.teacher, "method": "CAE-DFKD",
             "cend_mode": config.cend.mode, "cncl_weight": config.student.cncl_weight})


def _checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.max_checkpoints, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def _save(mngr: ocp.CheckpointManager, state: steps.TrainState, config,
          train_seconds: float) -> None:
  step = int(state.epoch) * 10_000 + int(state.unit)
  if mngr.latest_step() == step:
    return
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict()),
      progress=ocp.args.JsonSave({"train_seconds": train_seconds})))
  mngr.wait_until_finished()


def _restore(mngr: ocp.CheckpointManager, abstract_state) -> tuple[steps.TrainState | None, float]:
  """(state, training seconds spent before it) of the latest checkpoint, or (None, 0)."""
  step = mngr.latest_step()
  if step is None:
    return None, 0.0
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))
  try:
    progress = mngr.restore(step, args=ocp.args.Composite(progress=ocp.args.JsonRestore()))
    seconds = float(progress["progress"]["train_seconds"])
  except (FileNotFoundError, KeyError, ValueError):
    seconds = 0.0  # A checkpoint written before training time was recorded.
  return restored["state"], seconds


def _load_eval_data(config):
  if not config.eval_data:
    return None
  from caedfkd_jax import data
  return data.load_dataset(config.eval_data, config.eval_split)


def _evaluate_student(setup, state, dataset, config) -> dict[str, float]:
  from caedfkd_jax import evaluate
  logits = evaluate.predict(setup.student, state.student, dataset.images, setup.mean, setup.std,
                            config.eval_batch_size, progress=False)
  pred = np.argmax(logits, -1)
  return {"eval/top1": float(np.mean(pred == dataset.labels) * 100)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) CAE-DFKD; writes checkpoints, logs and `workdir/student`."""
  start = time.time()
  if config.distributed:
    jax.distributed.initialize()
  enable_compilation_cache(config.compilation_cache_dir)
  if not config.teacher:
    raise ValueError("config.teacher is empty: pass --config.teacher=PATH_TO_TEACHER_BUNDLE "
                     "(make one with `caedfkd convert`).")
  teacher = bundle_lib.load_bundle(config.teacher)
  if config.teacher_arch_expected and teacher.spec.arch != config.teacher_arch_expected:
    raise ValueError(f"The teacher bundle {config.teacher} is a {teacher.spec.arch}, but this config "
                     f"is for a {config.teacher_arch_expected} teacher.")
  table = embeddings.load_table(config.embeddings)
  setup = create_setup(config, teacher, table)
  mesh = steps.make_mesh()
  validate_config(config, mesh.size, setup.group_size)
  os.makedirs(workdir, exist_ok=True)

  replicated = NamedSharding(mesh, P())
  teacher_vars = jax.device_put(
      {"params": teacher.variables["params"], "batch_stats": teacher.variables["batch_stats"]},
      replicated)
  abstract = jax.eval_shape(lambda: create_state(setup, teacher_vars, teacher.spec.image_size))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract)
  mngr = _checkpoint_manager(workdir, config)
  state, seconds_before = _restore(mngr, abstract)
  resumed = state is not None
  if state is None:
    state = jax.device_put(create_state(setup, teacher_vars, teacher.spec.image_size), replicated)
  fns = steps.make_step_fns(setup, mesh)
  eval_data = _load_eval_data(config)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)

  # Host mirrors of the state's position: reading state.epoch / state.unit would wait for
  # the device after every unit. Metrics of a unit are fetched after the next one is
  # dispatched, so the device always has work queued while the host logs.
  epoch, unit = int(state.epoch), int(state.unit)
  units_per_epoch = [sum(epoch_plan(config, e)) for e in range(config.epochs)]
  bar = tqdm(total=sum(units_per_epoch), initial=sum(units_per_epoch[:epoch]) + unit, unit="unit",
             dynamic_ncols=True, desc="CAE-DFKD", disable=jax.process_index() != 0)
  if resumed:
    bar.write(f"Resumed from {mngr.directory} at epoch {epoch}, unit {unit}.")
  budget_s = config.time_budget_minutes * 60
  eval_seconds = 0.0  # Evaluation is measurement, not training: kept out of train_seconds.
  train_seconds = lambda: seconds_before + time.time() - start - eval_seconds
  last_save = time.time()
  stopped_early = False
  units_run = 0
  result: dict[str, Any] = {}

  while epoch < config.epochs:
    rounds, kd_calls = epoch_plan(config, epoch)
    if unit == 0 and epoch % config.generator.life_epochs == 0 and epoch > 0:
      rng_g = jax.random.fold_in(jax.random.fold_in(state.rng, epoch), 2**31 - 1)
      state = state.replace(generator_params=jax.device_put(new_generator_params(setup, rng_g), replicated))
    epoch_metrics: dict[str, list] = {"low_conf": []}
    best_images = None
    in_flight = None  # (metrics, unit, what) of the last dispatched unit.

    def record(metrics, unit_done: int, what: str) -> None:
      metrics = jax.device_get(metrics)  # Waits for that unit only.
      _check_finite(metrics, epoch, unit_done, what)
      for k, v in metrics.items():
        epoch_metrics.setdefault(k, []).append(np.mean(v))
      bar.update(1)
      bar.set_postfix({k.split("/")[1]: f"{np.mean(v):.3g}" for k, v in metrics.items()
                       if k in ("gen/loss", "kd/kl", "kd/cncl")}, refresh=False)

    while unit < rounds + kd_calls:
      if unit < rounds:
        fn = fns["warmup_round"] if epoch < config.warmup_epochs else fns["round"]
        state, metrics, low_conf_K, best_images = fn(state, teacher_vars)
        epoch_metrics["low_conf"].append(low_conf_K)
        what = f"generator round {unit}"
      else:
        state, metrics = fns["kd"](state, teacher_vars)
        what = f"KD call {unit - rounds}"
      if in_flight is not None:
        record(*in_flight)
      in_flight = (metrics, unit, what)
      unit += 1
      units_run += 1
      now = time.time()
      out_of_time = budget_s and now - start > budget_s
      if out_of_time or (config.max_units and units_run >= config.max_units):
        stopped_early = True
        break
      if now - last_save > config.checkpoint_every_minutes * 60:
        record(*in_flight)  # Never checkpoint a state whose losses were not checked.
        in_flight = None
        _save(mngr, state, config, train_seconds())
        last_save = now
    if in_flight is not None:
      record(*in_flight)
    if stopped_early:
      break

    # End of epoch: logs, images, evaluation, checkpoint.
    summary = {k: float(np.mean(v)) for k, v in epoch_metrics.items() if k != "low_conf"}
    if epoch_metrics["low_conf"]:
      low_conf = np.mean(np.stack(jax.device_get(epoch_metrics["low_conf"])), 0)
      summary["gen/low_confidence_share"] = float(low_conf.mean())
      for k, share in enumerate(low_conf):
        summary[f"low_confidence/class_{k}"] = float(share)
    summary["student/lr"] = float(
        optax.cosine_decay_schedule(config.student.lr, max(total_kd_steps(config), 1),
                                    alpha=config.student.eta_min / config.student.lr)(int(state.kd_step)))
    summary["bank/size"] = int(state.bank.size)
    summary["time/minutes"] = (time.time() - start) / 60
    summary["time/train_minutes"] = train_seconds() / 60
    if eval_data is not None and epoch >= config.warmup_epochs and (
        (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.epochs):
      eval_start = time.time()
      summary.update(_evaluate_student(setup, state, eval_data, config))
      eval_seconds += time.time() - eval_start
    writer.write(epoch + 1, summary)
    if best_images is not None:
      save_image_grid(os.path.join(workdir, "samples", f"epoch_{epoch + 1:04d}.png"),
                      np.asarray(jax.device_get(best_images)), _labels_of_last_round(setup),
                      setup.num_classes, config.grid_images_per_class,
                      enabled=jax.process_index() == 0)
    bar.write(_format_summary(epoch + 1, config.epochs, summary))
    result = summary
    state = state.replace(epoch=state.epoch + 1, unit=jnp.zeros_like(state.unit))  # keeps its sharding
    epoch, unit = epoch + 1, 0
    _save(mngr, state, config, train_seconds())
    last_save = time.time()

  bar.close()
  _save(mngr, state, config, train_seconds())
  mngr.close()
  student_dir = os.path.join(workdir, STUDENT_DIR)
  if jax.process_index() == 0:
    bundle_lib.save_bundle(student_dir, _student_spec(config, teacher), jax.device_get(state.student))
  writer.close()
  result.update({"epoch": int(state.epoch), "stopped_early": stopped_early, "student": student_dir,
                 "minutes": (time.time() - start) / 60, "train_minutes": train_seconds() / 60})
  with open(os.path.join(workdir, "result.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def _labels_of_last_round(setup: steps.Setup) -> np.ndarray:
  """Labels of a synthesis batch: its layout is fixed, so no need to keep them."""
  k, n = setup.num_classes, setup.config.cend.num_sources
  return np.tile(np.arange(k), setup.config.num_groups * (n + 1))


def _format_summary(epoch: int, epochs: int, s: dict[str, Any]) -> str:
  keys = ["gen/loss", "gen/ce", "gen/bn", "gen/adv", "gen/teacher_acc_on_best",
          "gen/low_confidence_share", "kd/kl", "kd/cncl", "kd/agreement", "eval/top1", "time/minutes"]
  parts = [f"{k.split('/')[1]}={s[k]:.4g}" for k in keys if k in s]
  return f"epoch {epoch}/{epochs}: " + " ".join(parts)
