"""Fault injection for the tests of the failure paths (never set in real runs).

`JAXJOB_FAULTS` is a comma-separated list:
  nan@S        the training batch of step S (0-based) gets a NaN feature
  hang@R:S     process R stops making progress (sleeps) before dispatching step S
  slow_eval@T  every periodic evaluation first sleeps T seconds

`install(loop)` adds what is asked for as hooks and a batch wrapper; with the variable
unset it changes nothing, so the step loop itself knows nothing of faults.
"""

from __future__ import annotations

import os
import time

from trainer import hooks


class Faults:

  def __init__(self, spec: str | None = None):
    spec = os.environ.get("JAXJOB_FAULTS", "") if spec is None else spec
    self.nan_steps: set[int] = set()
    self.hang: dict[int, int] = {}
    self.eval_sleep = 0.0
    for item in filter(None, (s.strip() for s in spec.split(","))):
      kind, _, where = item.partition("@")
      if kind == "nan":
        self.nan_steps.add(int(where))
      elif kind == "hang":
        rank, _, step = where.partition(":")
        self.hang[int(rank)] = int(step)
      elif kind == "slow_eval":
        self.eval_sleep = float(where)
      else:
        raise ValueError(f"JAXJOB_FAULTS: unknown fault {item!r}")

  def corrupt(self, step: int, x):
    if step in self.nan_steps:
      x = x.copy()
      x[0, 0] = float("nan")
    return x

  def maybe_hang(self, rank: int, step: int) -> None:
    if self.hang.get(rank) == step:
      while True:
        time.sleep(3600)


class _Hang(hooks.Hook):
  """Before each step: process R sleeps for good at step S (the watchdog's stack dump
  shows `maybe_hang`). Dispatches end after S - 1 and S steps on every process, so the
  last step R reads as finished is S - 1 (metrics are read one dispatch late), whatever
  the steps per dispatch."""

  def __init__(self, faults: Faults):
    self._faults = faults

  def ends_dispatch(self, done, last):
    return any(done in (step - 1, step) for step in self._faults.hang.values())

  def before_step(self, loop, step, state):
    import jax  # pylint: disable=g-import-not-at-top
    self._faults.maybe_hang(jax.process_index(), step)


class _SlowEval(hooks.Hook):
  """Sleeps right before each periodic evaluation (it sits just before the Eval hook)."""

  def __init__(self, every: int, seconds: float):
    self.every, self._seconds = every, seconds

  def fires(self, done, last):
    return done % self.every == 0 and done != last

  def __call__(self, loop, done, state):
    time.sleep(self._seconds)


def install(loop, spec: str | None = None) -> None:
  """Adds the faults `JAXJOB_FAULTS` (or `spec`) asks for to a `train.Loop`."""
  faults = Faults(spec)
  if faults.hang:
    loop.hooks.insert(0, _Hang(faults))
  if faults.eval_sleep:
    at = next(i for i, h in enumerate(loop.hooks) if isinstance(h, hooks.Eval))
    loop.hooks.insert(at, _SlowEval(loop.hooks[at].every, faults.eval_sleep))
  if faults.nan_steps:
    read = loop.read_batch

    def corrupted(step):
      local = read(step)
      return {**local, "x": faults.corrupt(step, local["x"])}

    loop.read_batch = corrupted
