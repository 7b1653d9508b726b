"""`python -m trainer` as a user runs it: the main job, and bad input ending in exit 2."""

import json
import subprocess
import sys

import pytest

from tests.conftest import DATA_DIR, ROOT, run_trainer


def test_main_job_defaults_to_a_run_directory_under_runs(tmp_path):
  proc = run_trainer(["--config.train.steps=40", "--config.optimizer.warmup_steps=5"],
                     cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (run,) = (tmp_path / "runs").iterdir()
  assert run.name.startswith("default-")
  summary = json.loads((run / "summary.json").read_text())
  assert summary["final_step"] == 40 and summary["num_devices"] == 8
  assert f"-> {run}" in proc.stdout


MOBILE = "--config=trainer/configs/mobile_price.py"
BAD_INPUTS = {
    "unknown_flag": (["--bogus=1"], "Unknown command line flag 'bogus'"),
    "unknown_config_key": (["--config.train.stpes=10"], "stpes"),
    "bad_config_value_type": (["--config.train.steps=many"], "steps"),
    "bad_config_value": (["--config.parallel.strategy=tp"], "config.parallel.strategy='tp'"),
    "missing_config_file": (["--config=trainer/configs/nope.py"], "nope.py"),
    "missing_csv": ([MOBILE, "--config.data.path=/nonexistent/train.csv"],
                    "/nonexistent/train.csv: file not found"),
    "empty_data_path": ([MOBILE], "config.data.path is empty"),
    "regression_task_on_classes": (["--config=trainer/configs/breast_cancer.py",
                                    "--config.task=regression"],
                                   "task regression: the data set's labels are 2 classes"),
    "classification_task_on_a_target": (["--config=trainer/configs/diabetes.py",
                                         "--config.task=classification"],
                                        "task classification: the data set has 0 class(es)"),
    "unlabelled_test_split": ([MOBILE, f"--config.data.path={DATA_DIR / 'test.csv'}"],
                              "no label column 'price_range'"),
    "negative_seed": (["--config.seed=-1"], "config.seed=-1: expected an integer in [0, 2**32)"),
    "indivisible_batch": (["--config.train.batch_size=100"], "multiple of the device count"),
    "bad_process_env": ([], "JAX_PROCESS_ID=2 must be below JAX_NUM_PROCESSES=2"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
  args, expected = BAD_INPUTS[case]
  env = {}
  if case == "bad_process_env":
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "2"}
  workdir = tmp_path / "run"
  proc = run_trainer([*args, f"--workdir={workdir}"], env=env, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert expected in lines[0]
  assert not workdir.exists()


@pytest.mark.parametrize("trainer_flags, expected", [
    (["--config.train.steps=5"], "unrecognized arguments: --config.train.steps=5"),
    (["--", "--config.name=a\nb"], "control characters"),
])
def test_launch_local_checks_trainer_flags_like_every_launcher(trainer_flags, expected):
  proc = subprocess.run([sys.executable, "-m", "launch", "local", "--dry-run", *trainer_flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
