"""The step loop: dispatch steps, read the previous dispatch's metrics, run due hooks.

A dispatch is one compiled call that runs K optimiser steps (`config.train.
steps_per_dispatch`; 0 = auto, below). Reading dispatch d-1's metrics right after
dispatching d keeps at most two dispatches in flight: the device never waits for the
host, and XLA:CPU's in-process collectives are never flooded with queued steps (which
deadlocks them on small machines). Logging, checkpoints, evaluation, profiling and a
user's own actions are hooks (`hooks.py`); preemption and the non-finite policy are the
loop's own, because they end it.

Where the batches come from: when the training split is whole in host memory and small
enough (`config.train.data_on_device`), it is put on every device once and each step
gathers its rows there from indices in the same (seed, step) order (`data.
steps_batch_indices`); otherwise each step's batch is read on the host and transferred.

Every step boundary is still exact: a dispatch ends where a state hook fires (checkpoint,
eval, a user's hook), at a profile boundary and at the last step; its K metric rows are
read one by one (logging, the non-finite policy, the watchdog), and the preemption check
runs after every dispatch. `auto` times a few single-step dispatches, then picks K so a
dispatch lasts about `AUTO_TARGET_S` (every process uses process 0's measurement).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time

import jax
import numpy as np

from trainer import data
from trainer import faults
from trainer import hooks as hooks_lib
from trainer import preemption
from trainer import runinfo
from trainer import watchdog
from trainer.errors import Diverged, Preempted

log = logging.getLogger(__name__)

AUTO_TARGET_S = 0.05  # auto: a dispatch lasts about this long
AUTO_CAPACITY = 128  # auto with the split on the devices: the most steps per dispatch
AUTO_HOST_MAX_STEP_S = 0.01  # auto, host-fed: longer steps keep one step per dispatch
PROBE_DISPATCHES = 4  # auto: single-step dispatches before K is picked (the 1st compiles)


def split_to_hold(config, dataset) -> dict | None:
  """The training split the devices hold under `config.train.data_on_device`, or None."""
  cfg = config.train
  split = dataset.in_memory_split()
  if cfg.data_on_device == "off" or split is None:
    return None
  if cfg.data_on_device == "auto":
    nbytes = sum(a.nbytes for a in split.values())
    limit = device_memory_bytes()
    if nbytes > cfg.data_on_device_max_mb * 2**20 or (limit and nbytes > limit // 4):
      return None
  return split


def precompile(job, abstract_state) -> None:
  """Compiles the function of a run's first dispatch on a background thread.

  Tracing holds the GIL and XLA's compilation does not: `job.state` waits until the
  thread has traced the step (`job.cache["step_traced"]`) before it traces the
  initialiser, so the two traces do not share the GIL (each took about twice as long),
  and the initialiser then compiles beside the step. The first dispatch finds its
  function in JAX's caches (arguments with the same shapes, types and shardings hit
  them). The first dispatch is a few steps over the split on the devices, or, host-fed,
  one step (`Loop._prepare`). Nothing is done for pmap, whose state is laid out per
  device, nor for host-fed data with several steps per dispatch. An error is left for
  the first dispatch to raise. `Loop._prepare` waits for the thread (`job.cache`).
  """
  cfg = job.config.train
  split = split_to_hold(job.config, job.dataset)
  if not job.strategy.precompiles or (split is None and cfg.steps_per_dispatch > 1):
    return
  strategy, rows = job.strategy, cfg.batch_size // jax.process_count()
  traced = job.cache["step_traced"] = threading.Event()

  def compile_first_dispatch():
    try:
      if split is not None:
        indices = np.zeros((cfg.steps_per_dispatch or AUTO_CAPACITY, rows), np.int32)
        xs = strategy.steps_input({"i": indices}, cfg.batch_size)["i"]
        args = (abstract_state, xs, strategy.steps_count(1), job.device_split())
        lowered = job.steps_fn(on_device=True).lower(*args)
      else:
        indices = data.process_batch_indices(job.config.seed, 0, cfg.batch_size,
                                             job.dataset.num_train, jax.process_index(),
                                             jax.process_count())
        batch = strategy.batch(job.dataset.train_batch(indices), cfg.batch_size)
        lowered = job.step_fn.lower(abstract_state, batch)
      traced.set()
      lowered.compile()
    except Exception:  # pylint: disable=broad-except
      log.debug("precompiling the first dispatch failed", exc_info=True)
    finally:
      traced.set()

  # Not a daemon: Python's exit waits for it. A daemon thread still inside XLA's compiler
  # when the interpreter finalises aborts the process (an early exit 2 did so).
  thread = threading.Thread(target=compile_first_dispatch, name="jaxjob-precompile")
  job.cache["precompile"] = thread
  thread.start()


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
    self._prepared = False
    self._probe: list[float] = []  # auto: seconds per step of the timed probe dispatches
    self._steps_fn = None  # the multi-step function; None: one host-fed step per call
    self._split = None  # the training split on the devices
    self._capacity = 1
    self._prefetch = None
    self._counts: dict = {}  # dispatch length -> its trip count on the devices
    self.data_on_device = False
    self.steps_per_dispatch = None
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

  def _split_on_device(self) -> dict | None:
    """The training split to hold on the devices, or None (host-fed), by the config."""
    host_reader = self.read_batch != self._read_batch  # wrapped (fault injection)
    if self._batches is not None or host_reader:
      return None  # (batches=: the caller feeds device batches, one step per dispatch)
    return split_to_hold(self.config, self.dataset)

  def _prepare(self) -> None:
    """Picks how batches reach the step and the dispatch function (once per Loop)."""
    if self._prepared:
      return
    self._prepared = True
    precompiling = self.job.cache.pop("precompile", None)
    if precompiling is not None:
      self._compile_evaluation()  # meanwhile, on this thread
      precompiling.join()  # it fills the job's cache; the dispatches wait for it anyway
    k = self.config.train.steps_per_dispatch
    self.data_on_device = self._split_on_device() is not None
    if self.data_on_device:
      self._split = self.job.device_split()
      self._capacity = k or AUTO_CAPACITY
      self._steps_fn = self.job.steps_fn(on_device=True)
    elif k > 1:
      self._capacity, self._steps_fn = k, self.job.steps_fn(on_device=False)
    self.steps_per_dispatch = k or None  # None: auto, still probing
    depth = self.config.train.prefetch
    if depth and not self.data_on_device and self._batches is None:
      self._prefetch = Prefetcher(self._inputs, depth)

  def _compile_evaluation(self) -> None:
    """The task's evaluation executables (`Task.compile_evaluation`; a run always ends
    with one evaluation). An error is left for the first evaluation to raise."""
    job = self.job
    try:
      self.task.compile_evaluation(self.strategy, self.model,
                                   job.eval_variables(job.abstract_state), self.dataset)
    except Exception:  # pylint: disable=broad-except
      log.debug("compiling the evaluation ahead failed", exc_info=True)

  def _dispatch_length(self, step: int, last: int) -> int:
    """Steps in the dispatch that starts at `step`: K, cut where a hook needs a boundary."""
    limit = min(self.steps_per_dispatch or 1, last - step)
    for n in range(1, limit):
      if any(h.ends_dispatch(step + n, last) for h in self.hooks):
        return n
    return limit

  def _inputs(self, step: int, n: int, stacked: bool):
    """The device inputs of the dispatch of steps `step .. step+n-1`."""
    if not stacked:
      return self.batch(step)
    cfg = self.config
    if self.data_on_device:
      idx = data.steps_batch_indices(cfg.seed, step, n, cfg.train.batch_size,
                                     self.dataset.num_train, jax.process_index(),
                                     jax.process_count()).astype(np.int32)
      return self.strategy.steps_input({"i": _pad(idx, self._capacity)},
                                       cfg.train.batch_size)["i"]
    local = [self.read_batch(step + i) for i in range(n)]
    local = {k: _pad(np.stack([b[k] for b in local]), self._capacity) for k in local[0]}
    return self.strategy.steps_input(local, cfg.train.batch_size)

  def _dispatch(self, step_fn, state, step: int, n: int):
    """Runs steps `step .. step+n-1` in one call; returns (state, metrics, stacked)."""
    stacked = self._steps_fn is not None
    key = (step, n, stacked)
    if self._prefetch is not None:
      inputs = self._prefetch.get(key, self._upcoming(key))
    else:
      inputs = self._inputs(*key)
    if not stacked:
      return (*step_fn(state, inputs), False)
    if n not in self._counts:  # an explicit transfer, once per distinct length
      self._counts[n] = self.strategy.steps_count(n)
    return (*self._steps_fn(state, inputs, self._counts[n], self._split), True)

  def _upcoming(self, key):
    """The dispatches after `key` as planned now (prefetch builds them ahead)."""
    step, n, stacked = key
    last = self.config.train.steps
    for _ in range(self._prefetch.depth):
      step += n
      if step >= last:
        return
      n = self._dispatch_length(step, last)
      yield (step, n, stacked)

  def run(self, step_fn, state, start_step: int, watcher: preemption.Watcher):
    steps = self.config.train.steps
    self.start_step = start_step
    self._last_time = None  # times are measured from this run's first read
    self._prepare()
    progress = runinfo.progress_bar(steps, start_step, enabled=self.reporter.active)
    with_state = [h for h in self.hooks if h.needs_state]
    pending = None
    step = start_step
    try:
      while step < steps:
        n = self._dispatch_length(step, steps)
        for s in range(step, step + n):
          for hook in self.hooks:
            hook.before_step(self, s, state)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):  # step marks in traces
          state, metrics, stacked = self._dispatch(step_fn, state, step, n)
        if pending is not None:
          self._after_dispatch(*pending)
        step += n
        pending = (step, n, metrics, stacked)
        progress.update(n)
        # JAX's sync point is a step count some steps past the notice (every process
        # agrees on it): each step of the dispatch is offered, and the dispatch that
        # holds it ends in the checkpoint.
        preempted = any([watcher.reached(done) for done in range(step - n + 1, step + 1)])
        done = step
        due = [h for h in with_state if h.fires(done, steps)]
        if not (preempted or due):
          continue
        self._after_dispatch(*pending)  # Never checkpoint a step whose metrics are unchecked.
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
      if self._prefetch is not None:
        self._prefetch.clear()
      for hook in self.hooks:
        hook.close(self)
    progress.close()
    return self.strategy.to_canonical(state)

  def _after_dispatch(self, done: int, n: int, metrics, stacked: bool) -> None:
    """Reads one dispatch's metric rows (one dispatch late); each row is one step."""
    rows = (self.strategy.read_metric_rows(metrics, n) if stacked
            else [self.strategy.read_metrics(metrics)])
    now = time.perf_counter()
    seconds = None
    if self._last_time is not None:  # The first dispatch's time is mostly compilation.
      seconds = now - self._last_time
      self._timed_steps += n
      self._timed_seconds += seconds
      if self.steps_per_dispatch is None:
        self._probe.append(seconds / n)
    self._last_time = now
    for i, values in enumerate(rows):
      self._after_step(done - n + 1 + i, values, None if seconds is None else seconds / n)
    if self.steps_per_dispatch is None and len(self._probe) >= PROBE_DISPATCHES - 1:
      self._choose_k(float(np.median(self._probe)), self.config.train.steps - done)

  def _choose_k(self, step_s: float, steps_left: int) -> None:
    """auto: K from the measured time per step (process 0's, so that all agree)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      step_s = float(multihost_utils.broadcast_one_to_all(np.float32(step_s)))
    k = max(1, int(AUTO_TARGET_S // max(step_s, 1e-9)))
    if self.data_on_device:
      k = min(k, self._capacity)
    elif self._batches is not None or step_s > AUTO_HOST_MAX_STEP_S or steps_left < 4 * k:
      k = 1  # a second compilation would cost more than it saves (or batches are given)
    else:
      self._capacity, self._steps_fn = k, self.job.steps_fn(on_device=False)
    self.steps_per_dispatch = k
    log.info("steps per dispatch: %d (auto; %.3f ms per step measured)", k, step_s * 1e3)

  def _after_step(self, done: int, values: dict, seconds: float | None) -> None:
    """One step's metrics: the non-finite policy, the watchdog, the metric hooks."""
    self.watchdog.beat(done)
    if seconds is not None:
      steps, total = self.window
      self.window = (steps + 1, total + seconds)
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


