"""Checks a finished run directory: `python -m bench.check_run WORKDIR [options]`.

Used by bench/gpu.sh after the end-to-end jobs: summary.json, run.json (exit 0, the
expected platform), metrics.jsonl, committed checkpoints, eval report and plot. Prints
one line per check and exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def checks(workdir: pathlib.Path, platform: str, min_accuracy: float, steps: int | None):
  summary = json.loads((workdir / "summary.json").read_text())
  run = json.loads((workdir / "run.json").read_text())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  ckpts = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  final = steps or summary["final_step"]
  yield "summary.json final_step", summary["final_step"] == final, summary["final_step"]
  yield (f"held-out accuracy >= {min_accuracy}", summary["eval"]["accuracy"] >= min_accuracy,
         round(summary["eval"]["accuracy"], 4))
  yield "run.json exit code 0", run["starts"][-1]["exit"]["code"] == 0, run["starts"][-1]["exit"]
  yield (f"run.json platform {platform}", run["devices"]["platform"] == platform,
         f"{run['devices']['platform']} ({run['devices']['kind']} x{run['devices']['count']})")
  yield "metrics.jsonl reaches the last step", bool(rows) and rows[-1]["step"] == final, len(rows)
  yield "committed checkpoint at the last step", bool(ckpts) and ckpts[-1] == final, ckpts
  yield "eval/report.json", (workdir / "eval" / "report.json").is_file(), ""
  yield "plots/history.png", (workdir / "plots" / "history.png").stat().st_size > 1000, ""
  yield "examples_per_second", bool(summary.get("examples_per_second")), summary.get(
      "examples_per_second")


def main() -> int:
  parser = argparse.ArgumentParser(prog="python -m bench.check_run")
  parser.add_argument("workdir", type=pathlib.Path)
  parser.add_argument("--platform", default="gpu")
  parser.add_argument("--min-accuracy", type=float, default=0.0)
  parser.add_argument("--steps", type=int, default=None)
  args = parser.parse_args()
  ok = True
  try:
    for name, passed, detail in checks(args.workdir, args.platform, args.min_accuracy,
                                       args.steps):
      print(f"{'ok  ' if passed else 'FAIL'} {args.workdir.name}: {name} ({detail})")
      ok &= bool(passed)
  except (OSError, KeyError, ValueError) as e:
    print(f"FAIL {args.workdir.name}: unreadable run directory: {type(e).__name__}: {e}")
    ok = False
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
