"""The step loop: dispatch step t, read step t-1's metrics, run the hooks that are due.

Reading step t-1's metrics right after dispatching step t keeps at most two steps in
flight: the device never waits for the host, and XLA:CPU's in-process collectives are
never flooded with queued steps (which deadlocks them on small machines). Logging,
checkpoints, evaluation, profiling and a user's own actions are hooks (`hooks.py`);
preemption and the non-finite policy are the loop's own, because they end it.
"""

from __future__ import annotations

import logging
import time

import jax

from trainer import data
from trainer import faults
from trainer import hooks as hooks_lib
from trainer import preemption
from trainer import runinfo
from trainer import watchdog
from trainer.errors import Diverged, Preempted

log = logging.getLogger(__name__)


class Loop:
  """Runs a `train.Job`'s compiled step with its hooks, writing through `reporter`."""

  def __init__(self, job, ckpt, reporter, *, hooks=(), batches=None, inject_faults=True):
    """`hooks`: extra hooks after the built-in ones; `batches(step)`: device batches
    instead of the trainer's loader (benchmarks)."""
    self.job = job
    self.config, self.dataset, self.strategy = job.config, job.dataset, job.strategy
    self.model, self.task = job.model, job.task
    self.ckpt, self.reporter = ckpt, reporter
    self.hooks: list[hooks_lib.Hook] = hooks_lib.builtin(self.config, reporter.workdir)
    self.hooks += list(hooks)
    self.read_batch = self._read_batch
    self._batches = batches
    self.eval_rows: list[dict] = []
    self.values: dict = {}  # the metrics of the step read last
    self.last_metrics: dict = {}  # the metrics of the last finite step
    self.window = (0, 0.0)  # (steps, seconds) since the last logged row
    self.skipped_steps = 0
    self.start_step = 0
    self._consecutive_skips = 0
    self._timed_steps = 0
    self._timed_seconds = 0.0
    self._last_time = None
    self.watchdog = watchdog.Watchdog(self.config.train.watchdog_timeout)
    if inject_faults:
      faults.install(self)

  def eval_variables(self, state) -> dict:
    return self.job.eval_variables(state)

  def _read_batch(self, step: int) -> dict:
    cfg = self.config
    idx = data.process_batch_indices(cfg.seed, step, cfg.train.batch_size,
                                     self.dataset.num_train, jax.process_index(),
                                     jax.process_count())
    return self.dataset.train_batch(idx)

  def batch(self, step: int):
    if self._batches is not None:
      return self._batches(step)
    return self.strategy.batch(self.read_batch(step), self.config.train.batch_size)

  def run(self, step_fn, state, start_step: int, watcher: preemption.Watcher):
    steps = self.config.train.steps
    self.start_step = start_step
    progress = runinfo.progress_bar(steps, start_step, enabled=self.reporter.active)
    with_state = [h for h in self.hooks if h.needs_state]
    pending = None
    try:
      for step in range(start_step, steps):
        for hook in self.hooks:
          hook.before_step(self, step, state)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):  # step marks in traces
          state, metrics = step_fn(state, self.batch(step))
        if pending is not None:
          self._after_step(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        progress.update(1)
        preempted = watcher.reached(done)
        due = [h for h in with_state if h.fires(done, steps)]
        if not (preempted or due):
          continue
        self._after_step(*pending)  # Never checkpoint a step whose metrics are unchecked.
        pending = None
        canonical = self.strategy.to_canonical(state)
        if preempted:
          self.ckpt.save(done, canonical, force=True)
          self.ckpt.close()
          raise Preempted(f"preempted: checkpoint committed at step {done}")
        for hook in due:
          hook(self, done, canonical)
        self.watchdog.beat(done)  # Saves and evals are progress too.
    finally:
      for hook in self.hooks:
        hook.close(self)
    progress.close()
    return self.strategy.to_canonical(state)

  def _after_step(self, done: int, metrics) -> None:
    """Reads one step's metrics (one step late), applies the non-finite policy, logs."""
    values = self.strategy.read_metrics(metrics)
    self.watchdog.beat(done)
    now = time.perf_counter()
    if self._last_time is not None:  # The first step's time is mostly compilation.
      self._timed_steps += 1
      self._timed_seconds += now - self._last_time
      steps, seconds = self.window
      self.window = (steps + 1, seconds + now - self._last_time)
    self._last_time = now
    if values.pop("finite") < 1.0:
      self._on_nonfinite(done)
    else:
      self._consecutive_skips = 0
      self.last_metrics = values
    self.values = values
    last = self.config.train.steps
    for hook in self.hooks:
      if not hook.needs_state and hook.fires(done, last):
        hook(self, done, None)

  def _on_nonfinite(self, done: int) -> None:
    cfg = self.config.train
    self.skipped_steps += 1
    self._consecutive_skips += 1
    if cfg.nonfinite_policy == "stop":
      raise Diverged(f"diverged: non-finite loss or gradient at step {done}")
    log.warning("step %d: non-finite loss or gradient, update skipped", done)
    if self._consecutive_skips >= cfg.max_consecutive_skips:
      raise Diverged(f"diverged: {self._consecutive_skips} consecutive non-finite steps,"
                     f" the last at step {done}")

  def examples_per_second(self) -> float | None:
    if self._timed_seconds <= 0:
      return None
    return round(self._timed_steps * self.config.train.batch_size / self._timed_seconds, 1)
