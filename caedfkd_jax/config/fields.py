"""Config fields by dotted name ("student.lr", "seed"), and the sweep spec that names some."""

from collections.abc import Collection, Mapping
from typing import Any

import ml_collections


def get_field(config: ml_collections.ConfigDict, name: str) -> Any:
  """The value of `name`, a top-level field or "section.field"."""
  for part in name.split("."):
    config = config[part]
  return config


def set_field(config: ml_collections.ConfigDict, name: str, value: Any) -> None:
  """Sets `name` in place (a locked config refuses a field it lacks, as overrides do)."""
  *sections, field = name.split(".")
  for part in sections:
    config = config[part]
  config[field] = value


def set_fields(config: ml_collections.ConfigDict,
               values: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets every {"section.field": value} on `config` in place and returns it."""
  for name, value in values.items():
    set_field(config, name, value)
  return config


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"section.field": value} of every leaf of a (nested) ConfigDict or dict."""
  out = {}
  for key in tree.keys():
    value = tree[key]
    if isinstance(value, Mapping | ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def parse_sweep(text: str, sweepable: Collection[str]) -> dict[str, tuple[float, ...]]:
  """"a.b=0,0.5; c.d=1,2" -> {"a.b": (0.0, 0.5), "c.d": (1.0, 2.0)}; its grid is their product.

  `sweepable`: the fields that one program can sweep (the method's `Method.sweepable`).
  """
  sweep: dict[str, tuple[float, ...]] = {}
  for part in filter(None, (p.strip() for p in text.split(";"))):
    name, sep, values = part.partition("=")
    name = name.strip()
    if not sep or not values.strip():
      raise ValueError(f"config.sweep={text!r}: {part!r} is not FIELD=V1,V2,...; write e.g. "
                       "--config.sweep=\"student.cncl_weight=0,0.5\" (fields separated by ';').")
    if name not in sweepable:
      raise ValueError(f"config.sweep: {name!r} cannot be swept in one program by this method; "
                       f"its sweepable fields are {', '.join(sweepable) or '(none)'} (learning "
                       "rates and shapes are compiled into the program: run those as separate "
                       "jobs).")
    if name in sweep:
      raise ValueError(f"config.sweep: {name!r} is listed twice.")
    try:
      sweep[name] = tuple(float(v) for v in values.split(","))
    except ValueError:
      raise ValueError(f"config.sweep: the values of {name!r} ({values!r}) must be numbers "
                       "separated by commas.") from None
  return sweep
