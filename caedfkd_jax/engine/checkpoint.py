"""A run's checkpoints: where they are, their step numbers, and whether one may be resumed.

A checkpoint holds the train state, the config and a `progress` JSON (times, the teacher's
fingerprint, the state's shapes, an unfinished epoch's metrics). A resume with another
teacher, method or shapes can never be right; one with other values of fields the method
reads is refused unless `allow_config_change` says otherwise. Orbax writes into a temporary
directory and renames it when complete, so a kill mid-save leaves the previous checkpoint as
the latest.
"""

import hashlib
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp

from caedfkd_jax.config import defaults, fields
from caedfkd_jax.io import bundle as bundle_lib
from caedfkd_jax.methods.base import Method

CHECKPOINT_DIR = "checkpoints"
EPOCH_STRIDE = 10_000   # A checkpoint's step is epoch * EPOCH_STRIDE + unit.

# Fields that steer one invocation, not what the run computes: free to change on a resume.
# (The teacher's path may change too; the teacher itself is compared by its weights. The state
# is replicated and every batch sharded, so the device count may change too.)
INVOCATION_FIELDS = frozenset({
    "teacher", "teacher_arch_expected", "time_budget_minutes", "max_units", "stop_after_epochs",
    "checkpoint_every_minutes", "max_checkpoints", "eval_data", "eval_split",
    "eval_allow_class_mismatch", "eval_every_epochs", "eval_batch_size", "grid_images_per_class", "compilation_cache_dir", "allow_config_change",
    "distributed", "coordinator_address", "num_processes", "process_id", "runs_vectorized",
    "accuracy_levels", "cpu_kernels", "num_devices"})


def check_units_per_epoch(units_per_epoch: list[int]) -> None:
  """Every unit of every epoch gets its own checkpoint step (`step`), or refuses the plan."""
  most = max(units_per_epoch, default=0)
  if most >= EPOCH_STRIDE:
    raise ValueError(f"An epoch of this config has {most} units (generator rounds, KD calls, ...); "
                     f"checkpoints number at most {EPOCH_STRIDE - 1} units an epoch. Make "
                     "the units larger (e.g. raise student.steps_per_call).")


def step(epoch: int, unit: int) -> int:
  """The checkpoint step of the state before `unit` of `epoch` (readable: epoch 3, unit 5 is
  30005); `check_units_per_epoch` keeps it unique."""
  return epoch * EPOCH_STRIDE + unit


class Checkpoints:
  """The workdir's Orbax checkpoints of (state, config, progress)."""

  def __init__(self, workdir: str, max_to_keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self.manager = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR),
                                         options=options)

  @property
  def directory(self):
    return self.manager.directory

  def save(self, state, epoch: int, unit: int, config, progress: dict[str, Any]) -> None:
    """Saves and waits; a state already saved at this position is not written twice."""
    at = step(epoch, unit)
    if self.manager.latest_step() == at:
      return
    self.manager.save(at, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict()),
        progress=ocp.args.JsonSave(progress)))
    self.manager.wait_until_finished()

  def _json(self, at: int, name: str) -> dict[str, Any]:
    try:
      return dict(self.manager.restore(
          at, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name])
    except (FileNotFoundError, KeyError, ValueError):
      return {}  # Written by an older version without it.

  def restore(self, abstract_state, check: Callable[[dict, dict], None]) -> tuple[Any, dict]:
    """(state, progress) of the latest checkpoint, or (None, {}).

    `check(saved_config, saved_progress)` runs before the state is read, so a refused
    resume fails with its own message, not with Orbax's shape mismatch.
    """
    at = self.manager.latest_step()
    if at is None:
      return None, {}
    progress = self._json(at, "progress")
    check(self._json(at, "config"), progress)
    restored = self.manager.restore(at, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], progress

  def close(self) -> None:
    self.manager.close()


# --------------------------------------------------------------------------- #
# Whether a checkpoint may be resumed
# --------------------------------------------------------------------------- #


# A fingerprint of a pytree's structure and values (identifies a teacher by its weights).
tree_sha256 = bundle_lib.weights_sha256


def shapes_signature(abstract_state) -> str:
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  text = ";".join(f"{jax.tree_util.keystr(p)}:{x.dtype}:{x.shape}" for p, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()


def _as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return fields.flatten(json.loads(json.dumps(config.to_dict())))   # tuples -> lists, as saved


def config_changes(saved: dict, config: ml_collections.ConfigDict,
                   method: Method | None = None, *,
                   reference: ml_collections.ConfigDict | None = None,
                   invocation_fields: frozenset[str] = INVOCATION_FIELDS
                   ) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} of every field that changes what the run computes.

  Only the engine's fields and those `method` reads are compared (all when None): another
  method's section cannot change this run; `invocation_fields` never are. A field the saved
  config lacks (it was added to the library after the run was saved) counts as unchanged while
  the new config holds its default (in `reference`, by default `distill`'s defaults): that is
  what the run computed before the field existed.
  """
  old = fields.flatten(saved)
  new = _as_saved(config)
  known = _as_saved(defaults.get_config(method and method.name) if reference is None
                    else reference)
  for k in set(new) - set(old):
    if k in known and new[k] == known[k]:
      old[k] = new[k]
  compared = lambda k: method is None or k in defaults.ENGINE_FIELDS or method.reads_field(k)
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in invocation_fields and compared(k) and old.get(k) != new.get(k)}


def listed(changes: dict[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())


def refuse_config_changes(workdir: str, changes: dict[str, tuple[Any, Any]], config,
                          recorded_in: str) -> None:
  """Refuses changed fields unless `config.allow_config_change` (then `recorded_in` keeps them)."""
  if changes and not config.allow_config_change:
    raise ValueError(f"{workdir} holds a run with another config ({listed(changes)}). Rerun with "
                     "the saved values, pass --config.allow_config_change=True to continue with "
                     f"the new ones (recorded in {recorded_in}), or use a new --workdir.")


def check_resume(workdir: str, saved_config: dict, saved_progress: dict, config,
                 identity: dict[str, str], method: Method | None = None
                 ) -> dict[str, tuple[Any, Any]]:
  """Refuses to continue a checkpoint with another teacher, method, shapes or settings.

  Returns the changed fields when `config.allow_config_change` lets them through.
  """
  changes = config_changes(saved_config, config, method)
  saved_teacher = saved_progress.get("teacher_sha256")
  if saved_teacher and saved_teacher != identity["teacher_sha256"]:
    raise ValueError(f"{workdir} holds a run distilled from another teacher (weights differ from "
                     f"{config.teacher}); a checkpoint cannot switch teachers. Use a new --workdir.")
  saved_method = saved_config.get("method", "cae_dfkd") if saved_config else config.method
  if saved_method != config.method:   # Same-shaped states (nayer, cae_dfkd) would pass below.
    raise ValueError(f"{workdir} holds a {saved_method} run; a checkpoint cannot switch methods "
                     f"(--config.method={config.method}). Use --config.method={saved_method} or a "
                     "new --workdir.")
  saved_shapes = saved_progress.get("state_shapes")
  if saved_shapes and saved_shapes != identity["state_shapes"]:
    raise ValueError(f"{workdir} holds a run whose saved state has other shapes than this config "
                     f"makes ({listed(changes) or 'the embedding table or teacher differs'}); these "
                     "can never change on a resume. Use the saved values or a new --workdir.")
  refuse_config_changes(workdir, changes, config, "the student bundle")
  return changes
