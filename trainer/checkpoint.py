"""A thin wrapper over Orbax `CheckpointManager`: async saves, keep-N, resume by default.

Resume precedence when a run starts:
1. the newest committed step under `<workdir>/checkpoints/` (Orbax lists only steps whose
   write finished: renamed into place locally, `commit_success.txt` on GCS);
2. otherwise a fresh state at step 0.
A newest step that exists but cannot be read (truncated, corrupted) is skipped in favour
of the previous one, with a warning.
"""

from __future__ import annotations

import logging

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves and restores the canonical (replicated, global) train state."""

  def __init__(self, directory, *, save_every: int, keep: int):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        save_interval_steps=save_every,
        enable_async_checkpointing=True,
        # Half-written steps of a killed process are deleted instead of lingering.
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(directory, options=options)
    self._closed = False

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, abstract_state):
    """Returns (state, step) of the newest readable committed step, or (None, 0)."""
    for step in reversed(self.all_steps()):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      except Exception as e:  # pylint: disable=broad-except
        log.warning("checkpoint step %d is unreadable, deleting it and trying an older one:"
                    " %s", step, str(e).splitlines()[0] if str(e) else type(e).__name__)
        # Deleted so that the step can be saved again when training reaches it.
        self._manager.delete(step)
        continue
      return state, step
    return None, 0

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an async save of `state` at `step` when the interval (or `force`) says so."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for pending saves to commit; errors from the background thread surface here."""
    if self._closed:
      return
    self._closed = True
    self._manager.wait_until_finished()
    self._manager.close()


def abstract(state):
  """Shape, dtype and sharding of every leaf: the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def load_latest(directory):
  """(step, state as a nested dict of host arrays) of the newest committed checkpoint.

  For tools that read a finished run (prediction, tests) in a process of any topology:
  every leaf is restored whole onto this process's first device, whatever mesh saved it.
  """
  with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step()
    if step is None:
      return None, None
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                          manager.item_metadata(step))
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  return step, jax.device_get(restored)
