"""`python -m bench --quick | --full`: every CPU workload, then a table.

Each workload runs in a fresh process (`python -m bench.workloads NAME MODE`) with its
own virtual CPU device count; its JSON lines are echoed as they arrive and the table is
printed at the end. Every figure is a ratio (or a difference) measured inside one run;
see BENCHMARKS.md for the method and the targets. Exit status 1 when a workload
crashed; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The revision `--baseline` names, for the result workload's process.
BASELINE_ENV = "JAXJOB_BENCH_BASELINE"
# (workload, virtual CPU devices)
WORKLOADS = [("overhead", 1), ("balanced", 1), ("compute", 1), ("checkpoint", 1),
             ("dp", 2), ("dp", 4), ("dp", 8), ("pmap", 4), ("startup", 1), ("result", 1)]


def _run_workload(name: str, devices: int, mode: str, timeout: float) -> tuple[list[dict], str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAXJOB_FAULTS"] = ""
  # No persistent compilation cache in the workload itself: every compilation is one
  # (the recompile counter sees it), whatever an earlier run left. startup and result
  # give their child processes the caches they measure.
  env["JAXJOB_COMPILATION_CACHE_DIR"] = "off"
  argv = [sys.executable, "-m", "bench.workloads", name, mode]
  records = []
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    err += f"\ntimed out after {timeout:.0f} s"
  for line in out.splitlines():
    if line.startswith('{"bench"'):
      records.append(json.loads(line))
      print(line, flush=True)
  failed = proc.returncode != 0
  return records, (err.strip().splitlines()[-1] if failed and err.strip() else
                   "" if not failed else f"exit {proc.returncode}")


def _cell(record: dict) -> str:
  if "median" in record:
    spread = f" [{record['min']:.4g}..{record['max']:.4g}]" if "min" in record else ""
    return f"{record['median']:.4g}{spread}"
  value = record.get("value")
  return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def table(records: list[dict]) -> str:
  rows = [("workload", "metric", "median [min..max]", "A/A median [min..max]", "target",
           "verdict", "cpu (A/A)", "best (A/A)")]
  for r in records:
    if r.get("metric") == "machine":
      continue
    aa = r.get("aa")
    aa_cell = f"{aa['median']:.4g} [{aa['min']:.4g}..{aa['max']:.4g}]" if aa else ""
    unit = f" {r['unit']}" if "unit" in r else ""
    cpu = f"{r['cpu']['median']:.4g} ({r['aa_cpu']['median']:.4g})" if "cpu" in r else ""
    best = f"{r['best']:.4g} ({r['aa_best']:.4g})" if "best" in r else ""
    rows.append((r["bench"], r["metric"], _cell(r) + unit, aa_cell, r.get("target", ""),
                 r.get("verdict", ""), cpu, best))
  widths = [min(60, max(len(str(row[i])) for row in rows)) for i in range(len(rows[0]))]
  lines = [" | ".join(str(c)[:60].ljust(w) for c, w in zip(row, widths)) for row in rows]
  lines.insert(1, "-+-".join("-" * w for w in widths))
  return "\n".join(lines)


def main() -> int:
  parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_const", const="quick", dest="mode",
                     help="7 rounds of short blocks (CI; about 3 to 4 minutes on 2 cores)")
  group.add_argument("--full", action="store_const", const="full", dest="mode",
                     help="15 rounds of longer blocks (about 10 minutes on 2 cores)")
  parser.add_argument("--only", default="", help="comma-separated workloads, e.g. overhead,dp")
  parser.add_argument("--out", default="", help="also write every JSON line to this file")
  parser.add_argument("--baseline", default="",
                      help="a git revision: the result workload also times the trainer at that"
                           " revision (a git worktree), paired with this tree's, to measure a"
                           " change")
  args = parser.parse_args()
  if args.baseline:
    os.environ[BASELINE_ENV] = args.baseline
  mode = args.mode or "quick"
  only = {w for w in args.only.split(",") if w}
  start = time.time()
  records, failures = [], []
  for name, devices in WORKLOADS:
    if only and name not in only:
      continue
    began = time.time()
    got, error = _run_workload(name, devices, mode, timeout=600 if mode == "full" else 300)
    print(f"# {name} ({devices} device(s)): {time.time() - began:.0f} s", flush=True)
    records += got
    if error:
      failures.append(f"{name} ({devices} devices): {error}")
      print(f"workload {name} ({devices} devices) failed: {error}", file=sys.stderr, flush=True)
  if args.out:
    pathlib.Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records))
  print(f"\njaxjob benchmarks ({mode}), {time.strftime('%Y-%m-%d %H:%M')},"
        f" {time.time() - start:.0f} s")
  machine = next((r["value"] for r in records if r.get("metric") == "machine"), {})
  if machine:
    print(f"machine: {machine.get('cpu')} x{machine.get('nproc')}, jax {machine.get('jax')},"
          f" {machine.get('platform')}")
  print(table(records))
  for failure in failures:
    print(f"FAILED: {failure}")
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