class Prefetcher:
  """Builds host-fed dispatch inputs ahead on one background thread (a bounded queue).

  `get(key, upcoming)` returns the inputs for `key` (from the queue when they were
  built ahead, else built now) and queues the next `depth` planned keys. A key planned
  before a change of plan (auto's choice of K) is dropped unused.
  """

  def __init__(self, build, depth: int):
    self.depth = depth
    self._build = build
    self._pool = None
    self._queue: collections.deque = collections.deque()

  def get(self, key, upcoming):
    inputs = None
    while self._queue:
      queued, future = self._queue.popleft()
      if queued == key:
        inputs = future.result()
        break
    if inputs is None:
      inputs = self._build(*key)
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxjob-prefetch")
    for planned in upcoming:
      if len(self._queue) >= self.depth:
        break
      if all(queued != planned for queued, _ in self._queue):
        self._queue.append((planned, self._pool.submit(self._build, *planned)))
    return inputs

  def clear(self) -> None:
    """Drops what was built ahead and stops the thread (the loop ended)."""
    self._queue.clear()
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None


def _pad(a: np.ndarray, rows: int) -> np.ndarray:
  """`a` with zero rows appended along axis 0 up to `rows` (a fixed executable shape)."""
  if a.shape[0] == rows:
    return a
  return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)])


def device_memory_bytes() -> int | None:
  """This process's first device's memory limit, when the backend reports one."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return (stats or {}).get("bytes_limit")
