"""Pinned numbers of one CAE-DFKD generator round and KD call, for refactors (issue 13).

`golden/cae_dfkd_tiny.msgpack.gz` holds a state of the tiny run (tiny_run.py) after its warm-up
round, and what one more round and one KD call computed from it with the code of
2026-11-26, before the method seam. The pin test (method_pin_test.py) runs the current
code from that stored state and compares with the path tolerances of
`tiny_run.assert_same_round_and_kd`. Starting from a stored state, not from a seed, keeps the
comparison to a few steps on equal inputs, as portable as the path comparisons.

Regenerate only when the maths is meant to change, and say so in the commit:
  python tests/golden_pin.py
"""

import dataclasses
import gzip
import pathlib

import flax
import jax
import numpy as np
import optax

from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.methods.base import Setup, TrainState
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import NUM_CLASSES, round_and_kd, tiny_config

GOLDEN = pathlib.Path(__file__).parent / "golden" / "cae_dfkd_tiny.msgpack.gz"


def tiny_teacher_and_table() -> tuple[bundle_lib.Bundle, embeddings.EmbeddingTable]:
  """The conftest fixtures' teacher and table, built in memory."""
  names = [f"c{k}" for k in range(NUM_CLASSES)]
  spec = bundle_lib.ModelSpec("resnet_tiny_a", NUM_CLASSES, 32, class_names=names)
  vectors = np.random.default_rng(0).normal(size=(NUM_CLASSES, 16)).astype(np.float32)
  return (bundle_lib.Bundle(spec, bundle_lib.init_variables(spec, 1)),
          embeddings.EmbeddingTable(vectors, names, {"encoder": "test"}))


def tiny_setup(teacher, table) -> Setup:
  """The tiny config with 3 generator steps and plain SGD for the generator (portable)."""
  config = tiny_config("unused-teacher-path", "unused-table-path")
  config.generator.steps = 3
  setup = train.create_setup(config, teacher, table)
  return dataclasses.replace(setup, generator_tx=optax.sgd(0.05))


def _state_dict(state: TrainState) -> dict:
  state = state.replace(rng=jax.random.key_data(state.rng))
  return flax.serialization.to_state_dict(jax.device_get(state))


def save(path: pathlib.Path, state: TrainState, outputs: dict) -> None:
  blob = flax.serialization.msgpack_serialize({"state": _state_dict(state), "outputs": outputs})
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(gzip.compress(blob, mtime=0))


def load(path: pathlib.Path, template: TrainState) -> tuple[TrainState, dict]:
  """(the stored state, shaped like `template`; the stored outputs as nested dicts)."""
  stored = flax.serialization.msgpack_restore(gzip.decompress(path.read_bytes()))
  if "method" not in stored["state"]:   # Stored before the method seam: NAYER's fields were flat.
    flat = stored["state"]
    flat["method"] = {k: flat.pop(k) for k in ("generator_params", "bn_ema", "bn_ema_valid", "bank")}
  template = jax.device_get(template.replace(rng=jax.random.key_data(template.rng)))
  state = flax.serialization.from_state_dict(template, stored["state"])
  return state.replace(rng=jax.random.wrap_key_data(state.rng)), stored["outputs"]


def main() -> None:
  teacher, table = tiny_teacher_and_table()
  setup = tiny_setup(teacher, table)
  mesh = make_mesh(jax.devices("cpu")[:1])
  state = train.create_state(setup, teacher.variables)
  state, _, _ = steps.make_step_fns(setup, mesh, fuse=False)["warmup_round"](
      state, teacher.variables)
  state = jax.device_get(state)
  save(GOLDEN, state, round_and_kd(setup, teacher.variables, state))
  print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")


if __name__ == "__main__":
  main()
