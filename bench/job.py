"""The trainer's pieces for one config, and the two loops the benchmarks compare.

`Job` is the trainer's own job (`trainer.build`: data, strategy, model, optimiser,
state and compiled step). `Job.bare(k)` is the bare loop: the same compiled step (same
shardings, same donation) over device-resident batches, at most two steps in flight
(unbounded dispatch deadlocks XLA:CPU's collectives on many virtual devices, and the
trainer keeps the same bound). `Trainer.run(k)` drives the real `loop.Loop` for k
steps, with its data loading, one-step-late metric reads, logging to a real `Reporter`,
watchdog and preemption checks. The save that the checkpoint hook forces at a run's
last step is dropped (a block's end is not a run's end): without a cadence nothing is
saved, and the checkpoint workload saves on the cadence only. `Trainer.warm_up` runs
until the loop has made its auto choices (steps per dispatch, the split on the
devices) and compiled what it dispatches; the `Loop` keeps them for every later block.
"""

from __future__ import annotations

import dataclasses

import jax

import trainer
from bench import harness
from trainer import checkpoint
from trainer import parallel
from trainer import preemption
from trainer import report
from trainer import loop as loop_lib
from trainer.loop import Loop

_NEVER = 10**9
# warm_up: the largest auto K it makes room for (the loop's K is about AUTO_TARGET_S over
# its measured step time, and a host-fed K > 1 needs 4 K steps left when it is picked).
_WARM_UP_MAX_K = 256
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class Job:
  """A `trainer.build` job, its state advanced by the benchmark's blocks."""

  def __init__(self, config):
    self.config = config
    job = trainer.build(config)
    self.job = job
    self.dataset, self.strategy, self.model = job.dataset, job.strategy, job.model
    self.state, self.train_step, self.step_fn = job.state, job.train_step, job.step_fn
    self.step = 0
    self.batches = [self.device_batch(i) for i in range(4)]

  def device_batch(self, step: int):
    """Global batch `step`, built by the trainer's loader and placed on the devices."""
    loop = Loop(self.job, None, report.Reporter(None))
    loop.watchdog.close()
    batch = loop.batch(step)
    if isinstance(self.strategy, parallel.Pmap):  # pmap's batches are host arrays
      batch = jax.pmap(lambda b: b)(batch)
    return jax.block_until_ready(batch)

  def bare(self, k: int) -> harness.Timing:
    """k steps of the compiled step over device-resident batches; state stays canonical."""
    state = self.strategy.to_device(self.state)
    box = {}

    def loop():
      s, prev = state, None
      for i in range(k):
        s, metrics = self.step_fn(s, self.batches[i % len(self.batches)])
        if prev is not None:
          prev.block_until_ready()  # At most two steps in flight, as in the trainer.
        prev = metrics["loss"]
      box["state"] = jax.block_until_ready(s)

    timing = harness.timed(loop)
    self.state = self.strategy.to_canonical(box["state"])
    self.step += k
    return timing

  def hlo_op_counts(self) -> dict[str, int]:
    """Counts of collectives (and transposes, copies) in the compiled step's HLO."""
    state = self.strategy.to_device(self.state)
    text = self.step_fn.lower(state, self.batches[0]).compile().as_text()
    ops = COLLECTIVES + ("transpose", "copy")
    counts = {}
    for op in ops:
      counts[op] = sum(1 for line in text.splitlines()
                       if f" {op}(" in line or f" {op}-start(" in line)
    return counts


class _NoCheckpoint:
  """Stands in for `checkpoint.Checkpointer` when a block must not save."""

  def save(self, step, state, force=False):  # pylint: disable=unused-argument
    return False

  def close(self):
    pass


class _CadenceCheckpointer(checkpoint.Checkpointer):
  """Saves on the cadence only: a timed block's last step is not a run's last step."""

  def save(self, step, state, force=False):  # pylint: disable=unused-argument
    return super().save(step, state)


