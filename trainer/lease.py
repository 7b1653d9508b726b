"""One writer per workdir: a lease object, `<workdir>/lease.json`, local or `gs://`.

A run (process 0 of a multi-process job) creates the lease before it writes anything
and renews it every `RENEW_EVERY_S` seconds from a background thread, so the training
loop never waits for it. It holds the owner id, host, pid, start time and the time of
the last renewal. A second launch on the same workdir while the lease is fresh exits
2 with one line naming the owner, its host and the lease's age, having written nothing.
A lease not renewed for `STALE_AFTER_S` (five renewal periods), or whose owner is a
process of this host that no longer runs, is taken over with a warning, and the
takeover is recorded in `run.json`. Every exit that Python sees (done, exit 42 on
preemption, errors) deletes the lease, so a relaunch starts at once.

Every change is a compare-and-swap, so two launches racing for one lease cannot both
win: on GCS with object generation preconditions (`ifGenerationMatch=0` to create,
`=<generation>` to renew, take over or delete) through google-cloud-storage, whose
small uploads are multipart (fake-gcs-server honours preconditions there); locally
with the old bytes compared under an `flock` of the workdir, then an atomic rename.
Ages compare the writer's clock with the reader's: hosts are assumed to agree within a
few seconds (NTP), far below the 150 s bound. Host names are assumed unique among the
machines that share a workdir (true of Kubernetes pods and TPU VMs).

`JAXJOB_LEASE_WAIT_S` (default 0): how long a launch that finds a fresh lease of
another run waits for it to be released or to go stale before exiting 2; a
replacement Kubernetes pod sets it above `STALE_AFTER_S` (see docs/gke.md).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np

from trainer import storage
from trainer.errors import UserError

log = logging.getLogger(__name__)

NAME = "lease.json"
RENEW_EVERY_S = 30.0
STALE_AFTER_S = 5 * RENEW_EVERY_S


class Conflict(Exception):
  """The lease changed between our read and our write (someone else wrote it)."""


class Lease:
  """This run's hold on its workdir; `acquire` then, at the end, `release`."""

  def __init__(self):
    self.takeover: dict | None = None  # the lease taken over, for run.json
    self._store = None
    self._record: dict | None = None
    self._token = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self, workdir: str) -> None:
    """Takes the workdir's lease (process 0) or exits every process with UserError.

    Raises:
      UserError: the lease is held by a live run (exit 2); nothing was written.
    """
    refused = None
    if jax.process_index() == 0:
      try:
        self._take(workdir)
      except UserError as e:
        refused = e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      held = multihost_utils.broadcast_one_to_all(np.int32(refused is not None))
      if int(held) and refused is None:
        refused = UserError(f"--workdir={workdir}: another run holds its lease (see the"
                            " error of process 0)")
    if refused is not None:
      raise refused
    if self._store is not None:
      self._thread = threading.Thread(target=self._renew_loop, name="jaxjob-lease",
                                      daemon=True)
      self._thread.start()

  def _take(self, workdir: str) -> None:
    store = _GcsStore(workdir) if storage.is_remote(workdir) else _LocalStore(workdir)
    deadline = time.monotonic() + _wait_seconds()
    while True:
      current, token = store.read()
      why = _why_free(current)
      if why is None and time.monotonic() < deadline:
        time.sleep(min(RENEW_EVERY_S / 3, max(deadline - time.monotonic(), 0.1)))
        continue
      if why is None:
        raise UserError(f"--workdir={workdir} is in use: its lease is held by {_who(current)},"
                        f" renewed {_age(current):.0f} s ago (stale after"
                        f" {STALE_AFTER_S:.0f} s); wait for that run to end, or use another"
                        " --workdir")
      record = _new_record()
      try:
        self._token = store.write(record, token)
      except Conflict:
        continue  # Another launch wrote it first: look again.
      self._store, self._record = store, record
      if current is not None:
        self.takeover = {**current, "taken_over_because": why}
        log.warning("%s: took over the lease of %s (%s)", workdir, _who(current), why)
      return

  def _renew_loop(self) -> None:
    while not self._stop.wait(RENEW_EVERY_S):
      record = {**self._record, "renewed": time.time()}
      try:
        self._token = self._store.write(record, self._token)
        self._record = record
      except Conflict:
        current, _ = self._store.read()
        print(f"error: the lease of {self._store.where} was taken over by"
              f" {_who(current)}; stopping at once so that only one run writes there",
              file=sys.stderr, flush=True)
        os._exit(1)  # pylint: disable=protected-access  (never write another's workdir)
      except Exception as e:  # pylint: disable=broad-except
        log.warning("could not renew the lease of %s (will retry): %s", self._store.where,
                    storage.one_line(e))

  def release(self) -> None:
    """Stops renewing and deletes the lease if it is still ours; never raises."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._store is None:
      return
    store, self._store = self._store, None
    try:
      store.delete(self._token)
    except Exception as e:  # pylint: disable=broad-except
      # Info, not a warning: the storage failure that ended the run was reported already.
      log.info("could not release the lease of %s (it goes stale in %.0f s): %s",
               store.where, STALE_AFTER_S, storage.one_line(e))


def _new_record() -> dict:
  now = time.time()
  return {"owner": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(),
          "pid_start": _process_start(os.getpid()), "started": now, "renewed": now,
          "started_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
          .isoformat(timespec="seconds")}


def _why_free(current: dict | None) -> str | None:
  """Why the lease may be taken (None: it may not)."""
  if current is None:
    return "no lease"
  if not isinstance(current.get("renewed"), (int, float)):
    return "unreadable lease"
  if _age(current) > STALE_AFTER_S:
    return f"not renewed for {_age(current):.0f} s"
  if current.get("host") == socket.gethostname():
    pid = current.get("pid")
    if pid == os.getpid() or _process_start(pid) != current.get("pid_start"):
      return f"its process {pid} on this host no longer runs"
  return None


def _wait_seconds() -> float:
  """`JAXJOB_LEASE_WAIT_S`: seconds to wait for a fresh lease to be released or go stale."""
  value = os.environ.get("JAXJOB_LEASE_WAIT_S", "") or "0"
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1.0
  if not 0 <= seconds < float("inf"):
    raise UserError(f"JAXJOB_LEASE_WAIT_S={value!r}: expected a number of seconds >= 0")
  return seconds


def _process_start(pid) -> int | None:
  """When process `pid` started (clock ticks since boot), None if it does not run."""
  try:
    with open(f"/proc/{int(pid)}/stat", "rb") as f:
      return int(f.read().rsplit(b")", 1)[1].split()[19])
  except (OSError, ValueError, TypeError, IndexError):
    return None


def _age(record: dict) -> float:
  return max(time.time() - float(record.get("renewed", 0)), 0.0)


def _who(record: dict | None) -> str:
  if not record:
    return "nobody"
  return (f"run {record.get('owner')} (host {record.get('host')}, pid {record.get('pid')},"
          f" started {record.get('started_utc')})")


def _decode(data: bytes | None) -> dict | None:
  if data is None:
    return None
  try:
    return json.loads(data.decode("utf-8"))
  except ValueError:
    return {}  # Unreadable (a crash mid-write cannot cause it; a person might): stale.


def _encode(record: dict) -> bytes:
  return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode("utf-8")


class _LocalStore:
  """lease.json on a local (or NFS) file system; the token is the bytes last read."""

  def __init__(self, workdir: str):
    self.where = os.path.join(workdir, NAME)
    self._workdir = workdir

  @contextlib.contextmanager
  def _locked(self):
    """An exclusive `flock` on the workdir itself: no lock file is left behind."""
    import fcntl  # pylint: disable=g-import-not-at-top
    fd = os.open(self._workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)

  def _bytes(self) -> bytes | None:
    try:
      with open(self.where, "rb") as f:
        return f.read()
    except FileNotFoundError:
      return None

  def read(self):
    data = self._bytes()
    return _decode(data), data

  def write(self, record: dict, token) -> bytes:
    data = _encode(record)
    with self._locked():
      if self._bytes() != token:
        raise Conflict()
      storage.write_bytes(self.where, data)  # temporary sibling, then rename
    return data

  def delete(self, token) -> None:
    with self._locked():
      if self._bytes() == token:
        os.unlink(self.where)


class _GcsStore:
  """lease.json on GCS; the token is the object's generation (0: no object)."""

  def __init__(self, workdir: str):
    from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    storage.configure()
    bucket, _, prefix = workdir[len("gs://"):].partition("/")
    self.where = f"{workdir.rstrip('/')}/{NAME}"
    self._blob_name = f"{prefix.rstrip('/')}/{NAME}" if prefix else NAME
    self._bucket = gcs.Client().bucket(bucket)

  def read(self):
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.get_blob(self._blob_name)
    if blob is None:
      return None, 0
    try:
      data = blob.download_as_bytes(if_generation_match=blob.generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      return self.read()  # Changed between the two requests.
    return _decode(data), blob.generation

  def write(self, record: dict, token) -> int:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    blob = self._bucket.blob(self._blob_name)
    data = _encode(record)
    try:
      # Small data: one multipart upload, retried by the client on transient errors.
      blob.upload_from_string(data, content_type="application/json",
                              if_generation_match=token)
    except exceptions.PreconditionFailed:
      # A retry of an upload whose answer was lost also lands here: it is ours then.
      current, generation = self.read()
      if current != json.loads(data):
        raise Conflict() from None
      return generation
    return blob.generation

  def delete(self, token) -> None:
    from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
    try:
      self._bucket.blob(self._blob_name).delete(if_generation_match=token)
    except (exceptions.NotFound, exceptions.PreconditionFailed):
      pass  # Gone or no longer ours: nothing of ours to delete.
