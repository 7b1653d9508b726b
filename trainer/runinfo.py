"""run.json (what ran, where, and every (re)start), the default workdir, and progress output."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from trainer import storage
from trainer.errors import UserError


def _utc(ts: float | None = None) -> str:
  moment = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc) if ts else (
      datetime.datetime.now(datetime.timezone.utc))
  return moment.isoformat(timespec="seconds")


def default_workdir(name: str) -> str:
  """runs/<name>-<UTC timestamp>, with process 0's clock on every process."""
  if not name.strip() or "/" in name or os.sep in name or name.startswith("."):
    raise UserError(f"config.name={name!r} names the default workdir runs/<name>-<time>:"
                    " expected a plain name (no '/', not starting with '.'), or pass"
                    " --workdir")
  now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
  if jax.process_count() > 1:
    now = int(multihost_utils.broadcast_one_to_all(np.int64(now)))
  stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{name}-{stamp}")


def git_commit() -> str | None:
  """The commit of the trainer's source checkout, when it is one."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                         text=True, timeout=5, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str]:
  """The versions of Python and the JAX stack, read from package metadata (importing
  orbax for its version would cost ~0.5 s at start-up)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"python": sys.version.split()[0], "jax": jax.__version__}
  for name in ("jaxlib", "flax", "optax", "orbax-checkpoint"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = "not installed"
  return out


class RunRecord:
  """run.json: the resolved config and environment, plus one entry per (re)start."""

  def __init__(self, workdir: str | None, config, strategy, start_step: int):
    self._path = storage.path(workdir) / "run.json" if workdir else None
    if self._path is None:
      return
    previous = read_record(workdir) or {}
    starts = previous.get("starts", [])
    if starts and "exit" not in starts[-1]:
      starts[-1]["exit"] = {"code": None, "reason": "killed or crashed (no exit recorded)"}
    starts.append({"time": _utc(), "resumed_from_step": start_step})
    devices = jax.devices()
    self.record = {
        "config": json.loads(config.to_json_best_effort()),
        "argv": sys.argv,
        "workdir": str(workdir),
        "git_commit": git_commit(),
        "versions": versions(),
        "devices": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                    "count": len(devices), "local_count": jax.local_device_count()},
        "num_processes": jax.process_count(),
        "strategy": strategy.name,
        "starts": starts,
    }
    storage.write_json(self._path, self.record)

  def note(self, **entries) -> None:
    """Adds the non-empty `entries` to this start's entry in run.json."""
    entries = {k: v for k, v in entries.items() if v}
    if self._path is None or not entries:
      return
    self.record["starts"][-1].update(entries)
    storage.write_json(self._path, self.record)

  def finish(self, code: int, reason: str) -> None:
    if self._path is None:
      return
    self.record["starts"][-1]["exit"] = {"code": code, "reason": reason, "time": _utc()}
    storage.write_json(self._path, self.record)


def is_tty() -> bool:
  return sys.stderr.isatty()


class _NoProgress:

  def update(self, n: int) -> None:
    pass

  def close(self) -> None:
    pass


def progress_bar(total: int, initial: int, enabled: bool):
  """A tqdm bar with ETA on a terminal; nothing otherwise (log lines are printed instead)."""
  if not (enabled and is_tty()):
    return _NoProgress()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


_NOT_SHOWN = ("step", "loss", "grad_norm", "learning_rate", "examples_per_s", "time")


def format_row(row: dict, total: int) -> str:
  """`step 10/100 loss 0.1234 accuracy 0.9000 ...`: the loss, then the task's metrics."""
  parts = [f"step {row['step']}/{total}", f"loss {row['loss']:.4f}"]
  parts += [f"{k} {v:.4f}" for k, v in row.items()
            if k not in _NOT_SHOWN and isinstance(v, float)]
  if row.get("examples_per_s"):
    parts.append(f"{row['examples_per_s']:.0f} examples/s")
  return " ".join(parts)


# Fields that may change between a run and its resumption: they change when and what is
# logged or saved, not the computed parameters.
_RESUMABLE_CHANGES = ("name", "train.log_every", "train.eval_every", "train.checkpoint_every",
                      "train.keep_checkpoints", "train.watchdog_timeout",
                      "parallel.", "distributed.", "profile.", "report.")


def read_record(workdir: str) -> dict | None:
  """The workdir's run.json, or None when there is none.

  Raises:
    UserError: run.json is not the JSON object a run writes (it is left as it is).
  """
  path = storage.path(workdir) / "run.json"
  if not path.exists():
    return None
  return storage.read_json_object(
      path, "the run record a run writes: move it aside, or use a new --workdir")


def check_resume_config(workdir: str, config, allow_change: bool) -> None:
  """Refuses to resume a workdir whose recorded config differs in what it computes.

  Raises:
    UserError: listing the differing fields, unless `allow_change`.
  """
  record = read_record(workdir)  # a corrupt run.json is refused, even with allow_change
  if allow_change or record is None:
    return
  recorded = _flatten(record.get("config", {}))
  current = _flatten(json.loads(config.to_json_best_effort()))
  changed = sorted(k for k in set(recorded) | set(current)
                   if recorded.get(k) != current.get(k)
                   and not k.startswith(_RESUMABLE_CHANGES))
  if changed:
    shown = ", ".join(f"{k}: {recorded.get(k)!r} -> {current.get(k)!r}" for k in changed[:4])
    raise UserError(f"{workdir} holds a run with a different config ({shown}); use a new"
                    " --workdir, or pass --allow_config_change to resume it anyway")


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out
