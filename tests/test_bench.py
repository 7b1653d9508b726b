"""Benchmarks: the harness's statistics and verdicts, the run checker, `python -m bench --quick`.

CI checks that the suite runs and prints its table and JSON lines, not its figures
(timings on a shared 2-core machine are noise; BENCHMARKS.md holds a full run's).
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from bench import harness
from bench.__main__ import table
from tests.conftest import ROOT, tiny_config
from trainer import train

VERDICTS = {"pass", "fail", "inconclusive"}


def test_paired_rounds_rotate_and_reverse_the_order():
  calls = []
  variants = {name: (lambda n=name: calls.append(n) or harness.Timing(1.0, 1.0))
              for name in ("a", "b", "c")}
  times = harness.paired_rounds(variants, rounds=4)
  assert calls == ["a", "b", "c", "a", "c", "b", "c", "a", "b", "c", "b", "a"]
  assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_verdict_is_conclusive_only_outside_the_noise():
  quiet = [0.98, 0.99, 1.0, 1.0, 1.0, 1.01, 1.02]  # A/A control: interquartile range 0.01
  noisy = [0.7, 0.9, 1.0, 1.1, 1.3, 1.0, 0.95]
  assert harness.verdict(1.03, 1.05, quiet) == "pass"
  assert harness.verdict(1.08, 1.05, quiet) == "fail"
  assert harness.verdict(1.045, 1.05, quiet) == "inconclusive"
  assert harness.verdict(1.03, 1.05, noisy) == "inconclusive"
  assert harness.verdict(1.9, 1.05, noisy) == "fail"  # a clear miss shows through noise
  offset = [1.1, 1.1, 1.1, 1.1, 1.1, 1.1, 1.1]  # identical variants that do not meet at 1
  assert harness.verdict(1.0, 1.05, offset) == "inconclusive"


def test_ratio_record_and_table():
  t = lambda *walls: [harness.Timing(w, w) for w in walls]
  times = {"bare": t(1, 1, 1, 1, 1, 1, 1), "bare_again": t(1, 1.01, 0.99, 1, 1, 1, 1),
           "trainer": t(1.2, 1.1, 1.3, 1.2, 1.2, 1.2, 1.2)}
  record = harness.ratio_record("w", "trainer/bare", times, "trainer", "bare", target=1.05)
  assert record["median"] == 1.2 and record["min"] == 1.1 and record["max"] == 1.3
  assert record["aa"]["median"] == 1.0 and record["verdict"] == "fail"
  text = table([record, {"bench": "w", "metric": "machine", "value": {}}])
  assert "trainer/bare" in text and "1.2 [1.1..1.3]" in text and "machine" not in text


def test_check_run_accepts_a_run_and_rejects_a_broken_one(tmp_path):
  from bench import check_run  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(train__steps=60, train__eval_every=30,
                                       train__checkpoint_every=30), str(workdir))
  results = list(check_run.checks(workdir, "cpu", 0.3, 60))
  assert all(passed for _, passed, _ in results), results
  assert not all(p for _, p, _ in check_run.checks(workdir, "gpu", 0.3, 60))
  (workdir / "summary.json").unlink()
  proc = subprocess.run([sys.executable, "-m", "bench.check_run", str(workdir),
                         "--platform=cpu"], cwd=ROOT, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 1 and "unreadable run directory" in proc.stdout


def test_restart_counts_only_committed_checkpoints(tmp_path):
  from bench import result  # pylint: disable=g-import-not-at-top
  for name in ("20", "40", "60.orbax-checkpoint-tmp-1733", "quarantine"):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
  assert result.committed_steps(str(tmp_path)) == [20, 40]
  assert result.committed_steps(str(tmp_path / "elsewhere")) == []


@pytest.mark.slow
def test_bare_script_learns_the_synthetic_csv(tmp_path, monkeypatch, mobile_price_csv):
  from bench import result  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("JAXJOB_DATA_DIR", str(tmp_path / "no-data-here"))
  path, source = result.data_csv(str(tmp_path))
  assert source.startswith("synthetic")
  lines = pathlib.Path(path).read_text().splitlines()
  assert lines[0] == mobile_price_csv.read_text().splitlines()[0] and len(lines) == 2001
  proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bare_mobile_price.py"), path],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert float(re.search(r"held-out accuracy ([0-9.]+)", proc.stdout).group(1)) > 0.8


@pytest.mark.slow
def test_time_to_result_runs_a_baseline_revision_beside_this_tree(tmp_path, capsys):
  from bench import result  # pylint: disable=g-import-not-at-top
  csv, source = result.data_csv(str(tmp_path))
  with result.baseline_tree("HEAD", str(tmp_path)) as tree:
    assert (pathlib.Path(tree) / "trainer" / "train.py").exists()
    result.time_to_result(csv, source, str(tmp_path), 2, baseline=("HEAD", tree))
  assert not pathlib.Path(tree).exists()
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith('{"bench"')]
  versus = [r for r in records if r["metric"] == "time to result, first run: this tree / HEAD"]
  assert len(versus) == 1 and versus[0]["baseline_s"] > 0, records
  assert versus[0]["accuracy"]["baseline_first"] > 0.8, versus


def test_gpu_script_parses():
  subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu.sh")], check=True)


@pytest.mark.slow
def test_quick_benchmarks_print_json_lines_and_a_table():
  proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT,
                        capture_output=True, text=True, timeout=420, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith('{"bench"')]
  benches = {r["bench"] for r in records}
  assert benches >= {"overhead", "balanced", "compute", "input", "checkpoint", "dp2", "dp4",
                     "dp8", "pmap4", "startup", "result"}, benches
  ratios = [r for r in records if r["metric"] == "trainer/bare"]
  assert len(ratios) == 6  # overhead, balanced, compute, dp2, dp4, dp8
  for r in ratios:
    assert r["rounds"] >= 7 and r["min"] <= r["median"] <= r["max"], r
    assert r["aa"]["min"] <= r["aa"]["median"] <= r["aa"]["max"] and r["verdict"] in VERDICTS
  to_result = [r for r in records if r["metric"].startswith("time to result")]
  assert len(to_result) == 2 and all(r["verdict"] in VERDICTS for r in to_result), to_result
  restarts = [r for r in records if r["metric"].startswith("restart: kill -9")]
  assert len(restarts) == 2 and all(r["median"] > 0 for r in restarts), restarts
  hlo = [r for r in records if r["metric"].startswith("all-reduce ops")]
  assert [r["value"] for r in hlo] and all(r["value"] >= 1 for r in hlo)
  assert re.search(r"^workload +\| metric +\| median \[min\.\.max\]", proc.stdout, re.M)
  assert "FAILED" not in proc.stdout
