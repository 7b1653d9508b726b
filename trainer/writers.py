"""Metric writers: where the rows the loop logs go besides metrics.jsonl.

A writer has `write_scalars(step, scalars)`, `flush()` and `close()`. Process 0's
`Reporter` holds the list `create(config, workdir)` returns:

* `TensorBoardWriter`, always: event files under `<workdir>/tensorboard` (for a gs://
  workdir, written locally and each grown file copied up whole on `flush`).
* `WandbWriter`, opt-in with `--config.report.wandb_project=NAME`: one Weights & Biases
  run per workdir (a resumed job continues it). The API key comes from the environment
  only (`WANDB_API_KEY`, or `wandb login`'s netrc): nothing here reads, passes or records
  it. `WANDB_MODE=offline` keeps the run on disk for a later `wandb sync`.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import os
import shutil
import sys
import tempfile
import threading
from typing import Protocol

from trainer import storage
from trainer.errors import UserError


# Clients tensorboardX imports, if installed, for its own gs:// and s3:// writers, which
# `TensorBoardWriter` never uses: it writes locally (and copies gs:// event files up).
_TENSORBOARDX_SKIPS = ("google.cloud.storage", "boto3")


class _RefusedOnThreads(importlib.abc.MetaPathFinder):
  """Makes imports of `names` fail, only for those made on the threads in `threads`.

  Installed once at the front of `sys.meta_path` and never removed: another thread may be
  walking `sys.meta_path` (an import) at any moment, and removing an entry shifts the list
  under it so that it skips a finder (a spurious ModuleNotFoundError elsewhere).
  """

  def __init__(self, names):
    self.names, self.threads = frozenset(names), set()

  def find_spec(self, fullname, path=None, target=None):  # pylint: disable=unused-argument
    if fullname in self.names and threading.get_ident() in self.threads:
      raise ModuleNotFoundError(f"{fullname}: not needed by tensorboardX here", name=fullname)
    return None  # the usual finders decide


_REFUSER = _RefusedOnThreads(_TENSORBOARDX_SKIPS)
_REFUSER_LOCK = threading.Lock()


def import_tensorboardx():
  """tensorboardX, imported without probing the cloud clients it does not need here.

  Its module-level probe of google-cloud-storage costs 0.13-0.3 s of CPU (more than the
  rest of tensorboardX). Other threads import those clients as usual meanwhile, and one
  already imported is used as is.
  """
  me = threading.get_ident()
  with _REFUSER_LOCK:
    if _REFUSER not in sys.meta_path:
      sys.meta_path.insert(0, _REFUSER)  # a walk under way at worst asks a finder twice
    _REFUSER.threads.add(me)
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    _REFUSER.threads.discard(me)
  return tensorboardX


def preload_tensorboard() -> None:
  """Imports tensorboardX ahead of its first use (`report.preload`)."""
  import_tensorboardx()


class MetricWriter(Protocol):
  """What the reporter calls; `scalars` holds only the row's numeric values."""

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None: ...

  def flush(self) -> None: ...

  def close(self) -> None: ...


class TensorBoardWriter:
  """tensorboardX event files under `<workdir>/tensorboard`.

  Rows wait in memory until `flush` (the reporter flushes every few seconds, and at the
  end), so neither importing tensorboardX nor writing events stalls a training step.
  """

  def __init__(self, workdir: str):
    self._workdir = workdir
    self._remote = storage.is_remote(workdir)
    self._local = (tempfile.mkdtemp(prefix="jaxjob-tb-") if self._remote
                   else str(storage.path(workdir) / "tensorboard"))
    self._uploaded: dict[str, int] = {}  # event file -> size already copied to gs://
    self._tb = None
    self._pending: list[tuple[int, dict[str, float]]] = []

  def write_scalars(self, step, scalars):
    self._pending.append((step, dict(scalars)))

  def flush(self):
    if self._pending and self._tb is None:
      self._tb = import_tensorboardx().SummaryWriter(self._local, flush_secs=60)
    for step, scalars in self._pending:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
    self._pending.clear()
    if self._tb is None:
      return
    self._tb.flush()
    if self._remote:
      self._copy_up()

  def _copy_up(self) -> None:
    """Uploads each local event file that grew since the last flush (whole, atomically)."""
    for name in sorted(os.listdir(self._local)):
      local = os.path.join(self._local, name)  # a local temp file, never the workdir
      if os.path.getsize(local) == self._uploaded.get(name):
        continue
      with open(local, "rb") as f:
        data = f.read()
      storage.write_bytes(storage.path(self._workdir) / "tensorboard" / name, data)
      self._uploaded[name] = len(data)

  def close(self):
    self.flush()
    if self._tb is not None:
      self._tb.close()
    if self._remote:
      shutil.rmtree(self._local, ignore_errors=True)


class WandbWriter:
  """A Weights & Biases run, started when the writer is made (so a bad setup fails early)."""

  def __init__(self, workdir: str, project: str, entity: str, run_config: dict):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UserError(f"config.report.wandb_project={project!r} needs the wandb package:"
                      " pip install 'jaxjob[wandb]'") from None
    # W&B's own files (`wandb/` below this directory): next to the run's other records
    # when the workdir is local; for a gs:// workdir in WANDB_DIR if set, else a
    # temporary directory (an offline run's files stay there for `wandb sync`).
    if storage.is_remote(workdir):
      local_dir = os.environ.get("WANDB_DIR") or tempfile.mkdtemp(prefix="jaxjob-wandb-")
    else:
      local_dir = str(storage.path(workdir))
    os.makedirs(local_dir, exist_ok=True)
    try:
      self._run = wandb.init(
          project=project, entity=entity or None, dir=local_dir, config=run_config,
          name=os.path.basename(workdir.rstrip("/")), id=run_id(workdir), resume="allow")
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise UserError(f"config.report.wandb_project={project!r}: Weights & Biases did not"
                      f" start: {first} (the API key comes from WANDB_API_KEY or"
                      " `wandb login`; WANDB_MODE=offline needs none)") from None

  def write_scalars(self, step, scalars):
    self._run.log(scalars, step=step)

  def flush(self):
    pass  # W&B streams on its own.

  def close(self):
    self._run.finish()


def run_id(workdir: str) -> str:
  """The W&B run id of a workdir: the same on every restart, so a resume continues it."""
  return hashlib.sha256(storage.absolute(workdir).encode()).hexdigest()[:16]


def create(config, workdir: str) -> list[MetricWriter]:
  """TensorBoard, plus W&B when `config.report.wandb_project` is set (process 0 only)."""
  writers: list[MetricWriter] = [TensorBoardWriter(workdir)]
  report = config.get("report") if config is not None else None
  if report is not None and report.wandb_project:
    writers.append(WandbWriter(workdir, report.wandb_project, report.wandb_entity,
                               config.to_dict()))
  return writers
