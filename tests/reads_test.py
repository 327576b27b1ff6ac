"""Each method reads only the config fields it declares (`Method.reads`), every step included.

A method's `reads` decides which fields are refused when set, swept, and compared on a
resume, so a field read but not declared is a silent dependency (issue 26: CMI declared no
CEND field, yet its KD batch read cend.num_sources). Here a recording config watches every
read while the method is set up, checked, planned and its every unit traced.
"""

import jax
import ml_collections
import pytest

from caedfkd_jax.config import defaults, fields
from caedfkd_jax.engine import steps, train
from caedfkd_jax.io import bundle as bundle_lib, embeddings
from caedfkd_jax.methods import registry
from caedfkd_jax.runtime.mesh import make_mesh
from tiny_run import NUM_CLASSES, tiny_config


class RecordingConfig:
  """A read-only view of a ConfigDict that records each leaf field read through it."""

  def __init__(self, config: ml_collections.ConfigDict, read: set[str], prefix: str = ""):
    object.__setattr__(self, "_config", config)
    object.__setattr__(self, "_read", read)
    object.__setattr__(self, "_prefix", prefix)

  def _seen(self, name: str, value):
    if isinstance(value, ml_collections.ConfigDict):
      return RecordingConfig(value, self._read, f"{self._prefix}{name}.")
    self._read.add(self._prefix + name)
    return value

  def __getattr__(self, name: str):
    return self._seen(name, getattr(self._config, name))

  def __getitem__(self, name: str):
    return self._seen(name, self._config[name])

  def __setattr__(self, name, value):
    raise AttributeError("a recording config is read-only")

  def get(self, name: str, default=None):
    return self._seen(name, self._config[name]) if name in self._config else default

  def __contains__(self, name: str) -> bool:
    return name in self._config

  def keys(self):
    return self._config.keys()

  def to_dict(self):
    self._read.update(self._prefix + k for k in fields.flatten(self._config))
    return self._config.to_dict()


# The cheapest config each method runs with (tiny_run.tiny_config plus what it requires).
ADJUST = {"cmi": {"student.sampler": "uniform", "cmi.synthesis_batch": 8,
                  "cmi.memory_size": 16, "cmi.negatives": 4, "cmi.head_dim": 4},
          "cae_dfkd_cmi": {"cmi.memory_size": 16, "cmi.negatives": 4, "cmi.head_dim": 4},
          "cpsc_dfkd": {"cpsc.batch_size": 8, "cpsc.nz": 8, "cpsc.ngf": 4, "cpsc.epoch_itrs": 1,
                        "cpsc.g_steps": 1, "cpsc.s_steps": 1}}


def reads_of(method_name: str, config: ml_collections.ConfigDict, teacher, table) -> set[str]:
  """Every field read while `config`'s method is checked, set up, planned and traced."""
  read: set[str] = set()
  recording = RecordingConfig(config, read)
  method = registry.get(method_name)
  method.check_config(recording, 1, NUM_CLASSES, ())
  setup = train.create_setup(recording, teacher, table)
  teacher_vars = {k: teacher.variables[k] for k in ("params", "batch_stats")}
  state = jax.eval_shape(lambda: train.create_state(setup, teacher_vars))
  for epoch in range(config.epochs):
    method.epoch_plan(recording, epoch)
    method.renews(recording, epoch)
  method.bundle_fields(recording)
  frozen = method.frozen_vars(setup, teacher_vars) if method.frozen_vars else teacher_vars
  fns = steps.make_step_fns(setup, make_mesh(jax.devices("cpu")[:1]), fuse=True)
  for fn in fns.values():   # Traced, not compiled: every read of every step function.
    jax.eval_shape(fn, state, frozen)
  if method.latest_images is not None:
    jax.eval_shape(lambda s: method.latest_images(setup, s), state.method)
  if method.renew is not None:
    jax.eval_shape(lambda s: method.renew(setup, s), state)
  return read


@pytest.fixture(scope="module")
def sd_bundle(tmp_path_factory) -> str:
  """A tiny random Stable Diffusion bundle (tiny_diffusion.py), as DiffDFKD reads one."""
  import tiny_diffusion
  from caedfkd_jax.cli.main import main
  root = tmp_path_factory.mktemp("sd")
  tiny_diffusion.write_sd_folder(root / "sd")
  assert main(["convert-diffusion", str(root / "sd"), "--out", str(root / "bundle")]) == 0
  return str(root / "bundle")


@pytest.mark.parametrize("name", ["nayer", "cae_dfkd", "cmi", "cae_dfkd_cmi", "cpsc_dfkd",
                                  "diffdfkd"])
def test_a_method_reads_only_the_fields_it_declares(name, teacher_dir, table_path, request):
  config = fields.set_fields(tiny_config(teacher_dir, table_path, name), ADJUST.get(name, {}))
  if name == "cpsc_dfkd":
    config.student_arch = "wrn_tiny"
    config.cpsc.adapter = "mlp"
  if name == "diffdfkd":
    config.student.sampler = "uniform"
    config.diffdfkd.update({"weights": request.getfixturevalue("sd_bundle"), "steps": 1,
                            "batch": 2, "kd_batch": 2, "latent_size": 8})
  read = reads_of(name, config, bundle_lib.load_bundle(teacher_dir),
                  embeddings.load_table(table_path))
  method = registry.get(name)
  undeclared = sorted(f for f in read if f not in defaults.ENGINE_FIELDS
                      and not method.reads_field(f))
  assert not undeclared, f"{name} reads {undeclared} without declaring them"
  # Not vacuous: each method's distinctive fields were seen.
  assert {"student.lr", "student.momentum"} <= read
  assert {"nayer": "generator.noise_dim", "cae_dfkd": "cend.magnitude",
          "cmi": "cend.num_sources", "cae_dfkd_cmi": "cmi.cr", "cpsc_dfkd": "cpsc.alpha",
          "diffdfkd": "diffdfkd.guidance_scale"}[name] in read
