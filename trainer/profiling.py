"""A jax.profiler trace of a range of steps, on request (`--config.profile.steps=START,STOP`).

Process 0 traces steps START..STOP-1 into `<workdir>/profile` (TensorBoard's profile
plugin and Perfetto read it). For a gs:// workdir the trace is written to a local
temporary directory and copied up when it stops.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from trainer import storage
from trainer.errors import UserError


def parse_steps(value: str) -> tuple[int, int] | None:
  """"START,STOP" -> (start, stop); "" -> None. Raises UserError."""
  if not str(value).strip():
    return None
  try:
    start, stop = (int(v) for v in str(value).split(","))
  except ValueError:
    start, stop = -1, -1
  if not 0 <= start < stop:
    raise UserError(f"config.profile.steps={value!r}: expected START,STOP with"
                    " 0 <= START < STOP, e.g. 10,20")
  return start, stop


class Profiler:
  """Call `before_step(step)` before dispatching each step and `close()` at the end."""

  def __init__(self, steps: tuple[int, int] | None, workdir: str | None):
    self._steps = steps if workdir is not None else None
    self._workdir = workdir
    self._local = None

  def before_step(self, step: int, state) -> None:
    if self._steps is None:
      return
    start, stop = self._steps
    if step == start and self._local is None:
      target = storage.path(self._workdir) / "profile"
      self._local = (tempfile.mkdtemp(prefix="jaxjob-profile-")
                     if storage.is_remote(self._workdir) else str(target))
      jax.profiler.start_trace(self._local)
    elif step == stop and self._local is not None:
      jax.block_until_ready(state)  # The traced steps' device work belongs in the trace.
      self.close()

  def close(self) -> None:
    if self._local is None:
      return
    jax.profiler.stop_trace()
    if storage.is_remote(self._workdir):
      for root, _, files in os.walk(self._local):
        for name in files:
          relative = os.path.relpath(os.path.join(root, name), self._local)
          with open(os.path.join(root, name), "rb") as f:
            storage.write_bytes(storage.path(self._workdir) / "profile" / relative, f.read())
      shutil.rmtree(self._local, ignore_errors=True)
    self._local = None
    self._steps = None
