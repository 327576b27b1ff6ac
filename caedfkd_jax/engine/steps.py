"""The training engine every method shares: the state, a method's units, their compilation.

A run is a sequence of *units* (a generator round, a KD call, ...). A method
(`caedfkd_jax/methods/`) describes each kind of unit as a `Phase` of pure
functions: `start`, `num_steps` x `step`, `finish`. `make_step_fns` compiles every
phase over a ("data",) mesh: the state is replicated and every batch is sharded
along "data", so BatchNorm statistics and losses cover the global batch whatever
the device count. On accelerators a unit is one compiled lax.scan over its steps;
on CPUs each step is its own compiled call (`resolve_fuse`).
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from caedfkd_jax.runtime import xla_cpu

PyTree = Any


@struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped."""
  epoch: jax.Array          # int32: current epoch.
  unit: jax.Array           # int32: next unit (generator round, KD call, ...) inside the epoch.
  kd_step: jax.Array        # int32: student steps taken so far (drives the LR schedule).
  student: PyTree           # {"params", "batch_stats"}
  student_opt_state: PyTree
  method: PyTree            # The method's own state (e.g. methods.nayer.SynthesisState).
  rng: jax.Array            # Base key; every use folds in (epoch, unit, step).
  hparams: dict[str, jax.Array] = struct.field(default_factory=dict)  # Swept values (SWEEPABLE).


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static side of a run: networks, tables, optimisers, hyper-parameters, the method."""
  teacher: nn.Module
  student: nn.Module
  generator: nn.Module
  table_KxD: jax.Array
  mean: tuple[float, ...]
  std: tuple[float, ...]
  student_tx: optax.GradientTransformation
  generator_tx: optax.GradientTransformation
  config: Any               # ml_collections.ConfigDict (frozen view).
  noise_scale_D: jax.Array | None = None  # cend.noise_scale(table, config.cend.magnitude_scale),
                            # made once by the method's create_setup; None: magnitudes in table units.
  method: Any = None        # The methods.Method that made this setup and runs its units.
  student_lr: Callable[[jax.Array], jax.Array] | None = None  # The student's LR schedule (logged).
  num_classes: int = 0      # K, the teacher's classes.
  synthesis_batch: int = 0  # Images a generator round makes (banked together).
  group_size: int = 1       # Rows of one CNCL group, K * (N + 1); 1 where images are not grouped.
  kd_batch: int = 0         # Images a KD step distills on (besides any CNCL sub-batch).


@dataclasses.dataclass(frozen=True)
class Phase:
  """One kind of unit of a method: `start`, then `num_steps` steps, then `finish`. All pure.

  start(state) -> (carry, ctx): what the steps change, and what they read.
  step(carry, ctx, i, state, teacher_vars) -> (carry, metrics): step `i` of the unit.
  finish(state, carry, ctx, teacher_vars) -> (state, unit_metrics, outputs): the unit's
    result written into the state; scalars logged beside the per-step metrics; other
    per-unit arrays (e.g. "low_conf" per class, "images").
  The engine advances `state.unit` after `finish`.
  """
  start: Callable
  step: Callable
  finish: Callable
  num_steps: int
  trains_student: bool = False  # XLA:CPU: YNNPACK's elementwise fusions sped up student steps
                                # only (xla_cpu.py); generator steps ran slower with them.


# Float hyper-parameters that one program can sweep (`runs.py`): the step functions read them
# through `hparam`, traced from the state's `hparams` when a run carries them, else as constants
# from the config. Learning rates and shapes live in the optimisers and arrays and cannot be swept.
SWEEPABLE = ("loss.ce", "loss.bn", "loss.adv", "loss.bn_momentum", "cend.magnitude",
             "student.temperature", "student.cncl_weight", "student.cncl_temperature")


def hparam(setup: Setup, hparams: dict[str, jax.Array], name: str):
  """The value of config field `name` ("section.field") for this run."""
  if name in hparams:
    return hparams[name]
  section, field = name.split(".")
  return setup.config[section][field]


def constrain_batch(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """Shards the leading (batch) axis over "data": the data-parallel split."""
  if mesh is None:
    return tree
  sharding = NamedSharding(mesh, P("data"))
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def student_schedule(s, total_steps: int) -> optax.Schedule:
  """Cosine from `s.lr` to `s.eta_min` over the run's student steps (`s`: config.student)."""
  return optax.cosine_decay_schedule(s.lr, max(total_steps, 1), alpha=s.eta_min / s.lr)


def student_optimizer(schedule: optax.Schedule, s) -> optax.GradientTransformation:
  """SGD with momentum and decoupled-as-in-PyTorch weight decay (`s`: config.student)."""
  return optax.chain(optax.add_decayed_weights(s.weight_decay),
                     optax.sgd(schedule, momentum=s.momentum))


