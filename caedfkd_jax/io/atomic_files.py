"""Files replaced whole or not at all: written beside their target, then renamed over it.

A kill mid-write then leaves the old file (or none), never half of the new one.
Not `tempfile`: its files are private (0600), and these keep the usual permissions.

Every command that writes a file or a folder (`export`, `convert`, `embed`, `convert-diffusion`,
`evaluate --logits`, `probe --out`) follows one overwrite policy: an output that is already there
is refused (`refuse_existing`) unless `--overwrite` is given, and the new one is written beside
it and swapped in whole (`replacing` for a file, `temp_dir_beside` + `swap_in_dir` for a folder),
with the ordinary permissions (0666 less the umask).
"""

import contextlib
import os
import shutil
import uuid
from typing import Iterator

# Beside a folder X being replaced: .X.bundle-tmp-<pid>-<hex> (the new one being written) and
# .X.bundle-old (the old one, between the two renames that swap the new one in). These are the
# names caedfkd_jax.io.bundle.save_bundle uses, so its recovery of a killed swap knows them.
DIR_TEMP_INFIX = ".bundle-tmp-"
DIR_BACKUP_SUFFIX = ".bundle-old"


def refuse_existing(path: str, overwrite: bool, flag: str = "--out") -> None:
  """Raises the one-line refusal when `path` is already there and `overwrite` is not set.

  An empty folder counts as absent: replacing it loses nothing.
  """
  path = os.fspath(path)
  if overwrite or not os.path.lexists(path):
    return
  if os.path.isdir(path) and not os.path.islink(path):
    try:
      if not os.listdir(path):
        return
    except OSError:
      pass
  raise ValueError(f"{flag} {path} exists; pass --overwrite to replace it "
                   f"(or choose another {flag}).")


def umask() -> int:
  """This process's umask, read without changing it where the OS tells it (Linux)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def ordinary_mode() -> int:
  """The mode `open()` gives a new file: 0666 less the umask (0644 under umask 022)."""
  return 0o666 & ~umask()


def temp_path_beside(path: str) -> str:
  """A fresh hidden name in `path`'s directory, so `os.replace` onto `path` is atomic."""
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a fresh temp path beside `path` for the caller to write the new file to.

  When the block ends without an error, that file gets the ordinary mode (some writers, e.g.
  safetensors, make private 0600 files) and is renamed over `path`; on an error it is deleted
  and `path` is left as it was. The parent directory is made if missing.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{path} is a directory; give the path of a file to write.")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = temp_path_beside(path)
  try:
    yield tmp
    os.chmod(tmp, ordinary_mode())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` atomically."""
  with replacing(path) as tmp:
    with open(tmp, "x", encoding="utf-8") as f:
      f.write(text)


def temp_dir_beside(path: str) -> str:
  """A new empty folder beside the folder `path` (ordinary permissions), where the new folder
  is written before `swap_in_dir` puts it at `path`."""
  os.makedirs(os.path.dirname(os.path.realpath(path)), exist_ok=True)
  tmp = f"{dir_temp_prefix(path)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
  os.mkdir(tmp)
  return tmp


def dir_temp_prefix(path: str) -> str:
  """What the names of `temp_dir_beside(path)`'s folders start with (then `<pid>-<random>`)."""
  parent, name = os.path.split(os.path.realpath(path))
  return os.path.join(parent, f".{name}{DIR_TEMP_INFIX}")


def dir_backup_path(path: str) -> str:
  """Where the old folder at `path` waits while `swap_in_dir` renames the new one in."""
  parent, name = os.path.split(os.path.realpath(path))
  return os.path.join(parent, f".{name}{DIR_BACKUP_SUFFIX}")


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


def swap_in_dir(tmp: str, path: str) -> None:
  """Puts the finished folder `tmp` (from `temp_dir_beside(path)`) at `path`, replacing what is
  there whole: two renames (old -> backup, new -> `path`), then the old one is deleted. A failure
  between the renames puts the old folder back. A symlinked `path` stays a symlink.
  """
  target = os.path.realpath(path)
  backup = dir_backup_path(target)
  if os.path.lexists(backup) and os.path.lexists(target):
    _remove(backup)  # left by a swap that finished but was killed before deleting it
  moved = False
  try:
    if os.path.lexists(target):
      os.rename(target, backup)
      moved = True
    os.rename(tmp, target)
  except BaseException:
    if moved and not os.path.lexists(target):
      os.rename(backup, target)  # put the old folder back
    raise
  if os.path.lexists(backup):
    _remove(backup)
