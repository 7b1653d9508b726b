"""Fault tolerance: kill -9, SIGTERM, dead and stuck peers, NaN, quarantined checkpoints.

Multi-process tests run the real `python -m launch local` (or the trainer processes it
would start) on localhost with gloo collectives, and compare final `params_sha256`
with an uninterrupted run of the same topology: resume must be bit-identical.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from launch import local
from tests.conftest import ROOT, run_trainer, tiny_config
from trainer import checkpoint
from trainer import train
from trainer.errors import Diverged

STEPS = 400
EVERY = 20


def _trainer_args(workdir, steps=STEPS, extra=()):
  return ["--config=trainer/configs/breast_cancer.py", f"--config.train.steps={steps}",
          f"--config.train.checkpoint_every={EVERY}", "--config.train.eval_every=200",
          "--config.train.log_every=20", "--config.train.batch_size=64",
          "--config.distributed.heartbeat_timeout=10", f"--workdir={workdir}", *extra]


def _launch(workdir, processes=2, devices=4, extra=(), env=None):
  argv = [sys.executable, "-m", "launch", "local", f"--processes={processes}",
          f"--devices-per-process={devices}", "--grace-period=3", "--",
          *_trainer_args(workdir, extra=extra)]
  return subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _ranks(launcher_pid) -> dict[int, int]:
  """rank -> pid of the trainer processes a launcher started."""
  out = {}
  for task in os.listdir(f"/proc/{launcher_pid}/task"):
    with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
      for pid in map(int, f.read().split()):
        with open(f"/proc/{pid}/environ", "rb") as env:
          variables = dict(v.split(b"=", 1) for v in env.read().split(b"\0") if b"=" in v)
        out[int(variables[b"JAX_PROCESS_ID"])] = pid
  return out


def _committed(workdir) -> list[int]:
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _wait_for_step(proc, workdir, step, timeout=120):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return False
    if any(s >= step for s in _committed(workdir)):
      return True
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint >= {step} within {timeout} s")


def _sha(workdir) -> str:
  return json.loads((workdir / "summary.json").read_text())["params_sha256"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 2-process x 4-device run."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  return workdir


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_two_processes_match_one_process(reference, tmp_path):
  summary = json.loads((reference / "summary.json").read_text())
  assert summary["num_processes"] == 2 and summary["num_devices"] == 8
  single = tmp_path / "single"
  proc = run_trainer(_trainer_args(single))  # one process, 8 devices (conftest)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Bit-identity across topologies is not expected (gloo's cross-process all-reduce
  # adds in another order than XLA's in-process one); the measured difference after
  # 400 steps is ~1e-7, the tolerance 1e-5.
  _, two = checkpoint.load_latest(reference / "checkpoints")
  _, one = checkpoint.load_latest(single / "checkpoints")
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(two["params"]["linear"][name], one["params"]["linear"][name],
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_kill_9_random_process_three_times_then_resume(reference, tmp_path):
  rng = random.Random(20261126)
  workdir = tmp_path / "chaos"
  kills = []
  while len(kills) < 3:
    proc = _launch(workdir)
    last = max(_committed(workdir), default=0)
    assert _wait_for_step(proc, workdir, last + rng.choice([EVERY, 2 * EVERY])), (
        "the run finished before it could be killed")
    time.sleep(rng.uniform(0.0, 0.3))
    rank, pid = rng.choice(sorted(_ranks(proc.pid).items()))
    os.kill(pid, signal.SIGKILL)
    kills.append((rank, max(_committed(workdir))))
    proc.communicate(timeout=120)
    assert proc.returncode != 0
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  print("kills (rank, last committed step):", kills)
  assert _sha(workdir) == _sha(reference)
  starts = json.loads((workdir / "run.json").read_text())["starts"]
  assert len(starts) == 4 and starts[-1]["resumed_from_step"] >= kills[-1][1]
  # A kill -9 of rank 0 leaves its lease behind; the relaunch on this host sees that
  # the pid no longer runs and takes it over at once.
  for (rank, _), start in zip(kills, starts[1:]):
    if rank == 0:
      assert "no longer runs" in start["lease_taken_over"]["taken_over_because"], start


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_sigterm_to_one_process_commits_an_agreed_step_and_exits_42(reference, tmp_path):
  workdir = tmp_path / "preempted"
  proc = _launch(workdir)
  assert _wait_for_step(proc, workdir, EVERY)
  os.kill(_ranks(proc.pid)[1], signal.SIGTERM)
  sent = time.monotonic()
  out, _ = proc.communicate(timeout=120)
  elapsed = time.monotonic() - sent
  assert proc.returncode == 42, out[-3000:]
  assert not (workdir / "lease.json").exists()  # Released by process 0.
  agreed = {int(m) for m in re.findall(r"\[rank \d\] preempted: checkpoint committed at step"
                                       r" (\d+)", out)}
  assert len(agreed) == 1 and len(re.findall("preempted: checkpoint committed", out)) == 2, out
  (step,) = agreed
  assert max(_committed(workdir)) == step
  print(f"SIGTERM -> exit 42 in {elapsed:.2f} s, agreed step {step}")
  run = json.loads((workdir / "run.json").read_text())
  assert run["starts"][-1]["exit"]["code"] == 42
  proc = _launch(workdir)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert json.loads((workdir / "run.json").read_text())["starts"][-1]["resumed_from_step"] == step
  assert _sha(workdir) == _sha(reference)


def _start_pair(workdir, extra=(), env=None):
  """The two trainer processes of a 2-host job, started directly (no launcher)."""
  port = local._free_port()  # pylint: disable=protected-access
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = []
  for rank in range(2):
    proc_env = {**base, **local.process_env(rank, 2, 2, port), **(env or {})}
    procs.append(subprocess.Popen([sys.executable, "-m", "trainer",
                                   *_trainer_args(workdir, steps=100000, extra=extra)],
                                  cwd=ROOT, env=proc_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", [0, 1])
def test_survivor_of_a_dead_peer_exits_within_a_bound(tmp_path, victim):
  procs = _start_pair(tmp_path / "run")
  assert _wait_for_step(procs[0], tmp_path / "run", EVERY)
  procs[victim].kill()
  killed = time.monotonic()
  survivor = procs[1 - victim]
  survivor.communicate(timeout=120)
  elapsed = time.monotonic() - killed
  print(f"rank {victim} killed: rank {1 - victim} exited {survivor.returncode}"
        f" after {elapsed:.1f} s")
  assert survivor.returncode != 0
  assert elapsed < 30  # heartbeat_timeout=10 s here; the default is 45 s
  procs[victim].wait()


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_watchdog_catches_a_stuck_peer(tmp_path):
  procs = _start_pair(tmp_path / "run", extra=["--config.train.watchdog_timeout=8"],
                      env={"JAXJOB_FAULTS": "hang@1:30"})
  started = time.monotonic()
  outputs = [p.communicate(timeout=150)[0] for p in procs]
  elapsed = time.monotonic() - started
  print(f"both exited after {elapsed:.1f} s: {[p.returncode for p in procs]}")
  # SIGABRT (a shell reports 134): a signal death, which launchers restart.
  assert all(p.returncode == -signal.SIGABRT for p in procs), [o[-1500:] for o in outputs]
  # Both ranks last saw a step finish at about the same moment, so either watchdog can
  # fire first; the coordination service then aborts the other rank.
  fired = [o for o in outputs if "watchdog: no training step finished" in o]
  assert fired, [o[-1500:] for o in outputs]
  assert all("Thread" in o for o in fired)  # each firing watchdog dumps every stack
  stuck = outputs[1]
  if stuck in fired:
    # Rank 1 sleeps before dispatching step index 30; with metrics read one step late,
    # the last step it saw finish is 29, and its stack dump shows where it sleeps.
    assert "last finished step 29" in stuck and "maybe_hang" in stuck


def _nan_config(**overrides):
  return tiny_config("breast_cancer.py", train__steps=30, train__checkpoint_every=5,
                     train__eval_every=30, **overrides)


def _all_committed_finite(workdir):
  for step in _committed(workdir):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    with ocp.CheckpointManager(workdir / "checkpoints") as manager:
      state = manager.restore(step, args=ocp.args.StandardRestore())
    import jax  # pylint: disable=g-import-not-at-top
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state)), step


def test_nan_with_stop_policy_exits_3_and_keeps_only_finite_checkpoints(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXJOB_FAULTS", "nan@12")
  with pytest.raises(Diverged, match="at step 13"):
    train.train_and_evaluate(_nan_config(), str(tmp_path / "run"))
  assert _committed(tmp_path / "run") == [5, 10]
  _all_committed_finite(tmp_path / "run")
  run = json.loads((tmp_path / "run" / "run.json").read_text())
  assert run["starts"][-1]["exit"]["code"] == 3


def test_nan_with_skip_policy_skips_the_update(tmp_path, monkeypatch):
  clean = train.train_and_evaluate(_nan_config(), str(tmp_path / "clean"))
  monkeypatch.setenv("JAXJOB_FAULTS", "nan@12")
  skipped = train.train_and_evaluate(_nan_config(train__nonfinite_policy="skip"),
                                     str(tmp_path / "skip"))
  assert skipped["skipped_steps"] == 1 and skipped["final_step"] == 30
  assert skipped["params_sha256"] != clean["params_sha256"]
  _all_committed_finite(tmp_path / "skip")
  monkeypatch.setenv("JAXJOB_FAULTS", "nan@10,nan@11,nan@12,nan@13")
  with pytest.raises(Diverged, match="3 consecutive non-finite steps, the last at step 13"):
    train.train_and_evaluate(_nan_config(train__nonfinite_policy="skip",
                                         train__max_consecutive_skips=3),
                             str(tmp_path / "many"))


def test_nan_exit_code_is_3_from_the_command_line(tmp_path):
  proc = run_trainer(["--config=trainer/configs/breast_cancer.py", "--config.train.steps=20",
                      f"--workdir={tmp_path / 'run'}"], env={"JAXJOB_FAULTS": "nan@3"})
  assert proc.returncode == 3, proc.stderr[-2000:]
  assert "diverged: non-finite loss or gradient at step 4" in proc.stderr


def test_corrupted_latest_checkpoint_is_skipped(tmp_path):
  config = lambda: tiny_config("breast_cancer.py", train__steps=40, train__checkpoint_every=20,
                               train__eval_every=40)
  reference = train.train_and_evaluate(config(), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  train.train_and_evaluate(config(), str(workdir))
  for f in (workdir / "checkpoints" / "40").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and f.name != "_CHECKPOINT_METADATA":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated
  resumed = train.train_and_evaluate(config(), str(workdir))
  assert resumed["resumed_from_step"] == 20
  assert resumed["params_sha256"] == reference["params_sha256"]
  assert _committed(workdir) == [20, 40]
  # The unreadable step was moved aside whole, not deleted, and recorded.
  (moved,) = (workdir / "checkpoints" / "quarantine").glob("40-*")
  assert (moved / "commit_success.txt").exists() and (moved / "default" / "_METADATA").exists()
  (event,) = json.loads((workdir / "run.json").read_text())["starts"][-1]["checkpoint_events"]
  assert event["event"] == "quarantined" and event["step"] == 40
  # The reason is the JSON decoder's, which names where the truncated metadata broke off.
  assert event["moved_to"] == str(moved) and re.search(r"line \d+ column \d+", event["reason"])


def _single_process(workdir, env=None):
  return subprocess.Popen([sys.executable, "-m", "trainer",
                           *_trainer_args(workdir, steps=120)], cwd=ROOT,
                          env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_single_process_before_first_step_and_during_eval(tmp_path):
  reference = tmp_path / "reference"
  proc = _single_process(reference)
  assert proc.wait(timeout=120) == 0
  # 1. Before the first step (while Python is still importing JAX).
  early = tmp_path / "early"
  proc = _single_process(early)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 42, err[-2000:]
  assert _committed(early) == [1]
  assert not (early / "lease.json").exists()  # Released: the relaunch starts at once.
  # 2. During an evaluation (made slow), then resume to the end.
  during = tmp_path / "during"
  proc = subprocess.Popen(
      [sys.executable, "-m", "trainer", *_trainer_args(during, steps=120),
       "--config.train.eval_every=40"], cwd=ROOT,
      env=dict(os.environ, JAXJOB_FAULTS="slow_eval@5"), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if line.startswith("step 40/"):
      break
  time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 42, err[-2000:]
  # Answered at the end of the first dispatch after the eval at step 40: the next
  # checkpoint boundary (60) at the latest.
  step = max(_committed(during))
  assert 40 < step <= 60 and f"preempted: checkpoint committed at step {step}" in err
  for workdir in (early, during):
    proc = _single_process(workdir)
    assert proc.wait(timeout=120) == 0
    assert _sha(workdir) == _sha(reference)


def test_a_failing_close_does_not_hide_why_the_run_ended(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXJOB_FAULTS", "nan@12")

  close = checkpoint.Checkpointer.close

  def failing_close(self):
    close(self)
    raise OSError("the disk went away while closing")

  monkeypatch.setattr(checkpoint.Checkpointer, "close", failing_close)
  with pytest.raises(Diverged):  # not the OSError of the close after it
    train.train_and_evaluate(tiny_config("breast_cancer.py", train__steps=40),
                             str(tmp_path / "run"))
  (start,) = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
  assert start["exit"]["code"] == 3


def test_a_failure_after_the_last_step_is_recorded(tmp_path, monkeypatch):
  def failing_finish(*args):
    raise RuntimeError("the report could not be written")

  monkeypatch.setattr(train, "_final_report", failing_finish)
  with pytest.raises(RuntimeError):
    train.train_and_evaluate(tiny_config("breast_cancer.py", train__steps=20),
                             str(tmp_path / "run"))
  (start,) = json.loads((tmp_path / "run" / "run.json").read_text())["starts"]
  assert start["exit"]["code"] == 1 and "report could not be written" in start["exit"]["reason"]
