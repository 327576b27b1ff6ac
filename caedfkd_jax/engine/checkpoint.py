"""Whether a checkpoint may be resumed with the config at hand.

A checkpoint records its config, the teacher's fingerprint and the shapes of its
state. A resume with another teacher or other shapes can never be right; one with
other hyper-parameters is refused unless `allow_config_change` says otherwise.
"""

import hashlib
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from caedfkd_jax.config import defaults as default_config


# Fields that steer one invocation, not what the run computes: free to change on a resume.
# (The teacher's path may change too; the teacher itself is compared by its weights.)
INVOCATION_FIELDS = frozenset({
    "teacher", "teacher_arch_expected", "time_budget_minutes", "max_units", "stop_after_epochs",
    "checkpoint_every_minutes", "max_checkpoints", "eval_data", "eval_split", "eval_every_epochs",
    "eval_batch_size", "grid_images_per_class", "compilation_cache_dir", "allow_config_change",
    "distributed", "coordinator_address", "num_processes", "process_id", "runs_vectorized",
    "accuracy_levels", "cpu_kernels"})


def tree_sha256(tree) -> str:
  """A fingerprint of a pytree's structure and values (identifies a teacher by its weights)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    leaf = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{leaf.dtype}:{leaf.shape}".encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def shapes_signature(abstract_state) -> str:
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  text = ";".join(f"{jax.tree_util.keystr(p)}:{x.dtype}:{x.shape}" for p, x in leaves)
  return hashlib.sha256(text.encode()).hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(saved: dict, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} of every field that changes what the run computes.

  A field the saved config lacks (it was added to the library after the run was
  saved) counts as unchanged while the new config holds its default: that is
  what the run computed before the field existed.
  """
  old = _flatten(saved)
  new = _as_saved(config)
  defaults = _as_saved(default_config.get_config())
  for k in set(new) - set(old):
    if k in defaults and new[k] == defaults[k]:
      old[k] = new[k]
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if k not in INVOCATION_FIELDS and old.get(k) != new.get(k)}


def _as_saved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return _flatten(json.loads(json.dumps(config.to_dict())))   # tuples -> lists, as saved


def check_resume(workdir: str, saved_config: dict, saved_progress: dict, config,
                 identity: dict[str, str]) -> dict[str, tuple[Any, Any]]:
  """Refuses to continue a checkpoint with another teacher, other shapes or other settings.

  Returns the changed fields when `config.allow_config_change` lets them through.
  """
  changes = config_changes(saved_config, config)
  listed = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
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
                     f"makes ({listed or 'the embedding table or teacher differs'}); these can never "
                     "change on a resume. Use the saved values or a new --workdir.")
  if changes and not config.allow_config_change:
    raise ValueError(f"{workdir} holds a run with another config ({listed}). Rerun with the saved "
                     "values, pass --config.allow_config_change=True to continue with the new ones "
                     "(recorded in the student bundle), or use a new --workdir.")
  return changes
