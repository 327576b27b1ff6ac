"""A run's time over all its invocations, as big_vision's `Chrono` keeps it across preemptions.

Wall time counts everything; train time leaves out measurement (evaluation). Both continue
from what the checkpoint recorded, so a resumed run keeps its time budget and time axis.
"""

import contextlib
import time


class Clock:
  """Seconds of the run so far; `state()` goes into the checkpoint, `Clock(**state)` resumes."""

  def __init__(self, train_seconds: float = 0.0, wall_seconds: float | None = None):
    self._train_before = float(train_seconds)
    self._wall_before = float(train_seconds if wall_seconds is None else wall_seconds)
    self._start = time.time()
    self._paused = 0.0
    self._last_save = self._start

  @property
  def wall_before(self) -> float:
    """The run's wall time when this invocation started."""
    return self._wall_before

  def wall(self) -> float:
    return self._wall_before + time.time() - self._start

  def train(self) -> float:
    return self._train_before + time.time() - self._start - self._paused

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside is not training (evaluation): kept out of `train()`."""
    start = time.time()
    try:
      yield
    finally:
      self._paused += time.time() - start

  def out_of(self, budget_seconds: float) -> bool:
    """Whether a budget is set and the run's wall time has passed it."""
    return bool(budget_seconds) and self.wall() > budget_seconds

  def save_due(self, every_seconds: float) -> bool:
    return time.time() - self._last_save > every_seconds

  def saved(self) -> None:
    self._last_save = time.time()

  def state(self) -> dict[str, float]:
    return {"train_seconds": self.train(), "wall_seconds": self.wall()}
