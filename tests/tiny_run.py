"""The tiny run every engine test shares: 4 classes, resnet_tiny_a, seconds per epoch.

The teacher bundle and embedding table it needs are the `teacher_dir` and
`table_path` fixtures in conftest.py.
"""

import jax
import jax.numpy as jnp
import numpy as np

from caedfkd_jax.config import defaults, fields
from caedfkd_jax.methods import registry
from caedfkd_jax.runtime.mesh import make_mesh

NUM_CLASSES = 4


# The tiny sizes of the synthesis methods' shared fields; a method gets those it reads.
TINY = {
    "cend.num_sources": 1,               # group = 4 classes x 2 views = 8 images
    "num_groups": 2,                     # 16 images per round
    "generator.noise_dim": 8, "generator.ngf": 4, "generator.steps": 2,
    "warmup_epochs": 1, "warmup_g_loops": 2, "g_loops": 1,
    "student.batch_groups": 2, "student.kd_steps": 4, "student.steps_per_call": 2,
}


def tiny_config(teacher_dir, table_path, method: str = "cae_dfkd"):
  """The tiny run of `method`: the engine's fields and the TINY sizes of the fields it reads."""
  config = defaults.get_config(None if method == defaults.DEFAULT_METHOD else method)
  config.teacher = teacher_dir
  config.student_arch = "resnet_tiny_a"
  config.epochs = 3
  config.grid_images_per_class = 2
  config.eval_every_epochs = 1
  reads = registry.get(method).reads_field
  return fields.set_fields(config, {k: v for k, v in {**TINY, "embeddings": table_path}.items()
                                    if reads(k)})


def step_outputs(fns, state, teacher_vars) -> dict:
  """One round and one KD call of `fns` (make_step_fns) from `state`; host copies of all outputs.

  The form `assert_same_round_and_kd` compares. `state` is copied first: the steps donate it.
  """
  fresh = lambda: jax.tree.map(jnp.copy, state)
  after_round, gen_metrics, round_outputs = fns["round"](fresh(), teacher_vars)
  after_kd, kd_metrics, _ = fns["kd"](fresh(), teacher_vars)
  synth = after_round.method
  return jax.device_get({
      "gen_metrics": gen_metrics, "low_conf": round_outputs["low_conf"],
      "images": round_outputs["images"],
      "generator_params": synth.generator_params, "bn_ema": synth.bn_ema,
      "bank": synth.bank.images, "unit_after_round": after_round.unit,
      "kd_metrics": kd_metrics, "student": after_kd.student, "unit_after_kd": after_kd.unit})


def round_and_kd(setup, teacher_vars, state, devices=None, fuse: bool = False) -> dict:
  """`step_outputs` of a setup's steps on `devices` (default: one CPU), state replicated."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from caedfkd_jax.engine import steps
  mesh = make_mesh(devices or jax.devices("cpu")[:1])
  replicated = NamedSharding(mesh, P())
  return step_outputs(steps.make_step_fns(setup, mesh, fuse=fuse),
                      jax.device_put(state, replicated), jax.device_put(teacher_vars, replicated))


def assert_same_round_and_kd(a, b, context: str = ""):
  """Two paths' outputs of one generator round and one KD call from the same state agree.

  `a`, `b`: host dicts with gen_metrics, kd_metrics, low_conf, images, bank, generator_params,
  bn_ema, student and the state's unit after each call (keys starting with "unit").
  """
  for key in (k for k in a if k.startswith("unit")):
    assert int(a[key]) == int(b[key]), f"{context}{key}"
  for group in ("gen_metrics", "kd_metrics"):
    for name in a[group]:
      np.testing.assert_allclose(a[group][name], b[group][name], rtol=1e-4, atol=1e-5,
                                 err_msg=f"{context}{group}/{name}")
  np.testing.assert_allclose(a["low_conf"], b["low_conf"], atol=1e-6)
  np.testing.assert_allclose(a["images"], b["images"], atol=1e-4)
  # The bank stores uint8: a value on a rounding boundary may land one level apart.
  np.testing.assert_allclose(a["bank"].astype(int), b["bank"].astype(int), atol=1)
  for name in ("generator_params", "bn_ema", "student"):
    for x, y in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=f"{context}{name}")


def one_cpu_steps(config, teacher_dir, table_path):
  """A checked tiny `config`'s (setup, step functions on one CPU, the teacher's variables and a
  fresh state, both replicated there): for tests that call a few units by hand."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from caedfkd_jax.config import checks
  from caedfkd_jax.engine import steps, train
  from caedfkd_jax.io import bundle as bundle_lib, embeddings
  teacher = bundle_lib.load_bundle(teacher_dir)
  checks.validate_config(config, 1, teacher.spec.num_classes)
  setup = train.create_setup(config, teacher, embeddings.load_table(table_path))
  mesh = make_mesh(jax.devices("cpu")[:1])
  replicated = NamedSharding(mesh, P())
  teacher_vars = jax.device_put({k: teacher.variables[k] for k in ("params", "batch_stats")},
                                replicated)
  state = jax.device_put(train.create_state(setup, teacher_vars), replicated)
  return setup, steps.make_step_fns(setup, mesh), teacher_vars, state
