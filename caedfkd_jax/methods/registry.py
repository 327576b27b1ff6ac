"""The methods `--config.method` can name: each file of methods/ that defines one, and any other
registered by importing its file.

A built-in method is the module `methods/NAME.py` assigning `METHOD = ...`; the folder is read,
not imported, to list them, so `caedfkd distill --help` needs no JAX. A method of your own lives
in a file of your own that calls `register(METHOD)` when imported, e.g. from the config file that
runs it (tests/toy_method.py is one).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # Imported lazily: listing the methods needs no JAX.
  import ml_collections

  from caedfkd_jax.methods.base import Method

_FOLDER = os.path.dirname(os.path.abspath(__file__))
_DEFINES_METHOD = re.compile(r"^METHOD = ", re.MULTILINE)
_registered: dict[str, Method] = {}


@functools.cache
def builtin_names() -> tuple[str, ...]:
  """The methods shipped in methods/, by file name (read once a process)."""
  names = []
  for entry in sorted(os.listdir(_FOLDER)):
    if entry.endswith(".py") and not entry.startswith("_"):
      with open(os.path.join(_FOLDER, entry), encoding="utf-8") as f:
        if _DEFINES_METHOD.search(f.read()):
          names.append(entry[:-3])
  return tuple(names)


def names() -> tuple[str, ...]:
  """Every method `get` finds: the built-in ones, then those registered in this process."""
  builtin = builtin_names()
  return builtin + tuple(name for name in _registered if name not in builtin)


def register(method: Method) -> Method:
  """Makes `method` available by its name; registering the same name again replaces it (a config
  file imported twice). Returns it."""
  if method.name in builtin_names():
    raise ValueError(f"A method named {method.name!r} ships with caedfkd_jax "
                     f"(caedfkd_jax/methods/{method.name}.py); give yours another name.")
  _registered[method.name] = method
  return method


def get(name: str) -> Method:
  """The method `--config.method=name` runs."""
  if name in _registered:
    return _registered[name]
  if name in builtin_names():
    method = importlib.import_module(f"caedfkd_jax.methods.{name}").METHOD
    assert method.name == name, f"methods/{name}.py defines a method named {method.name!r}"
    return method
  raise ValueError(f"Unknown method {name!r}: --config.method takes one of {', '.join(names())}. "
                   "A method of your own is registered when its file is imported "
                   "(`registry.register(METHOD)`), e.g. from the config file that runs it.")


def own_section(section: str) -> ml_collections.ConfigDict | None:
  """The defaults of config section `section` as the method that owns it declares them."""
  for name in names():
    own = get(name).own_config
    if own is not None and section in (sections := own()):
      return sections[section]
  return None
