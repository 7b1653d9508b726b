"""Time to result of the tutorial job, and time back to training after a kill: whole processes.

Time to result: `python -m trainer --config=trainer/configs/mobile_price.py` (a fresh
workdir each run) against `bench/bare_mobile_price.py`, the same logistic regression as a
user would write it without jaxjob, from process start to exit. The trainer runs with a
fresh, empty compilation cache (a first run), and with a copy of the cache that one
earlier run left (a second run); the bare script with none. The variants take turns in
`harness.paired_rounds` (rotated, reversed every other round), bare twice for the A/A
control: 2 rounds in quick mode, 5 in full (whole processes are expensive; the A/A
spread says what that buys). Round 0 runs the first-run variant before the second, and
that run's cache is the one copied.

Restart: a longer run of the same job (a checkpoint every `_RESTART_EVERY` steps, a
metrics row every step) is killed with SIGKILL, process group and all, once a checkpoint
is committed (a `checkpoints/<step>` directory: Orbax writes `<step>.orbax-checkpoint-tmp-*`
and renames it when the step is whole); at once the same command starts again on the same
workdir. The time is from the kill to the new process's first `step N/T` line on stdout,
which the loop prints once step N's metrics are read (so the step has finished); N must
be the restored step + 1. Restarts alternate: warm (the cache the killed process filled)
then cold (a fresh cache), each restart killed in turn after its own next checkpoint;
one of each in quick mode, three in full.

`python -m bench --baseline REV` adds a variant to the time-to-result rounds: the
trainer of git revision REV (a worktree, with its own package and config), a first run,
and the record "this tree / REV" to measure a change side by side.

The data: the Kaggle CSV under `$JAXJOB_DATA_DIR` or `../shared/data` beside the
repository, else a synthetic CSV of its shape (the records say which).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

from bench import harness
from bench.harness import emit
from bench.startup import child_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "trainer" / "configs" / "mobile_price.py"
BARE = ROOT / "bench" / "bare_mobile_price.py"
_ROUNDS = {"quick": 2, "full": 5}
_RESTARTS = {"quick": 1, "full": 3}  # warm and cold restarts each
_RESTART_EVERY = 20  # checkpoint cadence of the restarted run (steps)
_STEP_LINE = re.compile(r"^step (\d+)/\d+ ")
_TIMEOUT_S = 180.0
FEATURES = ("battery_power", "blue", "clock_speed", "dual_sim", "fc", "four_g", "int_memory",
            "m_dep", "mobile_wt", "n_cores", "pc", "px_height", "px_width", "ram", "sc_h",
            "sc_w", "talk_time", "three_g", "touch_screen", "wifi")


def data_csv(workdir: str) -> tuple[str, str]:
  """(path, what it is): the shared Mobile Price CSV, else a synthetic one in `workdir`."""
  base = os.environ.get("JAXJOB_DATA_DIR") or str(ROOT.parent / "shared" / "data")
  path = pathlib.Path(base) / "mobile-price" / "train.csv"
  if path.exists():
    return str(path), "kaggle"
  synthetic = os.path.join(workdir, "mobile-price-synthetic.csv")
  write_synthetic_csv(synthetic)
  return synthetic, "synthetic (the shared CSV was not found)"


def write_synthetic_csv(path: str, rows: int = 2000) -> None:
  """The CSV's shape: its 20 integer-or-decimal feature columns and price_range 0..3."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2000, (rows, len(FEATURES))).astype(np.float64)
  x[:, FEATURES.index("clock_speed")] = np.round(rng.uniform(0.5, 3.0, rows), 1)
  x[:, FEATURES.index("m_dep")] = np.round(rng.uniform(0.1, 1.0, rows), 1)
  score = x[:, FEATURES.index("ram")] + 0.3 * x[:, FEATURES.index("battery_power")]
  price = np.searchsorted(np.quantile(score, [0.25, 0.5, 0.75]), score)
  lines = [",".join(FEATURES + ("price_range",))]
  lines += [",".join(f"{v:g}" for v in row) + f",{p}" for row, p in zip(x, price)]
  pathlib.Path(path).write_text("\n".join(lines) + "\n")


def trainer_argv(csv: str, workdir: str, *overrides: str, root=ROOT) -> list[str]:
  config = pathlib.Path(root) / CONFIG.relative_to(ROOT)
  return [sys.executable, "-m", "trainer", f"--config={config}", f"--config.data.path={csv}",
          f"--workdir={workdir}", *overrides]


