"""Fault injection for the tests of the failure paths (never set in real runs).

`JAXJOB_FAULTS` is a comma-separated list:
  nan@S        the training batch of step S (0-based) gets a NaN feature
  hang@R:S     process R stops making progress (sleeps) before dispatching step S
  slow_eval@T  every periodic evaluation first sleeps T seconds
"""

from __future__ import annotations

import os
import time


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

  def maybe_slow_eval(self) -> None:
    if self.eval_sleep:
      time.sleep(self.eval_sleep)