# --------------------------------------------------------------------------- #
# Compilation over a mesh
# --------------------------------------------------------------------------- #


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ("data",), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def resolve_fuse(config, fuse: bool | None = None, platform: str | None = None) -> bool:
  """Whether a unit is one lax.scan: `fuse`, else `config.fuse_steps`, else by platform.

  Unset (None) means fused on accelerators and per-step calls on CPUs, where
  XLA runs convolutions inside a while loop about 100x slower (measured).
  `platform` defaults to JAX's default backend.
  """
  if fuse is None:
    fuse = config.fuse_steps
  if fuse is None:
    fuse = (platform or jax.default_backend()) != "cpu"
  return bool(fuse)


def _with_unit_metrics(metrics: dict, unit_metrics: dict) -> dict:
  """Per-unit scalars repeated over the steps axis (the last), so every metric has one shape."""
  shape = next(iter(metrics.values())).shape
  return {**metrics, **{k: jnp.broadcast_to(jnp.asarray(v)[..., None], shape)
                        for k, v in unit_metrics.items()}}


def _fused_unit(phase: Phase) -> Callable:
  def run(state, teacher_vars):
    carry, ctx = phase.start(state)
    def body(carry, i):
      return phase.step(carry, ctx, i, state, teacher_vars)
    carry, metrics = jax.lax.scan(body, carry, jnp.arange(phase.num_steps))
    state, unit_metrics, outputs = phase.finish(state, carry, ctx, teacher_vars)
    return state.replace(unit=state.unit + 1), _with_unit_metrics(metrics, unit_metrics), outputs
  return run


def _finish_and_advance(phase_finish: Callable) -> Callable:
  def finish(state, carry, ctx, teacher_vars):
    state, unit_metrics, outputs = phase_finish(state, carry, ctx, teacher_vars)
    return state.replace(unit=state.unit + 1), unit_metrics, outputs
  return finish


def make_step_fns(setup: Setup, mesh: Mesh, fuse: bool | None = None,
                  over_runs: Callable | None = None, vmapped_runs: bool = False
                  ) -> dict[str, Callable]:
  """Every unit of `setup.method`, jitted over `mesh`: state and teacher replicated, batches
  sharded, what a call replaces donated. Each is `(state, teacher_vars) -> (state, metrics,
  outputs)`, metrics with the steps on their last axis.

  Fused (see `resolve_fuse`), a unit is one compiled lax.scan: the fewest
  dispatches, the accelerator choice. Otherwise every step is its own compiled
  call driven from Python, the CPU choice. Either way each piece compiles once:
  shapes, dtypes and shardings of the state never change between calls.
  `over_runs(fn, in_axes)`, when given, maps each piece over a leading run axis
  of the state (`runs.over_runs`); `vmapped_runs` says that it does so with `jax.vmap`.
  """
  replicated = NamedSharding(mesh, P())
  platform = mesh.devices.flat[0].platform
  fused = resolve_fuse(setup.config, fuse, platform=platform)
  # XLA:CPU's kernels (xla_cpu.py; accelerators ignore the choice). YNNPACK's elementwise
  # fusions only in unfused, unvmapped student steps: they slowed the generator round, and
  # failed to compile inside vmapped scans.
  kernels = functools.partial(xla_cpu.jit, choice=setup.config.get("cpu_kernels", "tuned"),
                              platform=platform)
  per_run = over_runs or (lambda fn, in_axes: fn)
  phases = setup.method.phases(setup, mesh)
  if fused:
    return {name: kernels(per_run(_fused_unit(phase), (0, None)), donate_argnums=(0,),
                          elementwise=False, in_shardings=(replicated, replicated))
            for name, phase in phases.items()}
  compiled = {}   # Phases that share a function object (e.g. NAYER's warm-up and regular
                  # rounds share their step) share its jitted form, so it compiles once.

  def jitted(fn, in_axes, wrap=lambda f: f, **kwargs):
    if fn not in compiled:
      compiled[fn] = kernels(per_run(wrap(fn), in_axes), **kwargs)
    return compiled[fn]

  return {name: _stepped_unit(phase, jitted, elementwise=phase.trains_student and not vmapped_runs)
          for name, phase in phases.items()}


def _stepped_unit(phase: Phase, jitted: Callable, elementwise: bool) -> Callable:
  """A unit as one compiled call per step, driven from Python."""
  start = jitted(phase.start, (0,), elementwise=False)
  step = jitted(phase.step, (0, 0, None, 0, None), elementwise=elementwise, donate_argnums=(0,))
  finish = jitted(phase.finish, (0, 0, 0, None), _finish_and_advance, elementwise=False,
                  donate_argnums=(0,))

  def run(state, teacher_vars):
    carry, ctx = start(state)
    metrics = []
    for i in range(phase.num_steps):
      carry, m = step(carry, ctx, jnp.int32(i), state, teacher_vars)
      metrics.append(m)
    # Per-step metrics stack on the last axis: (steps,), or (runs, steps) as the fused scans give.
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs, axis=-1), *metrics)
    state, unit_metrics, outputs = finish(state, carry, ctx, teacher_vars)
    return state, _with_unit_metrics(metrics, unit_metrics), outputs
  return run
