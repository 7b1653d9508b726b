"""Metric writers (TensorBoard, Weights & Biases offline), step marks in traces, profiler port."""

import glob
import json
import struct
import subprocess
import sys

import pytest

from tests.conftest import ROOT, tiny_config
from trainer import profiling
from trainer import train
from trainer import writers
from trainer.errors import UserError

FAKE_KEY = "jaxjobtestkey" + "0" * 27  # 40 characters, the shape of a real W&B key


def _wandb_records(path: str) -> list:
  """The protobuf records of a W&B `.wandb` file (a LevelDB-style log of 32 KiB blocks)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    raw = f.read()
  assert raw[:4] == b":W&B", raw[:7]
  block, pos, chunk, records = 32 * 1024, 7, b"", []
  while pos + 7 <= len(raw):
    room = block - pos % block
    _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
    if room < 7 or (length == 0 and kind == 0):  # the rest of the block is padding
      pos += room
      continue
    chunk += raw[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST: one whole record
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b""
  return records


@pytest.mark.slow
def test_wandb_offline_run_holds_the_logged_metrics_and_no_key(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "run"
  config = tiny_config(train__steps=30, train__eval_every=30, train__checkpoint_every=30,
                       report__wandb_project="jaxjob-test", optimizer__warmup_steps=5)
  train.train_and_evaluate(config, str(workdir))

  runs = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
  assert len(runs) == 1, runs
  assert runs[0].endswith(f"run-{writers.run_id(str(workdir))}.wandb")
  records = _wandb_records(runs[0])
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert run.project == "jaxjob-test" and run.display_name == "run"
  config_keys = {u.key for u in run.config.update}
  assert {"train", "model", "report"} <= config_keys
  history = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
               for i in r.history.item}
      history[items["_step"]] = items
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert sorted(history) == [r["step"] for r in rows] == [10, 20, 30]
  for row in rows:
    for key in ("loss", "accuracy", "grad_norm", "learning_rate", "examples_per_s"):
      assert history[row["step"]][key] == pytest.approx(row[key], rel=1e-6), key
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))

  # The key is read from the environment by wandb only: no file of the run holds it.
  assert "wandb_project" in (workdir / "run.json").read_text()
  for path in glob.glob(str(workdir / "**" / "*"), recursive=True):
    try:
      with open(path, "rb") as f:
        assert FAKE_KEY.encode() not in f.read(), path
    except IsADirectoryError:
      pass


def test_wandb_writer_without_the_package_is_a_user_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  with pytest.raises(UserError, match=r"wandb_project='p' needs the wandb package: pip"
                                      r" install 'jaxjob\[wandb\]'"):
    writers.create(tiny_config(report__wandb_project="p"), str(tmp_path))


def test_tensorboard_only_by_default(tmp_path):
  made = writers.create(tiny_config(), str(tmp_path))
  assert [type(w).__name__ for w in made] == ["TensorBoardWriter"]
  made[0].write_scalars(1, {"loss": 0.5})
  made[0].close()
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


_WITHOUT_CLIENTS = """
import sys
from trainer import writers
tensorboardx = writers.import_tensorboardx()
print(tensorboardx.record_writer.GCS_ENABLED, "google.cloud.storage" in sys.modules)
from google.cloud import storage  # afterwards, as usual
print(storage.Client.__name__)
"""
_OTHER_THREAD = """
import sys, threading
from trainer import writers
refuse = writers._RefusedOnThreads({"google.cloud.storage"})
sys.meta_path.insert(0, refuse)
refuse.threads.add(threading.get_ident())
try:
  from google.cloud import storage
except ImportError:
  print("refused")
imported = []
thread = threading.Thread(target=lambda: imported.append(__import__("google.cloud.storage")))
thread.start()
thread.join()
print(sys.modules["google.cloud.storage"].Client.__name__)
"""


@pytest.mark.parametrize("script,expected", [(_WITHOUT_CLIENTS, "False False Client"),
                                             (_OTHER_THREAD, "refused Client")])
def test_tensorboardx_is_imported_without_its_cloud_clients(script, expected):
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == expected.split()


_WALK_WHILE_IMPORTING = """
import importlib.machinery, sys, threading
sys.setswitchinterval(1e-6)  # switch threads often: mid-walk, mid-import
from trainer import writers
writers.import_tensorboardx()  # tensorboardX is cached from now on: each call is quick
stop, skipped = threading.Event(), []

def keep_importing():
  while not stop.is_set():
    writers.import_tensorboardx()

thread = threading.Thread(target=keep_importing)
thread.start()
for _ in range(200000):  # what an import does: walk sys.meta_path, finder by finder
  if not any(f is importlib.machinery.PathFinder for f in sys.meta_path):
    skipped.append(1)
stop.set()
thread.join()
print(len(skipped), sum(f is writers._REFUSER for f in sys.meta_path))
"""


def test_importing_tensorboardx_never_hides_a_finder_from_another_threads_import():
  # sys.meta_path used to lose its refusing finder after each import: a concurrent walk
  # then skipped the next finder (PathFinder), and scipy failed to import in CI.
  proc = subprocess.run([sys.executable, "-c", _WALK_WHILE_IMPORTING], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["0", "1"]


@pytest.mark.parametrize("port", [-1, 65536, "6009", 1.5])
def test_bad_profiler_port_is_a_user_error(port):
  with pytest.raises(UserError, match="config.profile.server_port=.*expected 0 \\(off\\)"):
    profiling.start_server(port)


def test_profiler_server_is_off_by_default():
  assert profiling.start_server(0) is None and profiling._server is None  # pylint: disable=protected-access


@pytest.mark.slow
def test_trace_marks_every_traced_step(tmp_path):
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(train__steps=6, train__eval_every=6,
                                       train__checkpoint_every=6, profile__steps="2,5",
                                       optimizer__warmup_steps=2),
                           str(workdir))
  traces = glob.glob(str(workdir / "profile" / "**" / "*.xplane.pb"), recursive=True)
  assert traces, list(workdir.rglob("*"))
  with open(traces[0], "rb") as f:
    raw = f.read()
  # StepTraceAnnotation("train", step_num=N) records its name and a step_num stat.
  assert b"step_num" in raw and b"train" in raw


def test_a_run_resumes_with_other_observability_settings(tmp_path):
  workdir = str(tmp_path / "run")
  short = dict(train__steps=10, train__eval_every=10, train__checkpoint_every=10,
               optimizer__warmup_steps=2)
  first = train.train_and_evaluate(tiny_config(**short), workdir)
  again = train.train_and_evaluate(
      tiny_config(**short, profile__steps="1,2", report__wandb_entity="team"), workdir)
  assert again["resumed_from_step"] == 10
  assert again["params_sha256"] == first["params_sha256"]
