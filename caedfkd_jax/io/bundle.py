"""Model bundles: the on-disk form of every teacher and student.

A bundle is a directory holding `model.json` (what the network is and how its
inputs are normalised) and `variables/`, an Orbax checkpoint of `params` and
`batch_stats`. Loading needs nothing else.
"""

import dataclasses
import hashlib
import json
import os
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from caedfkd_jax import models
from caedfkd_jax.io import atomic_files

MODEL_JSON = "model.json"
CHECKPOINT_SUFFIXES = (".th", ".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
VARIABLES_DIR = "variables"
# Beside bundle dir X during a save: .X.bundle-tmp-<pid>-* (the new bundle being written) and
# .X.bundle-old (the old one, between the two renames that swap the new one in): the names of
# atomic_files' folder swap, which every folder writer shares.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclasses.dataclass
class ModelSpec:
  """Everything in model.json. `extra` keeps provenance (source sha256, preset...)."""
  arch: str
  num_classes: int
  image_size: int = 32
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  class_names: list[str] | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mean"], d["std"] = list(self.mean), list(self.std)
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ModelSpec":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
      raise ValueError(f"model.json has unknown fields {sorted(unknown)}")
    d = dict(d)
    d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
    return cls(**d)


@dataclasses.dataclass
class Bundle:
  spec: ModelSpec
  variables: dict[str, Any]   # {"params": ..., "batch_stats": ...}

  @property
  def model(self) -> nn.Module:
    return models.create_model(self.spec.arch, self.spec.num_classes)

  def normalize(self, images01_BxHxWxC: jax.Array) -> jax.Array:
    """Maps images in [0, 1] to the network's input space."""
    return normalize(images01_BxHxWxC, self.spec.mean, self.spec.std)


def normalize(images01: jax.Array, mean, std) -> jax.Array:
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images01.astype(jnp.float32) - mean) / std


