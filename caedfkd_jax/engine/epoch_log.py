"""An epoch's per-unit numbers, and the epoch's row of `metrics.jsonl` made from them.

Each unit adds its metrics (per run, averaged over its steps) and the per-class vectors its
phase reports (`Phase.per_class`). An unfinished epoch goes into the checkpoint as JSON, so a
run resumed mid-epoch logs the row the uninterrupted run logs.
"""

from typing import Any, Iterable

import numpy as np

from caedfkd_jax.methods.base import PerClass, Phase
from caedfkd_jax.runtime import multihost


class EpochLog:
  """The numbers of epoch `epoch` so far. With a run axis every number is a list over runs."""

  def __init__(self, epoch: int, per_class: Iterable[PerClass], saved: dict[str, Any] | None = None):
    self.epoch = epoch
    self.per_class = {p.output: p for p in per_class}
    self.values: dict[str, list] = {k: [] for k in self.per_class}
    if saved and saved.get("epoch") == epoch:
      self.values.update(saved["metrics"])

  def add_outputs(self, phase: Phase, outputs: dict[str, Any]) -> None:
    """The unit's per-class vectors (device arrays, read at the end of the epoch)."""
    for p in phase.per_class:
      self.values[p.output].append(outputs[p.output])

  def add_metrics(self, metrics: dict[str, np.ndarray]) -> None:
    """The unit's host metrics, steps on the last axis: one mean per run."""
    for k, v in metrics.items():
      self.values.setdefault(k, []).append(np.mean(v, axis=-1).tolist())

  def to_json(self) -> dict[str, Any]:
    """The unfinished epoch, for its checkpoint's progress."""
    return {"epoch": self.epoch, "metrics": {
        k: ([np.asarray(x).tolist() for x in multihost.to_host(v)] if k in self.per_class else v)
        for k, v in self.values.items()}}

  def summary(self, run: int | None) -> dict[str, float]:
    """The epoch's row for one run (`run` None: no run axis)."""
    pick = (lambda x: x) if run is None else (lambda x: x[run])
    row = {k: float(np.mean([pick(x) for x in v])) for k, v in self.values.items()
           if k not in self.per_class}
    for name, p in self.per_class.items():
      if self.values[name]:
        units = np.stack([pick(np.asarray(x, np.float32))
                          for x in multihost.to_host(self.values[name])])
        seen = ~np.isnan(units)            # A unit that held no image of a class says NaN.
        shares = np.where(seen, units, 0).sum(0) / np.maximum(seen.sum(0), 1).astype(np.float32)
        present = seen.any(0)
        if present.any():
          row[p.mean_key] = float(shares[present].mean())
        row.update({f"{p.prefix}/class_{k}": float(shares[k]) for k in np.flatnonzero(present)})
    return row
