"""A method's units, compiled: each `Phase` jitted over the ("data",) mesh, once per run.

The state is replicated and every batch sharded along "data", so BatchNorm statistics and
losses cover the global batch whatever the device count. On accelerators a unit is one
compiled lax.scan over its steps; on CPUs each step is its own compiled call (`resolve_fuse`).
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from caedfkd_jax.methods.base import Phase, Setup
from caedfkd_jax.runtime import xla_cpu


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
  def run(state, frozen):
    carry, ctx = phase.start(state)
    def body(carry, i):
      return phase.step(carry, ctx, i, state, frozen)
    carry, metrics = jax.lax.scan(body, carry, jnp.arange(phase.num_steps))
    state, unit_metrics, outputs = phase.finish(state, carry, ctx, frozen)
    return state.replace(unit=state.unit + 1), _with_unit_metrics(metrics, unit_metrics), outputs
  return run


def _finish_and_advance(phase_finish: Callable) -> Callable:
  def finish(state, carry, ctx, frozen):
    state, unit_metrics, outputs = phase_finish(state, carry, ctx, frozen)
    return state.replace(unit=state.unit + 1), unit_metrics, outputs
  return finish


def make_step_fns(setup: Setup, mesh: Mesh, fuse: bool | None = None,
                  over_runs: Callable | None = None, vmapped_runs: bool = False
                  ) -> dict[str, Callable]:
  """Every unit of `setup.method`, jitted over `mesh`: state and frozen variables replicated,
  batches sharded, what a call replaces donated. Each is `(state, frozen) -> (state, metrics,
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
  # XLA:CPU's kernels (runtime/xla_cpu.py; accelerators ignore the choice). YNNPACK's
  # elementwise fusions only in unfused, unvmapped student steps: they slowed the generator
  # round, and failed to compile inside vmapped scans.
  kernels = functools.partial(xla_cpu.jit, choice=setup.config.get("cpu_kernels", "tuned"),
                              platform=platform)
  per_run = over_runs or (lambda fn, in_axes: fn)
  phases = setup.method.phases(setup, mesh)
  if fused:
    return {name: kernels(per_run(_fused_unit(phase), (0, None)), donate_argnums=(0,),
                          elementwise=False, in_shardings=(replicated, replicated))
            for name, phase in phases.items()}
  compiled = {}   # Phases that share a function object (e.g. NAYER's warm-up and regular
                  # rounds share their step) share its jitted form, so it compiles once: keyed
                  # by the function and every option it is compiled with.

  def jitted(fn, in_axes, wrap=None, elementwise=False, donate_argnums=()):
    key = (fn, in_axes, wrap, elementwise, donate_argnums)
    if key not in compiled:
      compiled[key] = kernels(per_run((wrap or (lambda f: f))(fn), in_axes),
                              elementwise=elementwise, donate_argnums=donate_argnums)
    return compiled[key]

  return {name: _stepped_unit(phase, jitted, elementwise=phase.trains_student and not vmapped_runs)
          for name, phase in phases.items()}


def _stepped_unit(phase: Phase, jitted: Callable, elementwise: bool) -> Callable:
  """A unit as one compiled call per step, driven from Python."""
  start = jitted(phase.start, (0,))
  step = jitted(phase.step, (0, 0, None, 0, None), elementwise=elementwise, donate_argnums=(0,))
  finish = jitted(phase.finish, (0, 0, 0, None), _finish_and_advance, donate_argnums=(0,))

  def run(state, frozen):
    carry, ctx = start(state)
    metrics = []
    for i in range(phase.num_steps):
      carry, m = step(carry, ctx, jnp.int32(i), state, frozen)
      metrics.append(m)
    # Per-step metrics stack on the last axis: (steps,), or (runs, steps) as the fused scans give.
    metrics = jax.tree.map(lambda *xs: jnp.stack(xs, axis=-1), *metrics)
    state, unit_metrics, outputs = finish(state, carry, ctx, frozen)
    return state, _with_unit_metrics(metrics, unit_metrics), outputs
  return run