def _run(argv: list[str], env: dict, cwd=ROOT) -> tuple[harness.Timing, str]:
  """Runs a process to its end: (wall and CPU seconds, its stdout); fails on a bad exit."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=_TIMEOUT_S, check=False)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(argv[1:3])} exited {proc.returncode}:"
                       f" {proc.stderr.strip().splitlines()[-1:]}")
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return harness.Timing(wall, cpu), proc.stdout


def _accuracy(stdout: str) -> float:
  found = re.findall(r"held-out accuracy ([0-9.]+)", stdout)
  return float(found[-1]) if found else float("nan")


class _Runs:
  """The time-to-result variants; each keeps the held-out accuracy its last run printed."""

  def __init__(self, csv: str, workdir: str, baseline: str | None = None):
    self.csv, self.workdir, self.baseline = csv, workdir, baseline
    self.count = 0
    self.warm_cache = None  # the cache one first run left, copied for each second run
    self.accuracy = {}

  def _fresh(self, what: str) -> str:
    self.count += 1
    return os.path.join(self.workdir, f"{what}-{self.count}")

  def bare(self, name: str) -> harness.Timing:
    timing, out = _run([sys.executable, str(BARE), self.csv], child_env(None))
    self.accuracy[name] = _accuracy(out)
    return timing

  def trainer_first(self) -> harness.Timing:
    cache = self._fresh("cache")
    timing, out = _run(trainer_argv(self.csv, self._fresh("run")), child_env(cache))
    self.warm_cache = self.warm_cache or cache
    self.accuracy["trainer_first"] = _accuracy(out)
    return timing

  def baseline_first(self) -> harness.Timing:
    """A first run of the trainer in the `baseline` tree (its own package and config)."""
    env = dict(child_env(self._fresh("cache")), PYTHONPATH=self.baseline)
    timing, out = _run(trainer_argv(self.csv, self._fresh("run"), root=self.baseline), env,
                       cwd=self.baseline)
    self.accuracy["baseline_first"] = _accuracy(out)
    return timing

  def trainer_second(self) -> harness.Timing:
    if self.warm_cache is None:
      raise RuntimeError("a second run before any first run: no warm cache to copy")
    cache = self._fresh("cache")
    shutil.copytree(self.warm_cache, cache)
    timing, out = _run(trainer_argv(self.csv, self._fresh("run")), child_env(cache))
    self.accuracy["trainer_second"] = _accuracy(out)
    return timing


def time_to_result(csv: str, source: str, workdir: str, rounds: int,
                   baseline: tuple[str, str] | None = None) -> None:
  """Emits first-run/bare and second-run/bare, whole processes in paired rounds; with a
  `baseline` (revision, its worktree), also this tree's first run / the baseline's."""
  runs = _Runs(csv, workdir, baseline[1] if baseline else None)
  variants = {"bare": lambda: runs.bare("bare"), "trainer_first": runs.trainer_first,
              "trainer_second": runs.trainer_second,
              "bare_again": lambda: runs.bare("bare_again")}
  if baseline:
    variants["baseline_first"] = runs.baseline_first
  times = harness.paired_rounds(variants, rounds)
  seconds = lambda name: round(statistics.median(t.wall for t in times[name]), 2)
  info = {"data": source, "bare_s": seconds("bare"),
          "accuracy": {k: round(v, 4) for k, v in runs.accuracy.items()}}
  emit(harness.ratio_record(
      "result", "time to result, first run (fresh compilation cache) / bare", times,
      "trainer_first", "bare", target=1.5, trainer_s=seconds("trainer_first"), **info))
  emit(harness.ratio_record(
      "result", "time to result, second run (warm compilation cache) / bare", times,
      "trainer_second", "bare", target=1.0, trainer_s=seconds("trainer_second"), **info))
  if baseline:
    emit(harness.ratio_record(
        "result", f"time to result, first run: this tree / {baseline[0]}", times,
        "trainer_first", "baseline_first", target=None, baseline_s=seconds("baseline_first"),
        trainer_s=seconds("trainer_first"), **info))


class _Process:
  """A trainer process in its own process group; its stdout lines, stamped on arrival."""

  def __init__(self, argv: list[str], env: dict):
    self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
    self.lines: queue.Queue = queue.Queue()
    self.tail: list[str] = []
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put((time.time(), line))
    self.lines.put((time.time(), None))

  def first_step(self, deadline: float) -> tuple[float, int]:
    """(time, N) of the first `step N/T` line."""
    while True:
      try:
        stamp, line = self.lines.get(timeout=max(0.0, deadline - time.time()))
      except queue.Empty:
        line = None  # the deadline passed
      if line is None:
        self.kill()
        raise RuntimeError(f"the restarted trainer printed no step line (exit"
                           f" {self.proc.returncode}): {self.tail[-3:]}")
      self.tail = (self.tail + [line.strip()])[-20:]
      found = _STEP_LINE.match(line)
      if found:
        return stamp, int(found.group(1))

  def kill(self) -> float:
    """SIGKILL to the whole process group; returns when it was sent."""
    sent = time.time()
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
    self.proc.wait()
    return sent


def committed_steps(workdir: str) -> list[int]:
  """The committed checkpoint steps under `workdir` (a step directory renamed into place)."""
  folder = pathlib.Path(workdir) / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _wait_for_commit(process: _Process, workdir: str, after: int, deadline: float) -> None:
  while not [s for s in committed_steps(workdir) if s > after]:
    if process.proc.poll() is not None or time.time() > deadline:
      process.kill()
      raise RuntimeError(f"no checkpoint after step {after} was committed in {workdir}"
                         f" (trainer exit {process.proc.returncode})")
    time.sleep(0.01)


def restarts(csv: str, source: str, workdir: str, count: int) -> None:
  """Kill -9 then restart, `count` times with the killed run's cache and `count` with a
  fresh one, alternating; emits the seconds to the first resumed step and warm / cold."""
  run = os.path.join(workdir, "restart-run")
  argv = trainer_argv(csv, run, "--config.train.steps=100000",
                      f"--config.train.checkpoint_every={_RESTART_EVERY}",
                      "--config.train.log_every=1", "--config.train.eval_every=100000")
  cache = os.path.join(workdir, "restart-cache-0")
  process = _Process(argv, child_env(cache))
  seconds = {"warm": [], "cold": []}
  resumed = []
  try:
    after = 0
    for i in range(2 * count):
      _wait_for_commit(process, run, after, time.time() + _TIMEOUT_S)
      kind = "warm" if i % 2 == 0 else "cold"
      killed = process.kill()
      after = committed_steps(run)[-1]
      if kind == "cold":
        cache = os.path.join(workdir, f"restart-cache-{i + 1}")
      process = _Process(argv, child_env(cache))
      stamp, step = process.first_step(time.time() + _TIMEOUT_S)
      if step != after + 1:
        raise RuntimeError(f"the restarted trainer's first step line is step {step}; the"
                           f" newest committed checkpoint is step {after}")
      seconds[kind].append(stamp - killed)
      resumed.append(after)
  finally:
    process.kill()
  for kind in ("cold", "warm"):
    emit({"bench": "result",
          "metric": f"restart: kill -9 to first resumed step, {kind} cache (s)",
          **harness._rounded(harness.summary(seconds[kind]), 3),  # pylint: disable=protected-access
          "unit": "s", "rounds": count, "seconds": [round(s, 3) for s in seconds[kind]],
          "data": source})
  ratio = [w / c for w, c in zip(seconds["warm"], seconds["cold"])]
  emit({"bench": "result", "metric": "restart: warm cache / cold cache",
        **harness._rounded(harness.summary(ratio)),  # pylint: disable=protected-access
        "rounds": count, "target": "<= 0.5 (goal; reported, not judged)",
        "resumed_from_steps": resumed,
        "detected": "the new process's first 'step N/T' stdout line (log_every=1),"
                    " N = the newest committed step + 1"})


def measure(mode: str, workdir: str) -> None:
  """The `result` workload: restarts first (they also warm the page cache), then the rounds.

  With `JAXJOB_BENCH_BASELINE` (`python -m bench --baseline REV`), the rounds also run
  the trainer of revision REV, checked out as a git worktree in `workdir`.
  """
  csv, source = data_csv(workdir)
  restarts(csv, source, workdir, _RESTARTS[mode])
  revision = os.environ.get("JAXJOB_BENCH_BASELINE")  # set by `python -m bench --baseline`
  if not revision:
    time_to_result(csv, source, workdir, _ROUNDS[mode])
    return
  with baseline_tree(revision, workdir) as tree:
    time_to_result(csv, source, workdir, _ROUNDS[mode], baseline=(revision, tree))


@contextlib.contextmanager
def baseline_tree(revision: str, workdir: str):
  """Revision `revision` of this repository checked out (a git worktree) in `workdir`."""
  tree = os.path.join(workdir, "baseline")
  git = ["git", "-C", str(ROOT), "worktree"]
  subprocess.run(git + ["add", "--detach", tree, revision], check=True, capture_output=True,
                 timeout=120)
  try:
    yield tree
  finally:
    subprocess.run(git + ["remove", "--force", tree], check=False, capture_output=True,
                   timeout=120)
