"""Periodic actions around the step loop: one list of hooks, each with its own cadence.

The loop body is "dispatch a step, then run the hooks that are due". A hook fires after
step `done` when `done % every == 0` (`every = 0`: never on a cadence), and at the last
step when `at_end`. Two kinds:

* `needs_state = False` (logging): runs when the step's metrics are read, one step late,
  so the device never waits; it sees `loop.values` (that step's metrics).
* `needs_state = True` (checkpoint, eval, user hooks): the loop first reads the pending
  metrics, then passes the canonical state (global arrays in the sharding layout).

`before_step(loop, step, state)` runs before a step is dispatched (profiling). A user's
hook subclasses `Hook`, sets `every`, and is passed to `train_and_evaluate(..., hooks=[...])`.
"""

from __future__ import annotations

import time


from trainer import profiling
from trainer import runinfo


class Hook:
  """A periodic action. Override `__call__` (and `before_step` or `close` when needed)."""

  every: int = 0
  at_end: bool = True
  needs_state: bool = True

  def fires(self, done: int, last: int) -> bool:
    return (self.every > 0 and done % self.every == 0) or (self.at_end and done == last)

  def ends_dispatch(self, done: int, last: int) -> bool:
    """Whether a multi-step dispatch must end after step `done` (so that this hook sees
    the state there, or acts before the next step). Default: where a state hook fires."""
    return self.needs_state and self.fires(done, last)

  def before_step(self, loop, step: int, state) -> None:
    """Before step `step` is dispatched (for each step of a multi-step dispatch, all
    before it is dispatched)."""

  def __call__(self, loop, done: int, state) -> None:
    """After step `done` (1-based count of finished steps)."""

  def close(self, loop) -> None:
    """When the loop ends (normally or not)."""


# The log hook writes metrics.jsonl at every row, and flushes the metric writers
# (TensorBoard, W&B) at most this often: a TensorBoard flush costs ~30 ms, and its first
# one waits for tensorboardX's import if the preload has not finished it. The end of a
# run flushes everything.
WRITERS_FLUSH_EVERY_S = 5.0


class Log(Hook):
  """metrics.jsonl, TensorBoard and the console line, every `log_every` steps."""

  needs_state = False

  def __init__(self, every: int):
    self.every = every

  def __call__(self, loop, done, state):
    steps, seconds = loop.window
    rate = steps * loop.config.train.batch_size / seconds if seconds > 0 else None
    row = {"step": done, **loop.values, "examples_per_s": rate, "time": time.time()}
    loop.reporter.log(row)
    last = done == loop.config.train.steps
    loop.reporter.flush(writers_unless_within_s=0.0 if last else WRITERS_FLUSH_EVERY_S)
    loop.window = (0, 0.0)
    if loop.reporter.active and not runinfo.is_tty():
      print(runinfo.format_row(row, loop.config.train.steps), flush=True)


class Checkpoint(Hook):
  """An async Orbax save every `checkpoint_every` steps; always (forced) at the end."""

  def __init__(self, every: int):
    self.every = every

  def __call__(self, loop, done, state):
    loop.ckpt.save(done, state, force=done == loop.config.train.steps)


class Eval(Hook):
  """Held-out metrics every `eval_every` steps (the final eval is the run's report)."""

  def __init__(self, every: int):
    self.every = every

  def fires(self, done, last):
    return done % self.every == 0 and done != last

  def __call__(self, loop, done, state):
    metrics = loop.task.evaluate(loop.strategy, loop.model, loop.eval_variables(state),
                                 loop.dataset)
    loop.eval_rows.append({"step": done, **metrics})
    loop.reporter.write_json("eval/history.json", loop.eval_rows)


class Profile(Hook):
  """A jax.profiler trace of `config.profile.steps` (process 0)."""

  at_end = False

  def __init__(self, steps, workdir):
    self._profiler = profiling.Profiler(steps, workdir)

  def ends_dispatch(self, done, last):
    return self._profiler.steps is not None and done in self._profiler.steps

  def before_step(self, loop, step, state):
    self._profiler.before_step(step, state)

  def close(self, loop):
    self._profiler.close()


def builtin(config, workdir: str | None) -> list[Hook]:
  """The trainer's own hooks, in the order they run at a step where several are due."""
  cfg = config.train
  return [Log(cfg.log_every), Checkpoint(cfg.checkpoint_every), Eval(cfg.eval_every),
          Profile(profiling.parse_steps(config.profile.steps), workdir)]


