"""Paths that may be local or `gs://`, and small-file writes a reader never sees half-done.

Everything the trainer writes or reads under a workdir or a data URL goes through this
module (over `etils.epath`, which uses gcsfs for `gs://`; Orbax writes checkpoint arrays
through tensorstore). A local file is written to a temporary sibling and renamed into
place; a small GCS object is written with one single-request upload, which GCS makes
visible all at once. Transient GCS errors (408, 429, 5xx, connection resets) are retried
with backoff, by gcsfs and tensorstore themselves and, for the small files, once more
here up to a deadline; permanent ones (401, 403, a missing bucket) become one `UserError`
line that names the URL and the permission or role that is missing. Credentials are
Application Default Credentials, found by the client libraries; this module never reads
them. `STORAGE_EMULATOR_HOST` points every client at an emulator (see `configure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import time
import uuid
from typing import Any, Callable, TypeVar

from etils import epath

from trainer.errors import UserError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Transient errors keep being retried until this long after the first attempt; gcsfs
# alone gives up after 6 attempts (about 30 s of backoff).
RETRY_DEADLINE_S = 120.0
_TRANSIENT_HTTP = {"408", "429", "500", "502", "503", "504"}
# Tensorstore (Orbax's array I/O) raises ValueError("<absl status code>: ...").
_TRANSIENT_STATUS = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:")
_STORAGE_STATUS = _TRANSIENT_STATUS + ("RESOURCE_EXHAUSTED:", "PERMISSION_DENIED:",
                                       "UNAUTHENTICATED:", "NOT_FOUND:", "INTERNAL:",
                                       "UNKNOWN:")
WORKDIR_ROLE = "roles/storage.objectUser"
DATA_ROLE = "roles/storage.objectViewer"


def configure() -> None:
  """Sets up the GCS clients from the environment; idempotent, called by `path`.

  With `STORAGE_EMULATOR_HOST` (the variable google-cloud-storage and gcsfs read) set,
  also points tensorstore (Orbax's checkpoint I/O) at it through
  `TENSORSTORE_GCS_HTTP_URL`, turns off gcsfs's zonal/HNS bucket probe (a gRPC Storage
  Control call that emulators do not serve; it stalls 60 s) with
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`, and makes gcsfs anonymous, as
  google-cloud-storage is against an emulator. Variables already set are left alone.
  Always: gcsfs keeps no directory-listing cache, because other processes and
  tensorstore write the same prefixes.
  """
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if emulator:
    url = emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec.config  # pylint: disable=g-import-not-at-top
  gcs = fsspec.config.conf.setdefault("gcs", {})
  gcs.setdefault("use_listings_cache", False)
  if emulator:
    gcs.setdefault("token", "anon")


def path(p: str | os.PathLike) -> epath.Path:
  _check_scheme(p)
  if is_remote(p):
    configure()
  return epath.Path(p)


# GCS bucket names (cloud.google.com/storage/docs/buckets#naming), checked offline: a
# malformed one made gcsfs retry for minutes.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")


def _check_scheme(p: str | os.PathLike) -> None:
  """Refuses a URL of another scheme (http://, s3://): it would be read as a local path."""
  scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", str(p))
  if scheme and scheme.group(1) != "gs":
    raise UserError(f"{p}: {scheme.group(1)}:// is not supported; expected a local path or a"
                    " gs:// URL")
  if scheme and not _BUCKET.fullmatch(str(p)[len("gs://"):].split("/", 1)[0]):
    raise UserError(f"{p}: no valid bucket name after gs://; expected gs://BUCKET/PATH, a"
                    " bucket of 3 to 222 lowercase letters, digits, '-', '_' and '.'")


def is_remote(p: str | os.PathLike) -> bool:
  return str(p).startswith("gs://")


def absolute(p: str | os.PathLike) -> str:
  """`p` as an absolute path (Orbax requires one); URLs are returned unchanged."""
  _check_scheme(p)
  return str(p) if is_remote(p) else os.path.abspath(p)


def check_writable(workdir: str) -> None:
  """Writes and deletes a probe object under `workdir`, before any real artefact.

  On `gs://` it also reads the probe back and lists the workdir: Orbax needs create,
  get, list and delete (keep-N), which `roles/storage.objectUser` on the bucket grants.

  Raises:
    UserError: naming the workdir (and on GCS the missing permission) when it cannot
      be written.
  """
  probe = path(workdir) / f".jaxjob-write-probe-{uuid.uuid4().hex[:8]}"
  if is_remote(workdir):
    _check_gcs_access(workdir, probe)
    return
  try:
    write_bytes(probe, b"ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir={workdir}: not writable ({e.strerror or e})") from None
  # Checkpoints go into a folder, if one is there already (run.json: `read_json_object`).
  checkpoints = os.path.join(os.fspath(path(workdir)), "checkpoints")
  if os.path.lexists(checkpoints) and not os.path.isdir(checkpoints):
    raise UserError(f"--workdir={workdir}: checkpoints there is not a folder; expected a"
                    " workdir a run wrote, or a new one")


def _check_gcs_access(workdir: str, probe: epath.Path) -> None:
  fs = _gcs(probe)
  steps = [("storage.objects.create", lambda: write_bytes(probe, b"ok")),
           ("storage.objects.get", lambda: retry(fs.cat_file, str(probe))),
           ("storage.objects.list", lambda: retry(fs.ls, workdir, detail=False)),
           ("storage.objects.delete", lambda: retry(_unlink, probe))]
  for permission, step in steps:
    try:
      step()
    except Exception as e:  # pylint: disable=broad-except
      error = gcs_user_error(e, f"--workdir={workdir}", permission, WORKDIR_ROLE)
      if error is None:
        raise
      raise error from None


def _unlink(p: epath.Path) -> None:
  # A delete whose answer was lost is retried and finds nothing: that is success.
  p.unlink(missing_ok=True)


def gcs_user_error(e: Exception, what: str, permission: str, role: str) -> UserError | None:
  """One line for a permanent GCS error (missing bucket, 401, 403); None for others.

  Args:
    e: what the client raised.
    what: how the user named the location, e.g. `--workdir=gs://b/runs/x`.
    permission: the IAM permission the failed operation needs.
    role: the predefined role on the bucket that grants everything the run needs.
  """
  bucket = _bucket(what)
  text = " ".join(str(e).split())
  if isinstance(e, FileNotFoundError):
    return UserError(f"{what}: bucket gs://{bucket} does not exist or is not visible"
                     " (HTTP 404); create it or fix the URL")
  code = getattr(e, "code", None)
  if code == 401 or "Anonymous caller" in text or "Invalid Credentials" in text:
    return UserError(f"{what}: not authenticated (HTTP 401); the job found no Application"
                     " Default Credentials (Workload Identity, the VM's service account,"
                     " or `gcloud auth application-default login`)")
  if isinstance(e, PermissionError) or code == 403 or text.startswith("Forbidden"):
    named = re.search(r"Permission '([\w.]+)' denied", text)
    return UserError(f"{what}: permission denied (HTTP 403): the job's identity lacks"
                     f" {named.group(1) if named else permission} on gs://{bucket};"
                     f" grant it {role} on the bucket")
  if isinstance(e, ValueError) and text.startswith("Bad Request"):
    return UserError(f"{what}: rejected by GCS (HTTP 400): {text.split(' ', 3)[-1]}")
  return None


def _bucket(what: str) -> str:
  match = re.search(r"gs://([^/\s]+)", what)
  return match.group(1) if match else "?"


def is_transient(e: BaseException) -> bool:
  """Whether GCS may well succeed if `e`'s request is simply tried again."""
  if isinstance(e, (ConnectionError, TimeoutError, asyncio.TimeoutError)):
    return True
  if str(getattr(e, "code", None)) in _TRANSIENT_HTTP:  # gcsfs.retry.HttpError
    return True
  if isinstance(e, ValueError) and str(e).startswith(_TRANSIENT_STATUS):  # tensorstore
    return True
  try:
    import aiohttp  # pylint: disable=g-import-not-at-top
    import requests  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return isinstance(e, (aiohttp.ClientError, requests.ConnectionError, requests.Timeout))


