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
    "nan_learning_rate": (["--config.optimizer.learning_rate=nan"],
                          "config.optimizer.learning_rate=nan: expected a finite number >= 0"),
    "negative_weight_decay": (["--config.optimizer.weight_decay=-0.1"],
                              "config.optimizer.weight_decay=-0.1: expected a finite number"),
    "misspelt_field": (["--config.trainn.steps=5"], "--config.trainn.steps: the config has no"
                       " field 'trainn'; expected 'train'?"),
    "unknown_field": (["--config.foo.bar=1"], "--config.foo.bar: the config has no field"
                      " 'foo'; expected a field the config file defines"),
    "negative_momentum": (["--config.optimizer.name=sgd", "--config.optimizer.momentum=-0.5"],
                          "config.optimizer.momentum=-0.5: expected a finite number >= 0"),
    "negative_watchdog": (["--config.train.watchdog_timeout=-1"],
                          "config.train.watchdog_timeout=-1: expected a finite number >= 0"),
    "no_skips_allowed": (["--config.train.max_consecutive_skips=0"],
                         "config.train.max_consecutive_skips=0: expected a finite number >= 1"),
    "negative_initialization_timeout": (["--config.distributed.initialization_timeout=-5"],
                                        "config.distributed.initialization_timeout=-5: expected"
                                        " a finite number >= 1"),
    "negative_width_layer": (["--config.model.hidden=-4,8"],
                             "config.model.name='mlp' could not be initialised and applied on"
                             " examples of shape (1, 64) float32: TypeError: "),
    "cnn_on_table_rows": ([MOBILE, f"--config.data.path={DATA_DIR / 'train.csv'}",
                           "--config.model.name=cnn"],
                          "config.model.name='cnn' could not be initialised and applied on"
                          " examples of shape (1, 20) float32"),
    "negative_heartbeat": (["--config.distributed.heartbeat_timeout=-5"],
                           "config.distributed.heartbeat_timeout=-5: expected a finite number"
                           " >= 1"),
    "nan_clip_norm": (["--config.optimizer.grad_clip_norm=nan"],
                      "config.optimizer.grad_clip_norm=nan: expected a finite number >= 0"),
    "momentum_past_one": (["--config.optimizer.name=sgd", "--config.optimizer.momentum=5"],
                          "config.optimizer.momentum=5.0: expected a value in [0, 1)"),
    "no_class_named": (["--config.data.classes=,"], "config.data.classes=',' names no class"),
    "bad_bucket_name": ([MOBILE, "--config.data.path=gs://BAD_Bucket!/x.csv"],
                        "gs://BAD_Bucket!/x.csv: no valid bucket name after gs://"),
    "feature_named_twice": ([MOBILE, f"--config.data.path={DATA_DIR / 'train.csv'}",
                             "--config.data.feature_columns=ram,ram"],
                            "config.data.feature_columns lists 'ram' more than once"),
    "carriage_returns_only": ([MOBILE, "--config.data.path=CR_ONLY"],
                              "line 1: new-line character seen in unquoted field; expected a"
                              " comma-separated header line"),
    "fractional_width": (["--config.model.hidden=1.5,2.5"],
                         "config.model.hidden=(1.5, 2.5): expected whole layer widths"),
    "profile_past_the_end": (["--config.train.steps=60", "--config.profile.steps=100,200"],
                             "config.profile.steps='100,200' starts past the run's last step"),
    "state_past_memory": (["--config.model.hidden=1000000000"],  # 838 GiB on 8 devices
                          "the train state (parameters and optimiser state) needs"),
    "synthetic_without_classes": (["--config.data.source=synthetic",
                                   "--config.data.num_classes=0"],
                                  "config.data.num_classes=0: expected an integer >= 2"),
    "images_for_an_mlp": (["--config.data.images=True"],
                          "task classification: the model's outputs for one example of shape"
                          " (1, 8, 8, 1) have shape (1, 8, 8, 10); expected (1, 10)"),
    "label_only_csv": ([MOBILE, "--config.data.path=LABEL_ONLY"], "the label column"
                       " 'price_range' is its only column; expected at least one feature"),
    "float32_overflow": ([MOBILE, "--config.data.path=HUGE"], "line 3, column 'battery_power':"
                         " '1e300' is past float32's range"),
    "no_feature_named": ([MOBILE, f"--config.data.path={DATA_DIR / 'train.csv'}",
                          "--config.data.feature_columns=,"],
                         "config.data.feature_columns=',' names no column; expected"),
    "zero_width_layer": (["--config.model.hidden=0,64"],
                         "parameter hidden_0.bias has shape (0,), with no elements; expected"
                         " positive layer sizes"),
    "model_not_callable": (["--config.model.name=math:pi"],
                           "config.model.name='math:pi': math:pi is a float; expected a class"),
    "task_not_a_task": (["--config.task=math:pi"],
                        "config.task='math:pi': float is not a trainer.tasks.Task"),
    "http_data_path": ([MOBILE, "--config.data.path=http://example.invalid/x.csv"],
                       "http://example.invalid/x.csv: http:// is not supported; expected a"
                       " local path or a gs:// URL"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
  args, expected = BAD_INPUTS[case]
  env = {}
  if case == "bad_process_env":
    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "2"}
  # A CSV with just the label column, and one whose first feature cell is 1e300.
  (tmp_path / "label_only.csv").write_text("price_range\n0\n1\n")
  (tmp_path / "huge.csv").write_text("battery_power,price_range\n5,0\n1e300,1\n")
  (tmp_path / "cr.csv").write_bytes(b"ram,price_range\r5,0\r6,1\r")  # old Mac line ends
  args = [a.replace("LABEL_ONLY", str(tmp_path / "label_only.csv"))
          .replace("HUGE", str(tmp_path / "huge.csv"))
          .replace("CR_ONLY", str(tmp_path / "cr.csv")) for a in args]
  workdir = tmp_path / "run"
  proc = run_trainer([*args, f"--workdir={workdir}"], env=env, timeout=120)
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert expected in lines[0]
  assert not workdir.exists()


