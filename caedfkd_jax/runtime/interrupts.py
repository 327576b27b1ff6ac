"""Ctrl-C and SIGTERM as a request to stop at the next safe point, not a traceback.

A long loop (`distill`, `train`) runs inside `stop_on_signals()` and checks `requested` after
each unit: it then checkpoints and says how to resume. A second Ctrl-C stops at once
(KeyboardInterrupt, which the command turns into one line). Signals reach Python only between
bytecodes, so a signal during a compiled call is seen when the call returns.
"""

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
  """Set by the first SIGINT/SIGTERM; `signal_name` says which."""

  def __init__(self):
    self.signal_name: str | None = None

  @property
  def requested(self) -> bool:
    return self.signal_name is not None

  def request(self, signal_name: str = "a stop request") -> None:
    """What a signal does; also for notebooks and tests."""
    self.signal_name = signal_name


@contextlib.contextmanager
def stop_on_signals(message: str = "stopping at the next safe point",
                    enabled: bool = True) -> Iterator[StopRequest]:
  """Within: the first SIGINT/SIGTERM sets `requested` and prints `message` (and that a second
  Ctrl-C stops at once); a second SIGINT raises KeyboardInterrupt. Off the main thread (where
  Python allows no handlers) or when not `enabled`, the request is never set."""
  request = StopRequest()
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield request
    return

  def handler(signum, frame):  # pylint: disable=unused-argument
    if request.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt
    request.request(signal.Signals(signum).name)
    # os.write is safe inside a handler; print may not be (its buffer may be mid-write).
    os.write(2, f"\n{signal.Signals(signum).name}: {message} (Ctrl-C again to stop at once, "
                "losing the work since the last checkpoint).\n".encode())

  previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
  try:
    yield request
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)
