"""Preemption: turn SIGTERM into "save a checkpoint at an agreed step and exit 42".

`install_early_handler()` runs first thing in `python -m trainer` (before JAX is
imported), so a SIGTERM that arrives during start-up is recorded instead of killing the
process. With one process, the loop reads that flag at every step boundary. With
several, JAX's preemption service (started by `jax.distributed.initialize`) takes over
SIGTERM and `reached_preemption_sync_point(step)` is True on every process at the same
step; a signal recorded before the service started ends the process with 42 at once,
since nothing has been computed that a checkpoint would have to keep.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def _on_signal(signum, frame):  # pylint: disable=unused-argument
  _requested.set()


def install_early_handler() -> None:
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_signal)


def requested_before_start() -> bool:
  return _requested.is_set()


class Watcher:
  """`reached(step)` is True at the step where every process should save and stop."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, _on_signal)

  def reached(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return _requested.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