def _one_line_exit_2(proc, expected: str) -> None:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]


def test_a_workdir_url_of_another_scheme_is_refused(tmp_path):
  proc = run_trainer(["--config.train.steps=60", "--workdir=s3://bucket/run"], cwd=tmp_path,
                     timeout=120)
  _one_line_exit_2(proc, "s3://bucket/run: s3:// is not supported; expected a local path or a"
                   " gs:// URL")
  assert not list(tmp_path.iterdir())  # no ./s3:/bucket/run


def test_a_config_file_that_raises_is_bad_input(tmp_path):
  config = tmp_path / "raises.py"
  config.write_text("def get_config():\n  raise RuntimeError('no such experiment')\n")
  proc = run_trainer([f"--config={config}", f"--workdir={tmp_path / 'run'}"], timeout=120)
  _one_line_exit_2(proc, f"the config file {config} failed to load: RuntimeError: no such"
                   " experiment")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]"])
def test_a_corrupt_run_json_is_refused_and_left_as_it_is(tmp_path, content):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "run.json").write_text(content)
  for extra in ([], ["--allow_config_change"]):
    proc = run_trainer(["--config.train.steps=60", f"--workdir={workdir}", *extra], timeout=120)
    _one_line_exit_2(proc, f"{workdir}/run.json is ")
    assert "expected the run record a run writes" in proc.stderr
    assert [p.name for p in workdir.iterdir()] == ["run.json"]
    assert (workdir / "run.json").read_text() == content


@pytest.mark.parametrize("entry, make, expected", [
    ("checkpoints", lambda p: p.write_text(""), "checkpoints there is not a folder"),
    ("run.json", lambda p: p.mkdir(), "run.json is not a file"),
])
def test_a_workdir_entry_of_the_wrong_kind_is_refused_and_left(tmp_path, entry, make,
                                                                expected):
  workdir = tmp_path / "run"
  workdir.mkdir()
  make(workdir / entry)
  proc = run_trainer(["--config.train.steps=60", f"--workdir={workdir}"], timeout=120)
  _one_line_exit_2(proc, expected)
  assert [p.name for p in workdir.iterdir()] == [entry]


def test_a_config_name_that_would_leave_runs_is_refused(tmp_path):
  # Without --workdir the run goes to runs/<config.name>-<time>, below the current folder.
  for name in ("../escaped", "/tmp/absolute", ""):
    proc = run_trainer([f"--config.name={name}", "--config.train.steps=60"], cwd=tmp_path,
                       timeout=120)
    _one_line_exit_2(proc, f"config.name={name!r} names the default workdir")
  assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent / "escaped").exists()


def test_a_new_workdir_is_not_left_behind_by_bad_input_found_after_its_check(tmp_path):
  # The W&B writer starts after the workdir's write check, which made the folder.
  workdir = tmp_path / "run"
  proc = run_trainer(["--config.train.steps=60", "--config.report.wandb_project=x",
                      f"--workdir={workdir}"], timeout=120,
                     env={"WANDB_API_KEY": "", "WANDB_MODE": "online",
                          "NETRC": str(tmp_path / "no-netrc"), "HOME": str(tmp_path / "home")})
  _one_line_exit_2(proc, "config.report.wandb_project='x'")
  assert not workdir.exists()


@pytest.mark.parametrize("trainer_flags, expected", [
    (["--config.train.steps=5"], "unrecognized arguments: --config.train.steps=5"),
    (["--", "--config.name=a\nb"], "control characters"),
    (["--port=70000"], "--port=70000: expected a TCP port"),
    (["--port=-1"], "--port=-1: expected a TCP port"),
    (["--grace-period=nan"], "--grace-period=nan: expected a number of seconds >= 0"),
    (["--processes=100000"], "--processes=100000, --devices-per-process=4: expected 1 to 256"),
])
def test_launch_local_checks_trainer_flags_like_every_launcher(trainer_flags, expected):
  proc = subprocess.run([sys.executable, "-m", "launch", "local", "--dry-run", *trainer_flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout
