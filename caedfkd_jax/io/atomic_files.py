"""Files replaced whole or not at all: written beside their target, then renamed over it.

A kill mid-write then leaves the old file (or none), never half of the new one.
Not `tempfile`: its files are private (0600), and these keep the usual permissions.
"""

import os
import uuid


def temp_path_beside(path: str) -> str:
  """A fresh hidden name in `path`'s directory, so `os.replace` onto `path` is atomic."""
  directory, name = os.path.split(os.path.abspath(path))
  return os.path.join(directory, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def write_text(path: str, text: str) -> None:
  """Replaces `path` with `text` atomically."""
  tmp = temp_path_beside(path)
  try:
    with open(tmp, "x", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