class Trainer:
  """Drives `loop.Loop.run` k steps at a time on a `Job`'s state."""

  def __init__(self, job: Job, workdir: str, *, device_batches: bool = False,
               checkpoint_every: int | None = None, steps_per_dispatch: int | None = None,
               data_on_device: str | None = None, prefetch: int | None = None):
    """`steps_per_dispatch`, `data_on_device`, `prefetch`: config.train values instead of
    the job's."""
    self.job = job
    self.config = job.config.copy_and_resolve_references()
    self.config.train.eval_every = _NEVER
    self.config.train.checkpoint_every = checkpoint_every or _NEVER
    if steps_per_dispatch is not None:
      self.config.train.steps_per_dispatch = steps_per_dispatch
    if data_on_device is not None:
      self.config.train.data_on_device = data_on_device
    if prefetch is not None:
      self.config.train.prefetch = prefetch
    self.workdir = workdir
    self.reporter = report.Reporter(workdir)  # Writes like process 0 of a real run.
    batches = (lambda step: job.batches[step % len(job.batches)]) if device_batches else None
    # The loop reads this copy of the config (cadences, and steps per block).
    built = dataclasses.replace(job.job, config=self.config)
    self.loop = Loop(built, _NoCheckpoint(), self.reporter, batches=batches)
    self.watcher = preemption.Watcher()
    self.guard = None  # e.g. "disallow": run the loop under jax.transfer_guard

  def run(self, k: int) -> harness.Timing:
    job = self.job
    state = job.strategy.to_device(job.state)  # pmap's layout change: not the loop's cost
    saving = self.config.train.checkpoint_every != _NEVER
    ckpt = (_CadenceCheckpointer(f"{self.workdir}/checkpoints", keep=2,
                                 save_every=self.config.train.checkpoint_every)
            if saving else _NoCheckpoint())
    self.loop.ckpt = ckpt
    self.config.train.steps = job.step + k
    box = {}

    def loop():
      if self.guard:
        with jax.transfer_guard(self.guard):
          box["state"] = self.loop.run(job.step_fn, state, job.step, self.watcher)
      else:
        box["state"] = self.loop.run(job.step_fn, state, job.step, self.watcher)
      ckpt.close()  # Waits for the async writes: their cost lands in this block.
      jax.block_until_ready(box["state"])

    timing = harness.timed(loop)
    job.state = box["state"]
    job.step += k
    return timing

  def warm_up(self, step_s: float) -> None:
    """Runs until the loop's steps per dispatch is chosen and its executables have run.

    One `run` call: auto's PROBE_DISPATCHES timed single steps must fall in one call (the
    first dispatch of a later call is timed from the end of the previous call), then room
    for the K it picks from a step of about `step_s` (the bare step: the loop's own is no
    shorter) to be picked and dispatched several times, compiling what it calls.

    Raises:
      RuntimeError: the loop has still not chosen its steps per dispatch.
    """
    k = min(_WARM_UP_MAX_K, max(1, int(loop_lib.AUTO_TARGET_S / max(step_s, 1e-9))))
    self.run(loop_lib.PROBE_DISPATCHES + 2 + 6 * k)
    if self.loop.steps_per_dispatch is None:
      raise RuntimeError(f"{self.workdir}: the loop chose no steps per dispatch in its"
                         f" warm-up of {loop_lib.PROBE_DISPATCHES + 2 + 6 * k} steps")

  def transfers_caught(self, k: int) -> str:
    """Runs k steps under jax.transfer_guard("disallow"); returns what it caught or "none"."""
    self.guard = "disallow"
    try:
      self.run(k)
      return "none"
    except Exception as e:  # pylint: disable=broad-except
      return (str(e).splitlines() or [type(e).__name__])[0][:160]
    finally:
      self.guard = None

  def close(self) -> None:
    self.loop.watchdog.close()
    self.watcher.close()
    self.reporter.close()