def retry(fn: Callable[..., _T], *args, deadline_s: float | None = None,
          **kwargs) -> _T:
  """`fn(*args, **kwargs)`, retried with exponential backoff while errors are transient."""
  deadline = time.monotonic() + (RETRY_DEADLINE_S if deadline_s is None else deadline_s)
  delay = 1.0
  while True:
    try:
      return fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not is_transient(e) or time.monotonic() + delay > deadline:
        raise
      log.warning("transient storage error, retrying in %.0f s: %s", delay,
                  " ".join(str(e).split())[:200] or type(e).__name__)
      time.sleep(delay)
      delay = min(2 * delay, 30.0)


def is_storage_error(e: BaseException) -> bool:
  """Whether `e` is a failure of the storage itself (disk full, permission, bucket, I/O)."""
  if isinstance(e, OSError) or is_transient(e):
    return True
  if isinstance(e, ValueError) and str(e).startswith(_STORAGE_STATUS):
    return True
  return getattr(e, "code", None) is not None and type(e).__module__.startswith(
      ("gcsfs", "google"))


def one_line(e: BaseException) -> str:
  """`e` on one line, short: what the user reads on stderr (run.json keeps it whole).

  Tensorstore appends its whole spec or the HTTP body to a message; that is left out.
  """
  text = " ".join(str(e).split()) or type(e).__name__
  for extra in (" [tensorstore_spec=", " [http_response_body="):
    text = text.split(extra)[0]
  return text if len(text) <= 400 else text[:397] + "..."


