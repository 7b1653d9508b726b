"""Paths that may be local or `gs://`, and small-file writes a reader never sees half-done.

Everything the trainer writes or reads under a workdir or a data URL goes through this
module (over `etils.epath`, which uses gcsfs for `gs://`). A local file is written to a
temporary sibling and renamed into place; a GCS object upload is atomic by itself.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

from etils import epath

from trainer.errors import UserError


def path(p: str | os.PathLike) -> epath.Path:
  return epath.Path(p)


def is_remote(p: str | os.PathLike) -> bool:
  return str(p).startswith("gs://")


def absolute(p: str | os.PathLike) -> str:
  """`p` as an absolute path (Orbax requires one); URLs are returned unchanged."""
  return str(p) if is_remote(p) else os.path.abspath(p)


def check_writable(workdir: str) -> None:
  """Writes and deletes a probe object under `workdir`, before any real artefact.

  Raises:
    UserError: naming the workdir when it cannot be written.
  """
  probe = path(workdir) / f".jaxjob-write-probe-{uuid.uuid4().hex[:8]}"
  try:
    write_bytes(probe, b"ok")
    probe.unlink()
  except OSError as e:
    raise UserError(f"--workdir={workdir}: not writable ({e.strerror or e})") from None


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `p` atomically, creating parent directories."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text(p: str | os.PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def write_json(p: str | os.PathLike, obj: Any) -> None:
  write_text(p, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(p: str | os.PathLike) -> Any:
  return json.loads(path(p).read_text())


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):  # numpy scalars and arrays
    return obj.tolist()
  if isinstance(obj, tuple):
    return list(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
