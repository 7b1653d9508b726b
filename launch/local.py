"""`python -m launch local`: N cooperating trainer processes on this machine.

The CPU rehearsal of a multi-host job. Each process gets the process variables of
DESIGN.md section 4 (`JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>`, `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID`, `JAXJOB_DEVICES_PER_PROCESS`), so the trainer runs exactly the
`jax.distributed.initialize` path it runs on Kubernetes, with cross-process CPU
collectives (gloo) on loopback. Every output line is prefixed with `[rank N]`.
Ctrl-C or SIGTERM is forwarded to every process as SIGTERM (they agree on a step, commit
a checkpoint and exit 42). The first process that fails stops the others: SIGTERM, then
SIGKILL after `--grace-period` seconds. The exit code is the first failure's (a signal
death N is reported as 128 + N), or 0.

Example:
  python -m launch local --processes 2 --devices-per-process 4 -- \
      --config=trainer/configs/mobile_price.py \
      --config.data.path=../shared/data/mobile-price/train.csv --workdir=runs/mp2
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import common


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(rank: int, processes: int, devices: int, port: int) -> dict[str, str]:
  """The variables of DESIGN.md section 4 for one local process."""
  return {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JAX_NUM_PROCESSES": str(processes),
      "JAX_PROCESS_ID": str(rank),
      "JAXJOB_DEVICES_PER_PROCESS": str(devices),
  }


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


class _Job:
  """The running processes, their output pumps and the stop-the-others policy."""

  def __init__(self, argv: list[str], envs: list[dict[str, str]], grace: float):
    self.grace = grace
    self.lock = threading.Lock()
    self.first_failure: int | None = None
    self.procs = []
    base = dict(os.environ)
    base.pop("XLA_FLAGS", None)  # JAXJOB_DEVICES_PER_PROCESS sets the device count.
    for rank, env in enumerate(envs):
      proc = subprocess.Popen(argv, env={**base, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                              errors="replace", bufsize=1, start_new_session=True)
      self.procs.append(proc)
      threading.Thread(target=self._pump, args=(rank, proc), daemon=True).start()

  def _pump(self, rank: int, proc: subprocess.Popen) -> None:
    for line in proc.stdout:
      with self.lock:
        sys.stdout.write(f"[rank {rank}] {line}")
        sys.stdout.flush()

  def signal_all(self, signum: int) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        try:
          proc.send_signal(signum)
        except ProcessLookupError:
          pass

  def wait(self) -> int:
    stop_deadline = None
    while True:
      codes = [p.poll() for p in self.procs]
      for rank, code in enumerate(codes):
        if code not in (None, 0) and self.first_failure is None:
          self.first_failure = _exit_code(code)
          print(f"[launch] rank {rank} exited with code {self.first_failure}; stopping the"
                " others", file=sys.stderr, flush=True)
          self.signal_all(signal.SIGTERM)
          stop_deadline = time.monotonic() + self.grace
      if all(c is not None for c in codes):
        break
      if stop_deadline is not None and time.monotonic() > stop_deadline:
        self.signal_all(signal.SIGKILL)
        stop_deadline = None
      time.sleep(0.05)
    for proc in self.procs:
      proc.wait()
    return self.first_failure or 0


def _run(args) -> int:
  # One machine: more processes than this would only exhaust it.
  if not (1 <= args.processes <= 256 and 1 <= args.devices_per_process <= 256):
    raise common.UsageError(f"--processes={args.processes}, --devices-per-process="
                            f"{args.devices_per_process}: expected 1 to 256 each")
  if not 0 <= args.port <= 65535:
    raise common.UsageError(f"--port={args.port}: expected a TCP port, 1 to 65535 (0: a free"
                            " one)")
  if not 0 <= args.grace_period < float("inf"):  # (NaN fails this too)
    raise common.UsageError(f"--grace-period={args.grace_period}: expected a number of"
                            " seconds >= 0")
  trainer_args = common.trainer_args(args.trainer_args, workdir_in_flags=True)
  argv = [sys.executable, "-m", "trainer", *trainer_args]
  port = args.port or _free_port()
  envs = [process_env(r, args.processes, args.devices_per_process, port)
          for r in range(args.processes)]
  if args.dry_run:
    for rank, env in enumerate(envs):
      print(f"# rank {rank}")
      common.run(["env", *(f"{k}={v}" for k, v in env.items()), *argv], dry_run=True)
    return 0
  job = _Job(argv, envs, args.grace_period)
  forward = lambda signum, frame: job.signal_all(signal.SIGTERM)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    return job.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def add_parser(subparsers) -> None:
  parser = subparsers.add_parser(
      "local", help="N cooperating trainer processes on this machine",
      description=__doc__.split("\n\n")[0], allow_abbrev=False)
  parser.add_argument("--processes", type=int, default=2, help="number of processes")
  parser.add_argument("--devices-per-process", type=int, default=4,
                      help="virtual CPU devices per process")
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: free)")
  parser.add_argument("--grace-period", type=float, default=30.0,
                      help="seconds between SIGTERM and SIGKILL when stopping processes")
  parser.add_argument("--dry-run", action="store_true", help="print the commands only")
  parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then trainer flags")
  parser.set_defaults(func=_run)
