"""The trainer's own pieces for one config, and the two loops the benchmarks compare.

`Job` wires data, strategy, model, optimiser, state and the compiled step exactly as
`train._train_and_evaluate` does. `Job.bare(k)` is the bare loop: the same compiled
step (same shardings, same donation) over device-resident batches, at most two steps
in flight (unbounded dispatch deadlocks XLA:CPU's collectives on many virtual devices,
and the trainer keeps the same bound). `Trainer.run(k)` drives the real `train._Loop`
for k steps, with its data loading, one-step-late metric reads, logging to a real
`Reporter`, watchdog and preemption checks. The save that `_Loop` forces at its last
step is dropped (a block's end is not a run's end): without a cadence nothing is saved,
and the checkpoint workload saves on the cadence only.
"""

from __future__ import annotations

import functools

import jax

from bench import harness
from trainer import checkpoint
from trainer import data
from trainer import models
from trainer import parallel
from trainer import preemption
from trainer import report
from trainer import train

_NEVER = 10**9
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class Job:
  """Data, strategy, model, state and compiled step of a config (as the trainer builds them)."""

  def __init__(self, config):
    self.config = config
    self.dataset = data.load(config)
    self.strategy = parallel.create(config)
    self.strategy.check_batch_size(config.train.batch_size)
    self.model = models.create(config, self.dataset.num_classes)
    tx, schedule = train.make_optimizer(config)
    l2 = float(config.optimizer.weight_decay) if config.optimizer.name != "adamw" else 0.0
    init = functools.partial(train.create_train_state, model=self.model, tx=tx,
                             example_x=self.dataset.train_x[:1],
                             ema=config.train.ema_decay > 0)
    self.state = self.strategy.init_state(init, jax.random.PRNGKey(config.seed))
    self.train_step = functools.partial(
        train.train_step, apply_fn=self.model.apply, tx=tx, schedule=schedule, l2=l2,
        accum_steps=config.train.grad_accum_steps, ema_decay=config.train.ema_decay)
    self.step_fn = self.strategy.compile_step(self.train_step)
    self.step = 0
    self.batches = [self.device_batch(i) for i in range(4)]

  def device_batch(self, step: int):
    """Global batch `step`, built by the trainer's loader and placed on the devices."""
    loop_cls = train._Loop  # pylint: disable=protected-access
    loop = loop_cls(self.config, self.dataset, self.strategy, None, report.Reporter(None),
                    self.model.apply)
    loop.watchdog.close()
    batch = loop._batch(step)  # pylint: disable=protected-access
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


class _DeviceBatchLoop(train._Loop):  # pylint: disable=protected-access
  """The trainer's loop fed device-resident batches: the loop without its input pipeline."""

  device_batches = ()

  def _batch(self, step: int):
    return self.device_batches[step % len(self.device_batches)]


class Trainer:
  """Drives `train._Loop.run` k steps at a time on a `Job`'s state."""

  def __init__(self, job: Job, workdir: str, *, device_batches: bool = False,
               checkpoint_every: int | None = None):
    self.job = job
    self.config = job.config.copy_and_resolve_references()
    self.config.train.eval_every = _NEVER
    self.config.train.checkpoint_every = checkpoint_every or _NEVER
    self.workdir = workdir
    self.reporter = report.Reporter(workdir)  # Writes like process 0 of a real run.
    cls = _DeviceBatchLoop if device_batches else train._Loop  # pylint: disable=protected-access
    self.loop = cls(self.config, job.dataset, job.strategy, _NoCheckpoint(), self.reporter,
                    job.model.apply)
    if device_batches:
      self.loop.device_batches = job.batches
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
