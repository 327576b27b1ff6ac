"""Times caedfkd-jax's own phases: a generator round, a KD call, one DFKD epoch.

Every figure comes from the step functions a real run uses (`steps.make_step_fns`),
called the way `train.train_and_evaluate` calls them, on a bank filled with
random images so the KD steps sample real-sized data from the first call.
"""

import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import flops as flops_lib
from caedfkd_jax.config import checks
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.methods import bank_kd
from caedfkd_jax.methods.base import Setup, TrainState
from caedfkd_jax.runtime.mesh import make_mesh


def _timed(fn, *args):
  """Runs fn(*args), waits for every output, returns (outputs, seconds)."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def _fill_bank(state: TrainState, setup: Setup, seed: int) -> TrainState:
  """A full bank of random uint8 images laid out in whole CNCL groups, as after many rounds."""
  bank = state.method.bank
  capacity = bank.capacity
  rng = np.random.default_rng(seed)
  k, views = setup.num_classes, setup.config.cend.num_sources + 1
  slot = np.arange(capacity)
  within = slot % setup.group_size
  bank = bank.replace(
      images=jnp.asarray(rng.integers(0, 256, bank.images.shape, dtype=np.uint8)),
      labels=jnp.asarray(within % k, jnp.int32),
      source_index=jnp.asarray(within // k % views, jnp.int32),
      group=jnp.asarray(slot // setup.group_size, jnp.int32),
      size=jnp.int32(capacity), cursor=jnp.int32(0))
  return state.replace(method=state.method.replace(bank=bank))


def step_flops(setup: Setup, mesh, state: TrainState,
               teacher_vars) -> dict[str, float | None]:
  """FLOPs of one generator step and one student step (XLA's count of the lowered step).

  None where the backend gives no count before compiling (GPUs): see `count_step_flops`.
  """
  phases = setup.method.phases(setup, mesh)
  count = lambda phase: flops_lib.lowered_flops(jax.jit(phase.step).lower(
      *jax.jit(phase.start)(state), jnp.int32(0), state, teacher_vars))
  return {"generator_step": count(phases["round"]), "student_step": count(phases["kd"])}


def peak_memory() -> dict[str, Any]:
  """Peak device memory where the backend reports it; the process's peak RSS always."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
          "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def load_teacher(config, teacher_arch: str | None = None):
  """(teacher bundle, table): the config's teacher, or a random one of `teacher_arch`.

  Without a teacher path the arch is `teacher_arch`, else config.teacher_arch_expected, else
  resnet56: speed does not depend on the weights.
  """
  from caedfkd_jax.io import embeddings
  table = embeddings.load_table(config.embeddings)
  if config.teacher:
    return bundle_lib.load_bundle(config.teacher), table
  arch = teacher_arch or config.get("teacher_arch_expected") or "resnet56"
  spec = bundle_lib.ModelSpec(arch, table.vectors.shape[0], 32)
  return bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 0)), table


def prepare(config, teacher: bundle_lib.Bundle, table):
  """(setup, mesh over every device, replicated sharding, teacher variables on the mesh)."""
  setup = train.create_setup(config, teacher, table)
  mesh = make_mesh()
  checks.validate_config(config, mesh.size, setup.num_classes)
  replicated = NamedSharding(mesh, P())
  teacher_vars = jax.device_put({"params": teacher.variables["params"],
                                 "batch_stats": teacher.variables["batch_stats"]}, replicated)
  return setup, mesh, replicated, teacher_vars


def count_step_flops(config, teacher: bundle_lib.Bundle, table) -> dict[str, float | None]:
  """`step_flops` of the step `measure` times, lowered (not run) on this process's devices."""
  setup, mesh, replicated, teacher_vars = prepare(config, teacher, table)
  state = train.create_state(setup, teacher_vars)
  return step_flops(setup, mesh, jax.device_put(state, replicated), teacher_vars)


def measure(config, teacher: bundle_lib.Bundle, table, repeats: int = 3,
            fuse: bool | None = None) -> dict[str, Any]:
  """Compile time, per-phase throughput and one DFKD epoch of caedfkd-jax under `config`."""
  setup, mesh, replicated, teacher_vars = prepare(config, teacher, table)
  state = train.create_state(setup, teacher_vars)
  state = jax.device_put(_fill_bank(state, setup, config.seed), replicated)
  flops = step_flops(setup, mesh, state, teacher_vars)
  fns = steps.make_step_fns(setup, mesh, fuse=fuse)

  def round_fn(s):
    return fns["round"](s, teacher_vars)

  def kd_fn(s):
    return fns["kd"](s, teacher_vars)

  out, first_round_s = _timed(round_fn, state)
  state = out[0]
  out, first_kd_s = _timed(kd_fn, state)
  state = out[0]
  round_s, kd_s = [], []
  for _ in range(repeats):
    out, seconds = _timed(round_fn, state)
    state, round_s = out[0], round_s + [seconds]
    out, seconds = _timed(kd_fn, state)
    state, kd_s = out[0], kd_s + [seconds]

  # One post-warm-up epoch exactly as the launcher runs it: its rounds, then its KD calls,
  # dispatched back to back with one wait at the end.
  plan = setup.method.epoch_plan(config, config.warmup_epochs)
  rounds, kd_calls = plan.count("round"), plan.count("kd")
  start = time.perf_counter()
  for name in plan:
    state = (round_fn if name == "round" else kd_fn)(state)[0]
  jax.block_until_ready(state)
  epoch_s = time.perf_counter() - start

  g_steps, kd_per_call = config.generator.steps, config.student.steps_per_call
  # Images through the student per KD step: under sampler=uniform with CNCL on, the CNCL
  # groups ride beside the uniform rows (bank_kd.sample_kd_batch).
  kd_batch = (config.student.batch_groups + bank_kd.cncl_subbatch_groups(config)) * setup.group_size
  round_median, kd_median = statistics.median(round_s), statistics.median(kd_s)
  device = jax.local_devices()[0]
  return {
      "name": "caedfkd-jax",
      "device": f"{device.platform}:{device.device_kind} x{mesh.size}",
      "compute_dtype": str(jnp.dtype(setup.generator.dtype)),
      "fused_steps": steps.resolve_fuse(config, fuse),
      "synthesis_batch": setup.synthesis_batch,
      "kd_batch": kd_batch,
      "round_s": round_median,
      "kd_call_s": kd_median,
      "generator_images_per_s": setup.synthesis_batch * g_steps / round_median,
      "student_images_per_s": kd_batch * kd_per_call / kd_median,
      "epoch_s": epoch_s,
      "epoch_plan": {"rounds": rounds, "g_steps": g_steps, "kd_steps": kd_calls * kd_per_call},
      "compile_s": max(first_round_s - round_median, 0.0) + max(first_kd_s - kd_median, 0.0),
      # Set only through JAX_COMPILATION_CACHE_DIR: with it, compile_s may be a warm figure.
      "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
      "step_flops": flops,
      "generator_steps_per_s": g_steps / round_median,
      "student_steps_per_s": kd_per_call / kd_median,
      "memory": peak_memory(),
      "repeats": {"round_s": round_s, "kd_call_s": kd_s},
  }
