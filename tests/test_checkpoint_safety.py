"""Never lose a committed checkpoint, and one writer per workdir.

A restore that fails never deletes a step: a changed state exits 2 (or, for a change
known to be safe, restores what matches); a corrupt step is quarantined (see
test_fault_tolerance.py); transient errors are retried (test_gcs.py). A workdir has one
writer at a time (trainer/lease.py). A full disk ends with one line on stderr.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from tests.conftest import ROOT, run_trainer, tiny_config
from trainer import checkpoint
from trainer import lease
from trainer import models
from trainer import runinfo
from trainer import train
from trainer.errors import StorageError, UserError

BREAST = "--config=trainer/configs/breast_cancer.py"


def _committed(workdir) -> list[int]:
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def _snapshot(workdir) -> dict:
  """Every file under `workdir` with its size and modification time."""
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(workdir.rglob("*"))}


@pytest.fixture(scope="module")
def run_200(tmp_path_factory):
  """breast_cancer.py to step 200, checkpoints every 50 (the issue's reproduction)."""
  workdir = tmp_path_factory.mktemp("run200") / "run"
  config = tiny_config("breast_cancer.py", train__steps=200, train__checkpoint_every=50,
                       train__eval_every=200)
  train.train_and_evaluate(config, str(workdir))
  assert _committed(workdir) == [150, 200]
  return workdir


def _copy(workdir, tmp_path):
  subprocess.run(["cp", "-a", str(workdir), str(tmp_path / "run")], check=True)
  return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ema_switched_on_restores_the_newest_step_and_starts_the_average_there(run_200,
                                                                              tmp_path):
  workdir = _copy(run_200, tmp_path)
  # What the trainer restores into: the state the new config builds (EMA on).
  config = tiny_config("breast_cancer.py", train__ema_decay=0.99)
  tx, _ = train.make_optimizer(config)
  fresh = train.create_train_state(jax.random.PRNGKey(0), model=models.create(config.model, 1),
                                   tx=tx, example_x=np.zeros((1, 30), np.float32), ema=True)
  ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_every=50, keep=2)
  state, step = ckpt.restore_latest(checkpoint.abstract(fresh))
  ckpt.close()
  assert step == 200 and int(state.step) == 200
  _, saved = checkpoint.load_latest(workdir / "checkpoints")
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(state.params["linear"][name], saved["params"]["linear"][name])
    np.testing.assert_array_equal(state.ema_params["linear"][name],
                                  saved["params"]["linear"][name])
  assert ckpt.events == [{"step": 200, "event": "restored_without", "field": "ema_params",
                          "started_from": "params"}]
  assert _committed(workdir) == [150, 200]

  # The command line: resumes from 200 (before: both steps deleted, from 0).
  proc = run_trainer([BREAST, "--config.train.steps=300", "--config.train.checkpoint_every=50",
                      "--config.train.ema_decay=0.99", "--allow_config_change",
                      f"--workdir={workdir}"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 200 holds no ema_params" in proc.stderr
  start = json.loads((workdir / "run.json").read_text())["starts"][-1]
  assert start["resumed_from_step"] == 200
  assert start["checkpoint_events"][0]["event"] == "restored_without"
  assert json.loads((workdir / "summary.json").read_text())["resumed_from_step"] == 200
  assert not (workdir / "checkpoints" / checkpoint.QUARANTINE).exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_changed_optimizer_exits_2_before_training_and_keeps_every_step(run_200, tmp_path):
  workdir = _copy(run_200, tmp_path)
  before = _snapshot(workdir)
  proc = run_trainer([BREAST, "--config.train.steps=300", "--config.train.checkpoint_every=50",
                      "--config.optimizer.name=sgd", "--config.optimizer.momentum=0.9",
                      "--allow_config_change", f"--workdir={workdir}"])
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith(f"error: checkpoint step 200 in {workdir}/checkpoints holds"
                             " another state than this config trains (missing from the"
                             " checkpoint: opt_state.0.trace.linear.bias,")
  assert "only in the checkpoint: opt_state.0.count" in lines[0]
  assert "use a new --workdir" in lines[0]
  assert _snapshot(workdir) == before  # No step deleted, run.json untouched, no lease.


@pytest.mark.parametrize("record", ["{not json", None])  # None: the run's, another config
def test_a_workdir_it_cannot_resume_is_refused_before_anything_is_built(run_200, tmp_path,
                                                                        monkeypatch, record):
  workdir = _copy(run_200, tmp_path)
  if record is not None:
    (workdir / "run.json").write_text(record)
  before = _snapshot(workdir)

  def build(*args, **kwargs):
    raise AssertionError("built: data loaded and compilation started before the refusal")

  monkeypatch.setattr(train, "build", build)
  with pytest.raises(UserError, match="run.json is not valid JSON|a different config"):
    train.train_and_evaluate(tiny_config("breast_cancer.py", train__steps=300, seed=1),
                             str(workdir))
  assert _snapshot(workdir) == before


def test_a_changed_shape_is_named_with_both_shapes(run_200):
  config = tiny_config("breast_cancer.py")
  tx, _ = train.make_optimizer(config)
  wider = train.create_train_state(jax.random.PRNGKey(0), model=models.create(config.model, 3),
                                   tx=tx, example_x=np.zeros((1, 30), np.float32))
  ckpt = checkpoint.Checkpointer(run_200 / "checkpoints", save_every=50, keep=2)
  with pytest.raises(UserError, match=r"shape or dtype differs: opt_state\.0\.mu\.linear\.bias"
                     r" float32\[1\] saved, float32\[3\] now"):
    ckpt.restore_latest(checkpoint.abstract(wider))
  ckpt.close()
  assert _committed(run_200) == [150, 200]


def _trainer(workdir, steps, *extra):
  return subprocess.Popen([sys.executable, "-m", "trainer", BREAST, f"--config.train.steps={steps}",
                           "--config.train.checkpoint_every=20", f"--workdir={workdir}",
                           *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_second_launch_on_a_live_workdir_exits_2_and_the_first_goes_on(tmp_path):
  workdir = tmp_path / "run"
  first = _trainer(workdir, 3000)
  deadline = time.monotonic() + 120
  while not (workdir / "checkpoints").exists() or not _committed(workdir):
    assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
    time.sleep(0.1)
  holder = json.loads((workdir / lease.NAME).read_text())
  started = time.monotonic()
  second = run_trainer([BREAST, "--config.train.steps=3000", "--config.train.checkpoint_every=20",
                        f"--workdir={workdir}"])
  refused_in = time.monotonic() - started
  assert second.returncode == 2, second.stderr[-3000:]
  (line,) = second.stderr.strip().splitlines()
  assert line.startswith(f"error: --workdir={workdir} is in use: its lease is held by run"
                         f" {holder['owner']} (host {socket.gethostname()}, pid {first.pid},")
  assert " s ago (stale after 150 s)" in line
  print(f"second launch refused in {refused_in:.1f} s")
  _, err = first.communicate(timeout=240)
  assert first.returncode == 0, err[-3000:]
  starts = json.loads((workdir / "run.json").read_text())["starts"]
  assert len(starts) == 1 and starts[0]["exit"]["code"] == 0  # Not "killed or crashed".
  assert not (workdir / lease.NAME).exists()  # Released at the end.


_HOLD = """
import sys, time
from trainer import lease
held = lease.Lease()
held.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_held_lease_refuses_a_launch_that_then_touches_nothing(run_200, tmp_path):
  workdir = _copy(run_200, tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    before = _snapshot(workdir)
    with pytest.raises(UserError, match=rf"pid {holder.pid}, started .*renewed \d+ s ago"):
      train.train_and_evaluate(tiny_config("breast_cancer.py", train__steps=300,
                                           train__checkpoint_every=50), str(workdir), True)
    assert _snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()


def _write_lease(workdir, **fields):
  record = {"owner": "0123456789ab", "host": "other-host", "pid": 1, "pid_start": 1,
            "started": time.time() - 3600, "renewed": time.time(),
            "started_utc": "2026-01-01T00:00:00+00:00", **fields}
  (workdir / lease.NAME).write_text(json.dumps(record))
  return record


@pytest.mark.parametrize("why, fields", [
    ("not renewed for", {"renewed": time.time() - lease.STALE_AFTER_S - 60}),
    ("on this host no longer runs", {"host": socket.gethostname(), "pid": 2 ** 22 + 7}),
])
def test_a_stale_or_orphaned_lease_is_taken_over_and_recorded(run_200, tmp_path, why, fields):
  workdir = _copy(run_200, tmp_path)
  old = _write_lease(workdir, **fields)
  summary = train.train_and_evaluate(tiny_config("breast_cancer.py", train__steps=210,
                                                 train__checkpoint_every=50), str(workdir),
                                     True)
  assert summary["resumed_from_step"] == 200
  taken = json.loads((workdir / "run.json").read_text())["starts"][-1]["lease_taken_over"]
  assert taken["owner"] == old["owner"] and why in taken["taken_over_because"]
  assert not (workdir / lease.NAME).exists()


def test_the_lease_is_renewed_in_the_background_and_released(tmp_path, monkeypatch):
  monkeypatch.setattr(lease, "RENEW_EVERY_S", 0.1)
  held = lease.Lease()
  held.acquire(str(tmp_path))
  first = json.loads((tmp_path / lease.NAME).read_text())
  assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
  time.sleep(0.6)
  renewed = json.loads((tmp_path / lease.NAME).read_text())
  assert renewed["owner"] == first["owner"] and renewed["renewed"] > first["renewed"]
  # Someone else's lease is never released by us.
  held.release()
  assert not (tmp_path / lease.NAME).exists()
  other = _write_lease(tmp_path)
  held.release()
  assert json.loads((tmp_path / lease.NAME).read_text()) == other


def test_a_run_whose_lease_was_taken_over_stops_at_once(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "from trainer import lease; lease.RENEW_EVERY_S = 0.2\n" + _HOLD,
       str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n"
  # What a run that found this lease stale would have written.
  _write_lease(tmp_path, host="elsewhere")
  _, err = holder.communicate(timeout=60)
  assert holder.returncode == 1
  assert err.strip().splitlines() == [
      f"error: the lease of {tmp_path}/lease.json was taken over by run 0123456789ab (host"
      " elsewhere, pid 1, started 2026-01-01T00:00:00+00:00); stopping at once so that only"
      " one run writes there"]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_full_disk_ends_with_one_line_and_keeps_the_last_step(tmp_path):
  mount = tmp_path / "small"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
  try:
    workdir = mount / "run"
    proc = run_trainer(["--config.train.steps=300", "--config.train.checkpoint_every=100",
                        f"--workdir={workdir}"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    # The save of step 200 fills the disk in the background; whichever write fails first
    # (that save, or a metrics row meanwhile), the one line names the cause and step 100.
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0] in (
        f"error: saving checkpoint step 200 to {workdir}/checkpoints failed: No space left on"
        " device (ENOSPC); last committed step: 100",
        "error: storage failed: No space left on device (ENOSPC); last committed step: 100"
    ), proc.stderr[-3000:]
    assert _committed(workdir) == [100]
    # The failed save's half-written folder is gone (it held the space run.json's exit
    # needs); step 100 is untouched.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["100"]
    end = json.loads((workdir / "run.json").read_text())["starts"][-1]["exit"]
    assert end["code"] == 1 and "Failed to write" in end["reason"]
    assert not (workdir / lease.NAME).exists()
  finally:
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_a_run_json_that_cannot_take_the_exit_leaves_the_runs_error_standing(tmp_path, caplog):
  mount = tmp_path / "small"
  mount.mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
  try:
    record = runinfo.RunRecord(str(mount), tiny_config(), types.SimpleNamespace(name="sharding"),
                               0)
    before = (mount / "run.json").read_text()
    with pytest.raises(OSError), open(mount / "filler", "wb") as filler:
      while True:  # fills the disk
        filler.write(b"x" * 4096)
        filler.flush()
    error = StorageError("saving checkpoint step 2 failed: No space left on device (ENOSPC);"
                         " last committed step: 1")
    with caplog.at_level(logging.DEBUG, logger=train.__name__):
      train._record_failure(record, error)  # must not raise: `error` is what the user sees
    assert [r.levelno for r in caplog.records if "closing also failed" in r.message] == [
        logging.DEBUG]
    assert (mount / "run.json").read_text() == before  # not half-written
    (mount / "filler").unlink()
    train._record_failure(record, error)
    end = json.loads((mount / "run.json").read_text())["starts"][-1]["exit"]
    assert end["code"] == 1 and end["reason"].startswith("StorageError: saving checkpoint step 2")
  finally:
    subprocess.run(["umount", str(mount)], check=True)


def test_a_launch_waits_for_a_lease_to_go_stale_then_takes_it_over(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  # Goes stale 2 s from now: a launch told to wait 30 s takes it over then, not before.
  _write_lease(workdir, renewed=time.time() - lease.STALE_AFTER_S + 2)
  monkeypatch.setenv("JAXJOB_LEASE_WAIT_S", "30")
  writer, start = lease.Lease(), time.monotonic()
  writer.acquire(str(workdir))
  try:
    assert 1.5 < time.monotonic() - start < 25
    assert "not renewed for" in writer.takeover["taken_over_because"]
  finally:
    writer.release()
  # A fresh lease is still refused once the wait is over.
  _write_lease(workdir)
  monkeypatch.setenv("JAXJOB_LEASE_WAIT_S", "1")
  start = time.monotonic()
  with pytest.raises(UserError, match="is in use"):
    lease.Lease().acquire(str(workdir))
  assert time.monotonic() - start >= 1


@pytest.mark.parametrize("value", ["soon", "-5", "inf"])
def test_a_bad_lease_wait_is_one_line(value, tmp_path, monkeypatch):
  monkeypatch.setenv("JAXJOB_LEASE_WAIT_S", value)
  with pytest.raises(UserError, match=r"JAXJOB_LEASE_WAIT_S=.*expected a number of seconds >= 0"):
    lease.Lease().acquire(str(tmp_path))
