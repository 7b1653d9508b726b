"""Paired, interleaved timing rounds; ratios with an A/A control; JSON lines.

The protocol (research/perf-anchors.md section 6.1): every variant of a workload runs in
the same process on the same compiled step, in R >= 7 rounds; each round times one
block of K steps of every variant, in an order rotated (and reversed on odd rounds) from
round to round so drift cancels. A ratio is the median over rounds of the per-round
ratio B/A, reported with its min and max. One variant is the baseline run twice (A/A):
its spread is this run's noise, and a verdict is "inconclusive" when the target lies
within that noise of the measurement.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import jax

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Timing:
  wall: float  # seconds
  cpu: float  # process CPU seconds (every thread)


class CompileCounter:
  """Counts XLA backend compilations while `armed` (jax.monitoring listener)."""

  def __init__(self):
    self.armed = False
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if self.armed and event == BACKEND_COMPILE_EVENT:
      self.count += 1


COMPILES = CompileCounter()


def timed(fn: Callable[[], None]) -> Timing:
  """Times `fn()`; compilations during it are counted as recompiles."""
  COMPILES.armed = True
  try:
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    t1, c1 = time.perf_counter(), time.process_time()
  finally:
    COMPILES.armed = False
  return Timing(t1 - t0, c1 - c0)


def paired_rounds(variants: dict[str, Callable[[], Timing]],
                  rounds: int) -> dict[str, list[Timing]]:
  """Runs every variant once per round, in a rotated order; returns the timings by name."""
  names = list(variants)
  out = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in (order[::-1] if r % 2 else order):
      out[name].append(variants[name]())
  return out


def ratios(times: dict[str, list[Timing]], num: str, den: str, cpu: bool = False) -> list[float]:
  pick = (lambda t: t.cpu) if cpu else (lambda t: t.wall)
  return [pick(a) / pick(b) for a, b in zip(times[num], times[den])]


def summary(values: list[float]) -> dict:
  return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def quartile_spread(values: list[float]) -> float:
  """Width of the middle half of the values (the interquartile range)."""
  q = statistics.quantiles(values, n=4, method="inclusive")
  return q[2] - q[0]


def verdict(value: float, target: float, aa: list[float], aa_center: float = 1.0) -> str:
  """pass / fail / inconclusive for `value` (lower is better) against `target`.

  The noise is the A/A control's interquartile range plus its median's offset from
  `aa_center` (where identical variants should meet). The verdict is conclusive only
  when the target lies outside value +/- noise: pass when value + noise <= target, fail
  when value - noise > target. A noisy control can therefore still show a clear miss,
  but never a pass that the noise could explain.
  """
  noise = quartile_spread(aa) + abs(statistics.median(aa) - aa_center)
  if value + noise <= target:
    return "pass"
  if value - noise > target:
    return "fail"
  return "inconclusive"


def ratio_record(bench: str, metric: str, times, num: str, den: str, *, target: float | None,
                 aa=("bare_again", "bare"), **extra) -> dict:
  """A JSON-able record of ratio num/den, its A/A control and the verdict."""
  r = ratios(times, num, den)
  control = ratios(times, *aa)
  best = lambda a, b: round(min(t.wall for t in times[a]) / min(t.wall for t in times[b]), 4)
  record = {"bench": bench, "metric": metric, **_rounded(summary(r)),
            "aa": _rounded(summary(control)), "aa_iqr": round(quartile_spread(control), 4),
            "rounds": len(r),
            # Secondary estimates, less sensitive to other processes on the machine: the
            # median ratio of process CPU time, and the ratio of each variant's best block.
            "cpu": _rounded(summary(ratios(times, num, den, cpu=True))),
            "aa_cpu": _rounded(summary(ratios(times, *aa, cpu=True))),
            "best": best(num, den), "aa_best": best(*aa),
            "wall_s": {v: [round(t.wall, 5) for t in times[v]] for v in {num, den, *aa}}}
  if target is not None:
    record["target"] = f"<= {target}"
    record["verdict"] = verdict(record["median"], target, control)
  record.update(extra)
  return record


def overhead_record(bench: str, times, num: str, den: str, steps: int, *, target_us: float,
                    aa=("bare_again", "bare"), **extra) -> dict:
  """Added microseconds per step of num over den, with the A/A control in microseconds."""
  per_step = lambda a, b: [(x.wall - y.wall) / steps * 1e6 for x, y in zip(times[a], times[b])]
  added, control = per_step(num, den), per_step(*aa)
  record = {"bench": bench, "metric": f"{num} - {den} (us/step)", **_rounded(summary(added), 1),
            "aa": _rounded(summary(control), 1), "aa_iqr": round(quartile_spread(control), 1),
            "rounds": len(added), "target": f"<= {target_us}",
            "verdict": verdict(statistics.median(added), target_us, control, aa_center=0.0)}
  record.update(extra)
  return record


def _rounded(d: dict, digits: int = 4) -> dict:
  return {k: round(v, digits) for k, v in d.items()}


def emit(record: dict) -> None:
  """One JSON line on stdout (the orchestrator collects lines that start with {"bench")."""
  print(json.dumps(record, sort_keys=False), flush=True)


def machine() -> dict:
  devices = jax.devices()
  return {"cpu": _cpu_model(), "nproc": os.cpu_count(), "python": sys.version.split()[0],
          "jax": jax.__version__, "platform": devices[0].platform,
          "device_kind": devices[0].device_kind, "devices": len(devices),
          "host": platform.node(), "date": time.strftime("%Y-%m-%d")}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def steps_for(block_seconds: float, step_seconds: float, lo: int = 5, hi: int = 2000) -> int:
  """Steps per timed block so that one block lasts about `block_seconds`."""
  return int(min(hi, max(lo, round(block_seconds / max(step_seconds, 1e-6)))))