def init_variables(spec: ModelSpec, rng: jax.Array | int = 0) -> dict[str, Any]:
  """Fresh variables (params and batch_stats) for a spec."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  model = models.create_model(spec.arch, spec.num_classes)
  x = jnp.zeros((1, spec.image_size, spec.image_size, 3), jnp.float32)
  variables = model.init(rng, x, train=False)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _local_checkpointer() -> ocp.StandardCheckpointer:
  """An Orbax checkpointer of this process alone, with no cross-process barrier.

  A bundle is a small host tree: in a multi-process run process 0 alone writes
  the student and every process reads the teacher on its own.
  """
  me = jax.process_index()
  return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
      primary_host=me, active_processes={me}))


def _is_complete(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, MODEL_JSON))
          and os.path.isdir(os.path.join(directory, VARIABLES_DIR)))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # e.g. EPERM: someone else's live process
    return True
  return True


def _recover(directory: str) -> None:
  """Undoes a save killed between its two renames: the old bundle is then only in the backup."""
  backup = atomic_files.dir_backup_path(directory)
  if not os.path.exists(directory) and _is_complete(backup):
    try:
      os.rename(backup, directory)
    except OSError:
      if not os.path.exists(directory):  # lost a race with a concurrent save: that one wins
        raise


def _remove_leftovers(directory: str) -> None:
  """Deletes the backup of a finished swap and temp dirs of saves whose process is dead."""
  if os.path.exists(directory):
    shutil.rmtree(atomic_files.dir_backup_path(directory), ignore_errors=True)
  parent = os.path.dirname(directory)
  prefix = os.path.basename(atomic_files.dir_temp_prefix(directory))
  for entry in os.listdir(parent):
    if entry.startswith(prefix):
      pid = entry[len(prefix):].split("-", 1)[0]
      if not (pid.isdigit() and _pid_alive(int(pid))):
        shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def bundle_exists(directory: str) -> bool:
  """Whether `directory` holds a bundle (or the backup a killed save left of one)."""
  directory = os.path.realpath(directory)
  return os.path.isfile(os.path.join(directory, MODEL_JSON)) or (
      not os.path.exists(directory) and _is_complete(atomic_files.dir_backup_path(directory)))


def save_bundle(directory: str, spec: ModelSpec, variables: dict[str, Any]) -> str:
  """Writes a bundle, replacing one that is there, and returns its path.

  Atomic, so a kill never leaves a half-written bundle: the new bundle is written
  whole into a temp dir beside `directory`, then swapped in by two renames (old ->
  backup, new -> final). A kill between them is undone by the next load or save.
  """
  directory = os.path.abspath(directory)
  target = os.path.realpath(directory)  # a symlinked bundle dir stays a symlink
  if os.path.exists(target) and not os.path.isdir(target):
    raise ValueError(f"{directory} is a file, not a bundle directory; give a directory path.")
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  _recover(target)
  _remove_leftovers(target)
  if os.path.isdir(target):
    foreign = sorted(set(os.listdir(target)) - {MODEL_JSON, VARIABLES_DIR, MODEL_JSON + ".tmp"})
    if foreign:
      raise ValueError(
          f"{directory} holds files that are not part of a bundle ({', '.join(foreign[:5])}), "
          "and saving replaces the whole directory; give a new or empty directory.")
  variables = {"params": variables["params"],
               "batch_stats": variables.get("batch_stats", {})}
  variables = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), variables)
  tmp = atomic_files.temp_dir_beside(target)   # ordinary permissions, unlike tempfile's 0700
  try:
    with _local_checkpointer() as ckptr:
      ckptr.save(os.path.join(tmp, VARIABLES_DIR), variables)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, MODEL_JSON), "w") as f:
      json.dump(spec.to_json(), f, indent=2)
    atomic_files.swap_in_dir(tmp, target)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def load_bundle(directory: str) -> Bundle:
  """Reads a bundle; errors say which file is missing or unreadable."""
  directory = os.path.abspath(directory)
  _recover(os.path.realpath(directory))
  json_path = os.path.join(directory, MODEL_JSON)
  remake = ("Create it again with `caedfkd convert` (PyTorch teacher) or `caedfkd distill` "
            "(student).")
  if os.path.isfile(directory) and directory.lower().endswith(CHECKPOINT_SUFFIXES):
    raise ValueError(
        f"{directory} is a PyTorch checkpoint, not a model bundle: convert it first, e.g. "
        f"`caedfkd convert {directory} --arch ARCH --num-classes K --out teachers/NAME`, and give "
        "that directory.")
  if not os.path.isfile(json_path):
    absent = "" if os.path.isdir(directory) else " (the directory does not exist)"
    raise FileNotFoundError(
        f"{directory} is not a model bundle: {MODEL_JSON} is missing{absent}. Create one "
        "with `caedfkd convert` (PyTorch teacher) or `caedfkd distill` (student).")
  try:
    with open(json_path) as f:
      spec = ModelSpec.from_json(json.load(f))
    models.create_model(spec.arch, spec.num_classes)
  except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError: a ValueError
    raise ValueError(f"{json_path} is not a valid bundle spec ({type(e).__name__}: "
                     f"{_first_line(e)}). {remake}") from None
  variables_dir = os.path.join(directory, VARIABLES_DIR)
  if not os.path.isdir(variables_dir):
    raise FileNotFoundError(f"{directory} is not a complete model bundle: {VARIABLES_DIR}/ is "
                            f"missing. {remake}")
  target = jax.eval_shape(lambda: init_variables(spec))
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
  try:
    with _local_checkpointer() as ckptr:
      variables = ckptr.restore(variables_dir, target)
  except Exception as e:  # noqa: BLE001 - Orbax fails in many ways; all mean the same to the user
    raise ValueError(f"{variables_dir} cannot be read as the variables of a {spec.arch} with "
                     f"{spec.num_classes} classes ({type(e).__name__}: {_first_line(e)}). "
                     f"{remake}") from None
  return Bundle(spec, variables)


def weights_sha256(tree) -> str:
  """sha256 over a pytree's paths, dtypes, shapes and values: how a teacher is identified (by
  its weights, not its file). `convert` prints it, and a student bundle records it as
  `teacher_sha256`."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def untrained_warning(spec: ModelSpec) -> str | None:
  """One line when the bundle records a run that stopped before its network trained: no epoch
  finished, or (a distilled student) no student step taken, as after a warm-up epoch alone.
  None otherwise."""
  training = spec.extra.get("training") or {}
  epochs, steps = training.get("epochs_done"), training.get("student_steps")
  if epochs != 0 and steps != 0:
    return None
  did = f"{epochs} epochs" + (f" and {steps} student steps" if steps is not None else "")
  return (f"warning: this bundle's network is untrained: its run stopped by "
          f"{training.get('stop_reason', 'an early stop')} after {did}; its scores say nothing "
          "about the method.")


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else "(no message)"
