"""Profiles: a trace of chosen steps, and a profiler server for traces on demand.

`--config.profile.steps=START,STOP`: process 0 traces steps START..STOP-1 into
`<workdir>/profile` (TensorBoard's profile plugin and Perfetto read it). For a gs://
workdir the trace is written to a local temporary directory and copied up when it stops.
Every step runs inside `jax.profiler.StepTraceAnnotation("train", step_num=...)`, so
traces show step boundaries.

`--config.profile.server_port=PORT`: process i runs `jax.profiler.start_server(PORT + i)`
(processes that share a host never collide) for the whole run; capture a trace of a
running job from TensorBoard's profile tab or `python -m jax.collect_profile PORT MS`.
The server listens on every interface of the host (JAX offers no address choice):
expose the port only inside the cluster.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from trainer import storage
from trainer.errors import UserError

_server = None  # the process's one profiler server (JAX allows one)


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


def check_port(port) -> int:
  """`config.profile.server_port` as an int in [0, 65535]. Raises UserError."""
  if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
    raise UserError(f"config.profile.server_port={port!r}: expected 0 (off) or a TCP port"
                    " number, 1-65535")
  return port


def start_server(port) -> int | None:
  """Starts the profiler server of this process on `port + process index` (0: off).

  Returns the port listened on, or None. A second call keeps the first server.
  """
  global _server
  port = check_port(port)
  if not port:
    return None
  port += jax.process_index()
  if port > 65535:
    raise UserError(f"config.profile.server_port: process {jax.process_index()} would"
                    f" listen on {port}, above 65535")
  if _server is None:
    _server = jax.profiler.start_server(port)
  return port


class Profiler:
  """Call `before_step(step)` before dispatching each step and `close()` at the end."""

  def __init__(self, steps: tuple[int, int] | None, workdir: str | None):
    self._steps = steps if workdir is not None else None
    self._workdir = workdir
    self._local = None

  @property
  def steps(self) -> tuple[int, int] | None:
    """(START, STOP) while a trace is still to be taken or finished, else None."""
    return self._steps

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
