"""A thin wrapper over Orbax `CheckpointManager`: async saves, keep-N, resume by default.

Resume precedence when a run starts:
1. the newest committed step under `<workdir>/checkpoints/` (Orbax lists only steps whose
   write finished: renamed into place locally, `commit_success.txt` on GCS);
2. otherwise a fresh state at step 0.

Restoring never deletes a committed step. Its failures are told apart:
- the step holds another state than the config trains (model, optimiser or EMA changed):
  `UserError` (exit 2) naming the tree paths that differ, before anything is trained;
  a change known to be safe is restored (EMA switched on: the average starts from the
  restored parameters) with a warning;
- a transient storage error: retried with backoff, then `StorageError` (exit 1);
- a step that is really corrupt (truncated or unreadable data or metadata): moved aside
  into `checkpoints/quarantine/<step>-<UTC time>/`, with a warning, and the previous
  step is tried. Orbax never lists that folder (its name is not a step number) and its
  `commit_success.txt` keeps Orbax's clean-up of unfinished steps away from it on GCS;
- anything else: `StorageError`, every step left in place.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from trainer import storage
from trainer.errors import StorageError, UserError

log = logging.getLogger(__name__)

QUARANTINE = "quarantine"
# How long transient errors on restore are retried before the run gives up (exit 1).
RESTORE_RETRY_DEADLINE_S = 120.0
# State fields a checkpoint may lack that start as a copy of another field.
_SAFE_ADDITIONS = {"ema_params": "params"}
# Tensorstore reports storage errors as ValueError("<absl status code>: ...").
_CORRUPT_CODES = ("DATA_LOSS:", "OUT_OF_RANGE:", "NOT_FOUND:", "FAILED_PRECONDITION:")


def import_orbax():
  """orbax.checkpoint, imported on first use: ~0.5 s that a fresh local run needs only at
  its first save (`train_and_evaluate` starts the import in the background before that)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp


class Checkpointer:
  """Saves and restores the canonical (replicated, global) train state."""

  def __init__(self, directory, *, save_every: int, keep: int):
    self.directory = directory
    self._save_every, self._keep = save_every, keep
    self._manager_or_none = None
    self._closed = False
    self._in_flight: int | None = None  # the newest step whose async save started
    self.events: list[dict] = []  # quarantined steps and partial restores, for run.json

  @property
  def _manager(self):
    """Orbax's CheckpointManager, made on first use."""
    if self._manager_or_none is None:
      self._manager_or_none = self._make_manager()
    return self._manager_or_none

  def _make_manager(self):
    ocp = import_orbax()
    from orbax.checkpoint import checkpoint_managers as policies  # pylint: disable=g-import-not-at-top
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(self._save_every),
            policies.PreemptionCheckpointingPolicy(),
            policies.InitialSavePolicy()]),
        preservation_policy=policies.LatestN(n=self._keep),
        enable_async_checkpointing=True,
        # Half-written steps of a killed process are deleted instead of lingering.
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(self.directory, options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())

  def all_steps(self) -> list[int]:
    if self._manager_or_none is None and not _may_hold_steps(self.directory):
      return []  # A fresh local run: no need for Orbax until the first save.
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state):
    """Returns (state, step) of the newest restorable committed step, or (None, 0).

    Raises:
      UserError: the newest step holds a state of another structure (exit 2).
      StorageError: storage failed, or a step failed in an unknown way (exit 1); every
        committed step is left in place.
    """
    for step in reversed(self.all_steps()):
      outcome, value = self._try_restore(step, abstract_state)
      kinds = _agree(outcome)
      if kinds == {"ok"}:
        _note_committed(step)
        return value, step
      if "mismatch" in kinds:
        raise value if outcome == "mismatch" else UserError(
            f"checkpoint step {step} under {self.directory} does not match the state of"
            " this config on another process")
      if kinds - {"ok", "corrupt"}:
        raise value if isinstance(value, StorageError) else StorageError(
            f"restoring checkpoint step {step} from {self.directory} failed on another"
            " process; every checkpoint was left in place")
      self._quarantine(step, value if outcome == "corrupt" else "corrupt on another process")
    return None, 0

  def _try_restore(self, step: int, abstract_state):
    """(outcome, state or error): outcome is ok, mismatch, corrupt or failed."""
    try:
      metadata = self._retried(step, "reading the metadata of", self._manager.item_metadata,
                               step)
      if metadata is None or getattr(metadata, "tree", None) is None:
        raise FileNotFoundError(f"step {step} has no readable item metadata")
      target, fill = _restore_target(abstract_state, metadata.tree, step, self.directory)
      state = self._retried(step, "restoring", self._manager.restore, step,
                            args=import_orbax().args.StandardRestore(target))
    except UserError as e:
      return "mismatch", e
    except StorageError as e:
      return "failed", e
    except Exception as e:  # pylint: disable=broad-except
      if _is_corrupt(e):
        return "corrupt", e
      return "failed", StorageError(
          f"restoring checkpoint step {step} from {self.directory} failed:"
          f" {storage.one_line(e)}; every checkpoint was left in place")
    for field, source in fill.items():
      # A copy, not the same buffers: the train step donates the state.
      state = state.replace(**{field: jax.tree.map(jnp.copy, getattr(state, source))})
      log.warning("checkpoint step %d holds no %s (the run that wrote it kept none):"
                  " restored the rest, %s starts from the restored %s", step, field, field,
                  source)
      self.events.append({"step": step, "event": "restored_without", "field": field,
                          "started_from": source})
    return "ok", state

  def _retried(self, step: int, what: str, fn, *args, **kwargs):
    try:
      return storage.retry(fn, *args, deadline_s=RESTORE_RETRY_DEADLINE_S, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not storage.is_transient(e):
        raise
      raise StorageError(
          f"{what} checkpoint step {step} in {self.directory} kept failing with transient"
          f" errors for {RESTORE_RETRY_DEADLINE_S:.0f} s: {storage.one_line(e)}; every"
          " checkpoint was left in place, run again later") from e

  def _quarantine(self, step: int, error) -> None:
    """Moves a corrupt committed step aside (process 0), then every process goes on."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = storage.path(self.directory) / QUARANTINE
    target = folder / f"{step}-{stamp}"
    reason = storage.one_line(error) if isinstance(error, BaseException) else str(error)
    if jax.process_index() == 0:
      try:
        _mark_quarantine(folder)
        storage.move_tree(storage.path(self.directory) / str(step), target)
      except Exception as e:  # pylint: disable=broad-except
        raise StorageError(f"checkpoint step {step} in {self.directory} is unreadable"
                           f" ({reason}) and could not be moved aside to {target}:"
                           f" {storage.one_line(e)}") from e
    _barrier(f"jaxjob_quarantine_{step}")
    log.warning("checkpoint step %d is unreadable (%s): moved aside to %s, trying an older"
                " step", step, reason, target)
    self.events.append({"step": step, "event": "quarantined", "moved_to": str(target),
                        "reason": reason})
    self._manager.reload()

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an async save of `state` at `step` when the interval (or `force`) says so.

    Raises:
      StorageError: this save, or the previous one still in flight, failed to write.
    """
    if self._in_flight is not None:
      # Orbax's save waits for the save in flight as well; waiting here first tells that
      # save's failure from this one's, even when storage can no longer list the steps.
      try:
        self._manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_error(e, None) from e
      _note_committed(self._in_flight)
      self._in_flight = None
    try:
      started = self._manager.save(step, args=import_orbax().args.StandardSave(state),
                                   force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e, step) from e
    if started:
      self._in_flight = step
    return started

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves to commit; errors from the background thread surface here.

    Raises:
      StorageError: a pending save failed to write.
    """
    if self._closed:
      return
    self._closed = True
    if self._manager_or_none is None:
      return  # Never saved nor restored: nothing in flight.
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = self._save_error(e, None)
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # The same failure again; `error` already names it.
      raise error from e
    _note_committed(self._in_flight)
    self._manager.close()

  def _save_error(self, e: Exception, step: int | None) -> Exception:
    """`e` as a StorageError naming the failed step when it is a storage failure.

    The failure of an async save surfaces at the next `save` or at `close`: the step
    that failed is the one in flight, unless that one was committed.
    """
    if not storage.is_storage_error(e):
      return e
    try:
      self._manager.reload()
      steps = self._manager.all_steps()
      # No steps at all: the directory (or its bucket) is gone, not the history.
      last = max(steps) if steps else last_committed_step()
    except Exception:  # pylint: disable=broad-except
      steps, last = [], last_committed_step()
    failed = step if self._in_flight in steps or self._in_flight is None else self._in_flight
    if failed is not None and failed not in steps:
      self._drop_partial(failed)
    return StorageError(f"saving checkpoint step {failed} to {self.directory} failed:"
                        f" {storage.reason(e)}; last committed step: {last}",
                        " ".join(str(e).split()))

  def _drop_partial(self, step: int) -> None:
    """Removes the half-written folder of the failed save of `step` on a local disk.

    It was never committed, and Orbax would delete it at the next start anyway
    (`cleanup_tmp_directories`); removing it now gives back the space it took, so that
    on a full disk the run's own records (run.json's exit) can still be written.
    Process 0 only, once its own save has stopped; a committed step is never touched.
    """
    if storage.is_remote(self.directory) or jax.process_index() != 0:
      return
    for partial in pathlib.Path(self.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
      shutil.rmtree(partial, ignore_errors=True)


_last_committed: int | None = None


def _note_committed(step: int | None) -> None:
  global _last_committed
  if step is not None:
    _last_committed = max(step, _last_committed or 0)


def last_committed_step() -> int | None:
  """The newest step this process restored or saw committed (storage may be gone)."""
  return _last_committed


def _restore_target(abstract_state, saved_tree, step: int, directory):
  """(restore target, {field: source} to fill after restoring), or UserError.

  Compares the checkpoint's item metadata (paths, shapes, dtypes) with the state this
  config builds, before any array is read.
  """
  want, have = _leaves(abstract_state), _leaves(saved_tree)
  missing = sorted(set(want) - set(have))
  extra = sorted(set(have) - set(want))
  changed = sorted(k for k in set(want) & set(have) if want[k] != have[k])
  fill = {}
  for field, source in _SAFE_ADDITIONS.items():
    added = [k for k in missing if k.startswith(field + ".")]
    copies = all(have.get(source + k[len(field):]) == want[k] for k in added)
    if added and copies and getattr(abstract_state, field, None) is not None:
      fill[field] = source
      missing = [k for k in missing if k not in added]
  if not (missing or extra or changed):
    return abstract_state.replace(**{field: None for field in fill}), fill
  parts = []
  for label, keys in (("missing from the checkpoint", missing), ("only in the checkpoint",
                                                                 extra)):
    if keys:
      parts.append(f"{label}: {_some(keys)}")
  if changed:
    parts.append("shape or dtype differs: " + _some(
        [f"{k} {_fmt(have[k])} saved, {_fmt(want[k])} now" for k in changed]))
  raise UserError(f"checkpoint step {step} in {directory} holds another state than this"
                  f" config trains ({'; '.join(parts)}): the model, optimiser or EMA setting"
                  " changed since it was written; go back to that config, or use a new"
                  " --workdir")


def _leaves(tree) -> dict[str, tuple]:
  """Dotted path (as Orbax names arrays, e.g. opt_state.0.mu.linear.kernel) -> shape, dtype."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                    for k in path)
    out[name] = (tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", "")))
  return out


def _fmt(shape_dtype) -> str:
  return f"{shape_dtype[1]}{list(shape_dtype[0])}"


def _some(items: list[str], n: int = 3) -> str:
  return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _is_corrupt(e: BaseException) -> bool:
  """Whether `e` says the step's own bytes are bad (not storage, not this process)."""
  if isinstance(e, (json.JSONDecodeError, FileNotFoundError)):
    return True
  text = str(e)
  if isinstance(e, ValueError) and text.startswith(_CORRUPT_CODES):
    return True
  # A step directory without its item (Orbax cannot tell which handler wrote it).
  return "Unable to retrieve default item" in text


def _agree(outcome: str) -> set[str]:
  """The outcomes of every process for one step (each process reads its own shards)."""
  if jax.process_count() == 1:
    return {outcome}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  names = ("ok", "mismatch", "corrupt", "failed")
  codes = multihost_utils.process_allgather(np.int32(names.index(outcome)))
  return {names[int(c)] for c in np.ravel(codes)}


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _mark_quarantine(folder) -> None:
  marker = folder / "commit_success.txt"
  if not marker.exists():
    storage.write_text(marker, "Checkpoint steps moved aside by jaxjob because they could"
                       " not be read; never restored, never deleted. This file keeps"
                       " Orbax's clean-up of unfinished steps away from this folder.\n")


def _may_hold_steps(directory) -> bool:
  """False only for one process's local checkpoint directory that does not exist yet
  (with several, every process makes its manager at once, as Orbax's barriers expect)."""
  return (jax.process_count() > 1 or storage.is_remote(str(directory))
          or storage.path(directory).exists())


def abstract(state):
  """Shape, dtype and sharding of every leaf: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def load_latest(directory):
  """(step, state as a nested dict of host arrays) of the newest committed checkpoint.

  For tools that read a finished run (prediction, tests) in a process of any topology:
  every leaf is restored whole onto this process's first device, whatever mesh saved it.
  """
  ocp = import_orbax()
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step()
    if step is None:
      return None, None
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          manager.item_metadata(step))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return step, jax.device_get(restored)
