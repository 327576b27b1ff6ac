"""Bundles are saved atomically: a save that dies at any point leaves the old bundle loadable."""

import json
import os

import jax
import numpy as np
import pytest

from caedfkd_jax.io import bundle as bundle_lib

SPEC = bundle_lib.ModelSpec("resnet_tiny_a", 4, class_names=["a", "b", "c", "d"])


def _variables(seed: int):
  return jax.device_get(bundle_lib.init_variables(SPEC, seed))


def _assert_is(directory, variables, spec=SPEC):
  loaded = bundle_lib.load_bundle(str(directory))
  assert loaded.spec == spec
  jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def _siblings(tmp_path):
  return sorted(p.name for p in tmp_path.iterdir())


def test_overwrite_replaces_the_bundle_and_leaves_nothing_behind(tmp_path):
  old, new = _variables(0), _variables(1)
  bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, old)
  new_spec = bundle_lib.ModelSpec("resnet_tiny_a", 4, extra={"v": 2})
  assert bundle_lib.save_bundle(str(tmp_path / "b"), new_spec, new) == str(tmp_path / "b")
  _assert_is(tmp_path / "b", new, new_spec)
  assert _siblings(tmp_path) == ["b"]
  assert sorted(os.listdir(tmp_path / "b")) == [bundle_lib.MODEL_JSON, bundle_lib.VARIABLES_DIR]


@pytest.mark.parametrize("fail_at", ["variables", "model_json", "swap_in"])
def test_failed_save_keeps_the_old_bundle(fail_at, tmp_path, monkeypatch):
  old = _variables(0)
  bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, old)

  def boom(*args, **kwargs):
    raise OSError(f"killed at {fail_at}")

  if fail_at == "variables":  # dies just after the new variables are written
    real_save = bundle_lib.ocp.StandardCheckpointer.save

    def save(self, *args, **kwargs):
      real_save(self, *args, **kwargs)
      self.wait_until_finished()
      boom()

    monkeypatch.setattr(bundle_lib.ocp.StandardCheckpointer, "save", save)
  elif fail_at == "model_json":
    monkeypatch.setattr(bundle_lib.json, "dump", boom)
  else:  # the old bundle is already moved aside when the new one fails to move in
    real_rename = os.rename

    def rename(src, dst):
      if ".bundle-tmp-" in os.path.basename(src):
        boom()
      real_rename(src, dst)

    monkeypatch.setattr(bundle_lib.os, "rename", rename)
  with pytest.raises(OSError, match=f"killed at {fail_at}"):
    bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, _variables(1))
  monkeypatch.undo()
  _assert_is(tmp_path / "b", old)
  assert _siblings(tmp_path) == ["b"]


def test_kill_between_the_renames_is_undone_by_load_and_by_save(tmp_path):
  """A kill after old -> backup and before new -> final leaves no bundle at the final path."""
  old = _variables(0)
  for recover_with in ("load", "save"):
    directory = tmp_path / recover_with
    bundle_lib.save_bundle(str(directory), SPEC, old)
    os.rename(directory, tmp_path / f".{recover_with}.bundle-old")
    os.makedirs(tmp_path / f".{recover_with}.bundle-tmp-99999999-x" / "variables")
    if recover_with == "load":
      _assert_is(directory, old)
    else:
      bundle_lib.save_bundle(str(directory), SPEC, _variables(1))
      _assert_is(directory, _variables(1))
  # Load only restores; the next save also sweeps the dead process's temp dir.
  assert ".load.bundle-tmp-99999999-x" in _siblings(tmp_path)
  assert ".save.bundle-tmp-99999999-x" not in _siblings(tmp_path)
  assert ".save.bundle-old" not in _siblings(tmp_path)


def test_leftover_backup_after_the_swap_is_removed(tmp_path):
  """A kill after new -> final but before the backup is deleted: the final bundle is the new one."""
  new = _variables(1)
  bundle_lib.save_bundle(str(tmp_path / ".b.bundle-old"), SPEC, _variables(0))
  bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, new)
  _assert_is(tmp_path / "b", new)
  assert _siblings(tmp_path) == ["b"]


def test_temp_dir_of_a_live_save_is_left_alone(tmp_path):
  live = tmp_path / f".b.bundle-tmp-{os.getppid()}-x"
  live.mkdir()
  bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, _variables(0))
  assert live.is_dir()


def test_refuses_to_replace_a_directory_with_other_files(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "notes.txt").write_text("mine")
  with pytest.raises(ValueError, match=r"holds files that are not part of a bundle \(notes.txt\)"):
    bundle_lib.save_bundle(str(tmp_path / "b"), SPEC, _variables(0))
  assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match="is a file, not a bundle directory"):
    bundle_lib.save_bundle(str(tmp_path / "f"), SPEC, _variables(0))


def test_symlinked_bundle_dir_stays_a_symlink(tmp_path):
  (tmp_path / "real").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "real" / "b", target_is_directory=True)
  bundle_lib.save_bundle(str(tmp_path / "link"), SPEC, _variables(0))
  bundle_lib.save_bundle(str(tmp_path / "link"), SPEC, _variables(1))
  assert (tmp_path / "link").is_symlink()
  _assert_is(tmp_path / "link", _variables(1))
  assert json.loads((tmp_path / "real" / "b" / "model.json").read_text())["arch"] == "resnet_tiny_a"
