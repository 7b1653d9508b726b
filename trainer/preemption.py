"""Preemption: turn SIGTERM into "save a checkpoint at an agreed step and exit 42".

With several processes, JAX's preemption service (started by `jax.distributed.initialize`)
catches SIGTERM on any process and `reached_preemption_sync_point(step)` returns True on
every process at the same step. With one process there is no service, so a Python
SIGTERM handler sets a flag that the loop reads at the next step boundary.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Watcher:
  """`reached(step)` is True once, at the step where every process should save and stop."""

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._requested = threading.Event()
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self._requested.set()

  def reached(self, step: int) -> bool:
    if self._multi:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
