"""A step-progress watchdog: the one guard against a peer that is alive but stuck.

JAX's heartbeats catch a dead process, not a live one that stopped stepping (a hung
collective, a deadlocked input thread): every other process then waits in its next
collective forever. When no step finishes for `timeout` seconds, the watchdog prints
why, dumps the Python stack of every thread to stderr and aborts the process (SIGABRT,
exit status 134: a signal death, which the launchers and Kubernetes manifests restart).
It is armed after the first step, so compilation time does not count.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time


class Watchdog:
  """Call `beat(step)` whenever a step is known to be finished."""

  def __init__(self, timeout: float):
    self.timeout = float(timeout)
    self._last = time.monotonic()
    self._step = None
    self._stop = threading.Event()
    self._thread = None
    if self.timeout > 0:
      self._thread = threading.Thread(target=self._watch, name="jaxjob-watchdog", daemon=True)
      self._thread.start()

  def beat(self, step: int) -> None:
    self._last = time.monotonic()
    self._step = step

  def _watch(self) -> None:
    period = max(0.5, min(5.0, self.timeout / 4))
    while not self._stop.wait(period):
      idle = time.monotonic() - self._last
      if self._step is not None and idle > self.timeout:
        self._fire(idle)

  def _fire(self, idle: float) -> None:
    print(f"watchdog: no training step finished for {idle:.0f} s (limit {self.timeout:.0f} s;"
          f" last finished step {self._step}); dumping every thread's stack and aborting",
          file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os.abort()

  def close(self) -> None:
    self._stop.set()
