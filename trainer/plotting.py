"""plots/history.png, drawn by a helper process that has matplotlib loaded.

Importing matplotlib takes 0.4-0.6 s of CPU, and a run holds the GIL for most of its
start-up, so a background thread cannot hide it. `start()` launches a Python child
running `serve` when a run starts: the child imports matplotlib on another core while
the run loads data and compiles, then draws each history it is sent (drawing a
throwaway plot at start as well, to load fonts early, measured 1.03x slower to a result:
it competes with the compilations). `Plotter.submit` returns at once; `Pending.result`
waits for the PNG. The child serves every run of the process that started it and exits
when that process closes its stdin (or dies). Its stderr goes nowhere: whatever fails
there fails again, and is reported, in the run's process, and the run's stderr pipe does
not wait for the child.

Drawing in the run's own process is the fallback, with the same function, so the plot
is always written, or the error is the run's own: when the child cannot start, has
died, answers with an error, or takes longer than `timeout_s`. No child is started
before `start()`, so a caller that never starts one draws in-process.

Protocol (one request, one answer, in order): the parent writes one JSON line
`{"train": {...}, "eval": {...}, "metric": name, "request": i}` (i = 1, 2, ...); the child
answers `ok <i> <n>\\n` and n bytes of PNG, or `error <i> <message>\\n`.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

# Long enough for matplotlib's first font-cache build on a fresh machine (several seconds).
TIMEOUT_S = 120.0
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds `trainer/`
_LOCK = threading.Lock()
_plotter: Plotter | None = None


def history_spec(rows: list[dict], eval_rows: list[dict], metric: str) -> dict:
  """What `draw` needs from the logged rows and the held-out rows."""
  return {"metric": metric,
          "train": {"step": [r["step"] for r in rows], "loss": [r["loss"] for r in rows],
                    "metric": [r.get(metric) for r in rows]},
          "eval": {"step": [r["step"] for r in eval_rows],
                   "loss": [r["loss"] for r in eval_rows],
                   "metric": [r.get(metric) for r in eval_rows]}}


def draw(spec: dict) -> bytes:
  """PNG bytes of the loss and `spec["metric"]` histories (train, and held-out if any)."""
  import io  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  metric, train, held_out = spec["metric"], spec["train"], spec["eval"]
  fig = Figure(figsize=(10, 4))
  FigureCanvasAgg(fig)
  ax_loss, ax_metric = fig.subplots(1, 2)
  ax_loss.plot(train["step"], train["loss"], label="train")
  ax_loss.set(xlabel="step", ylabel="loss", title="Loss history")
  ax_metric.plot(train["step"], train["metric"], label="train")
  if held_out["step"]:
    ax_metric.plot(held_out["step"], held_out["metric"], "o-", label="held-out")
    ax_loss.plot(held_out["step"], held_out["loss"], "o-", label="held-out")
  ax_metric.set(xlabel="step", ylabel=metric, title=metric.capitalize())
  for ax in (ax_loss, ax_metric):
    ax.grid(alpha=0.3)
    ax.legend()
  # Fixed margins: tight_layout would lay every tick label out once more (~40% of a draw).
  fig.subplots_adjust(left=0.08, right=0.98, bottom=0.12, top=0.92, wspace=0.28)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  return buffer.getvalue()


def _import_matplotlib() -> None:
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top,unused-import
  from matplotlib import figure  # pylint: disable=g-import-not-at-top,unused-import


class Pending:
  """A submitted plot: `result()` is its PNG, from the child or drawn here."""

  def __init__(self, plotter: Plotter | None, spec: dict, request: int | None = None):
    self._plotter, self._spec, self._request = plotter, spec, request
    self._png: bytes | None = None

  def result(self, timeout_s: float = TIMEOUT_S) -> bytes:
    if self._png is None:
      png = None if self._plotter is None else self._plotter.receive(self._request, timeout_s)
      self._png = png if png is not None else draw(self._spec)
    return self._png


class Plotter:
  """The child process (see the module docstring); `served` counts its PNG answers.

  Safe to share between threads: each answer goes to the request it names.
  """

  def __init__(self):
    self.served = 0
    self._sent = 0  # requests numbered 1, 2, ...
    self._buffer = b""
    self._answers: dict[int, bytes | None] = {}  # read, not yet collected (None: an error)
    self._lock = threading.Lock()
    code = (f"import sys; sys.path.insert(0, {_ROOT!r}); "
            "from trainer import plotting; plotting.serve()")
    try:
      self.proc = subprocess.Popen(
          [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
          stderr=subprocess.DEVNULL, env={**os.environ, "MPLBACKEND": "Agg"})
    except OSError:
      self.proc = None

  def alive(self) -> bool:
    return self.proc is not None and self.proc.poll() is None

  def submit(self, spec: dict) -> Pending:
    """Sends `spec` to the child; if it cannot take it, the plot is drawn here instead."""
    with self._lock:
      if self.alive():
        try:
          line = json.dumps({**spec, "request": self._sent + 1}) + "\n"
          self.proc.stdin.write(line.encode())
          self.proc.stdin.flush()
          self._sent += 1
          return Pending(self, spec, self._sent)
        except OSError:  # the child died: its stdin is a broken pipe
          self._stop()
    return Pending(None, spec)

  def receive(self, request: int, timeout_s: float) -> bytes | None:
    """The PNG answering `request`, or None: the child reported an error drawing it, or
    (the child then stopped) it timed out, exited or wrote something unreadable."""
    deadline = time.monotonic() + timeout_s
    with self._lock:
      while request not in self._answers:
        answer = self._read_answer(deadline) if self.proc is not None else None
        if answer is None:
          self._stop()
          return None
        self._answers.update([answer])
      png = self._answers.pop(request)
      self.served += png is not None
      return png

  def _read_answer(self, deadline: float) -> tuple[int, bytes | None] | None:
    """(request, PNG or None for an error answer) read from the child; None if none."""
    if not self._read_until(lambda: b"\n" in self._buffer, deadline):
      return None
    head, self._buffer = self._buffer.split(b"\n", 1)
    status, number, value = (head.decode(errors="replace").split(" ", 2) + ["", ""])[:3]
    if not number.isdigit():
      return None
    if status == "error":
      return int(number), None
    if status != "ok" or not value.isdigit():
      return None
    size = int(value)
    if not self._read_until(lambda: len(self._buffer) >= size, deadline):
      return None
    png, self._buffer = self._buffer[:size], self._buffer[size:]
    return int(number), png

  def _read_until(self, done, deadline: float) -> bool:
    stdout = self.proc.stdout.fileno()
    while not done():
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([stdout], [], [], left)[0]:
        return False
      chunk = os.read(stdout, 1 << 20)
      if not chunk:  # the child exited
        return False
      self._buffer += chunk
    return True

  def stop(self) -> None:
    """Closes the child's stdin and waits for it to exit (kills it after 5 s)."""
    with self._lock:
      self._stop()

  def _stop(self) -> None:
    if self.proc is None:
      return
    proc, self.proc = self.proc, None
    for stream in (proc.stdin, proc.stdout):
      try:
        stream.close()
      except OSError:
        pass
    try:
      proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def start() -> Plotter:
  """The process's plotter, started now if it is not running."""
  global _plotter
  with _LOCK:
    if _plotter is None or not _plotter.alive():
      if _plotter is None:
        atexit.register(stop)
      _plotter = Plotter()
    return _plotter


def started() -> Plotter | None:
  """The running plotter, if `start` started one."""
  return _plotter if _plotter is not None and _plotter.alive() else None


def stop() -> None:
  """Closes the plotter's stdin and waits for it to exit."""
  with _LOCK:
    if _plotter is not None:
      _plotter.stop()


def serve(stdin=None, stdout=None) -> None:
  """The child's loop: one JSON request per line in, one answer out, until end of input."""
  # Ctrl-C and SIGTERM go to the whole process group; the parent decides when this ends.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  stdin, stdout = stdin or sys.stdin.buffer, stdout or sys.stdout.buffer
  try:
    _import_matplotlib()
  except Exception:  # pylint: disable=broad-except
    return  # the parent draws in-process, where the same import fails with its own error
  for line in stdin:
    request = None
    try:
      spec = json.loads(line)
      request = spec.pop("request")
      png = draw(spec)
    except Exception as e:  # pylint: disable=broad-except
      message = f"{type(e).__name__}: {e}".replace("\n", " ")
      stdout.write(f"error {request} {message}\n".encode())
    else:
      stdout.write(b"ok %d %d\n" % (request, len(png)) + png)
    stdout.flush()