def reason(e: BaseException) -> str:
  """What went wrong in a few words: the OS error when there is one, else `one_line`."""
  if isinstance(e, OSError) and e.errno in errno.errorcode:
    where = f": {e.filename}" if e.filename else ""
    return f"{os.strerror(e.errno)} ({errno.errorcode[e.errno]}){where}"
  text = " ".join(str(e).split())
  code = re.search(r"\[os_error_code='(\d+)'\]", text)
  if code and int(code.group(1)) in errno.errorcode:
    number = int(code.group(1))
    return f"{os.strerror(number)} ({errno.errorcode[number]})"
  return one_line(e)


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves the directory `source` to `target`; never deletes before the copy is whole.

  Locally one atomic rename (same file system). On GCS, where a move is a copy and a
  delete, every object is copied first; then the source's `commit_success.txt` goes
  first, so a move cut short leaves an uncommitted source (which Orbax never lists)
  beside a complete copy.
  """
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    return
  fs = _gcs(source)
  # gcsfs names objects without the gs:// scheme.
  src, dst = (os.fspath(p).removeprefix("gs://").rstrip("/") for p in (source, target))
  names = sorted(retry(fs.find, src))
  for name in names:
    retry(fs.copy, name, dst + name[len(src):])
  copied = set(retry(fs.find, dst))
  lost = [n for n in names if dst + n[len(src):] not in copied]
  if lost:
    raise OSError(f"copy of {src} to {dst} is missing {lost[:3]}; the source was kept")
  names.sort(key=lambda n: not n.endswith("/commit_success.txt"))
  for name in names:
    retry(_unlink, epath.Path(f"gs://{name}"))


def _gcs(p: str | os.PathLike):
  """The gcsfs filesystem `epath` itself uses for `p` (one instance, one session)."""
  from etils.epath import backend  # pylint: disable=g-import-not-at-top
  return backend.fsspec_backend.fs(os.fspath(p))


def read_bytes(p: str | os.PathLike) -> bytes:
  """The bytes of `p`; on GCS one request, retried while errors are transient."""
  source = path(p)
  if is_remote(source):
    return retry(_gcs(source).cat_file, os.fspath(source))
  return source.read_bytes()


def read_input(url: str) -> bytes:
  """Reads an input file (e.g. a CSV) named by the user.

  Raises:
    UserError: one line when it is missing or, on GCS, not readable with the job's
      credentials (naming `roles/storage.objectViewer`).
  """
  try:
    return read_bytes(url)
  except FileNotFoundError:
    raise UserError(f"{url}: file not found") from None
  except IsADirectoryError:
    raise UserError(f"{url}: is a directory, expected a file") from None
  except Exception as e:  # pylint: disable=broad-except
    error = is_remote(url) and gcs_user_error(e, url, "storage.objects.get", DATA_ROLE)
    if not error:
      raise
    raise error from None


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `p` atomically, creating parent directories (locally)."""
  target = path(p)
  if is_remote(target):
    # One simple (non-resumable) upload: all or nothing, and safe to repeat when a
    # reset connection hides whether it arrived. GCS has no directories to create.
    retry(_gcs(target).pipe_file, os.fspath(target), data)
    return
  if os.path.lexists(target) and not os.path.isfile(target):
    # os.replace would put a file in place of a device such as /dev/null (as root).
    raise OSError(errno.EEXIST, "it exists and is not a regular file", os.fspath(target))
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      tmp.unlink()
    raise


def write_text(p: str | os.PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: str | os.PathLike, obj: Any) -> None:
  write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(read_bytes(p).decode("utf-8"))


def read_json_object(p: str | os.PathLike, expected: str) -> dict:
  """The JSON object in file `p`, which a run wrote (run.json, data_stats.json).

  Raises:
    UserError: the file is not UTF-8 JSON, or holds no object; `expected` says what it
      should hold. The file is left as it is.
  """
  if not is_remote(p) and not os.path.isfile(p):
    raise UserError(f"{p} is not a file; expected {expected}")
  try:
    obj = read_json(p)
  except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
    what = f"not valid JSON ({e})"
  else:
    if isinstance(obj, dict):
      return obj
    what = f"a JSON {type(obj).__name__}"
  raise UserError(f"{p} is {what}; expected {expected}")


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):  # numpy scalars and arrays
    return obj.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
