"""How the engine compiles a method's units: each phase with its own options."""

import dataclasses

import jax.numpy as jnp
import ml_collections

from caedfkd_jax.engine import steps
from caedfkd_jax.methods.base import Phase
from caedfkd_jax.runtime import xla_cpu
from caedfkd_jax.runtime.mesh import make_mesh


def _start(state):
  return state, ()


def _step(carry, ctx, i, state, frozen):
  return carry, {"x": jnp.float32(0)}


def _finish(state, carry, ctx, frozen):
  return state, {}, {}


def test_phases_sharing_a_step_function_are_compiled_each_with_its_own_options(monkeypatch):
  """Two phases share `_step` (as NAYER's warm-up and regular rounds share theirs) but only one
  trains the student, so only that one may use YNNPACK's elementwise fusions. The compiled
  step is shared only between phases that compile it alike."""
  compiled = []

  def recording_jit(fn, *, choice, platform, elementwise=True, **kwargs):
    compiled.append((getattr(fn, "__name__", ""), elementwise))
    return fn
  monkeypatch.setattr(xla_cpu, "jit", recording_jit)
  generator = Phase(_start, _step, _finish, num_steps=1)
  student = dataclasses.replace(generator, trains_student=True)
  also_generator = dataclasses.replace(generator, label="another round")
  method = type("Method", (), {"phases": staticmethod(
      lambda setup, mesh: {"round": generator, "kd": student, "again": also_generator})})
  config = ml_collections.ConfigDict({"fuse_steps": False, "cpu_kernels": "tuned"})
  setup = type("Setup", (), {"config": config, "method": method})
  steps.make_step_fns(setup, make_mesh(), fuse=False)
  step_options = sorted(e for name, e in compiled if name == "_step")
  assert step_options == [False, True]   # One per set of options; `again` reuses `round`'s.
