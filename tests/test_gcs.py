"""The trainer on `gs://` against a real GCS emulator on 127.0.0.1 (no storage mocks).

fake-gcs-server (tests/gcs_emulator.py) serves the JSON API that gcsfs, tensorstore and
google-cloud-storage speak; a small proxy in front of it injects 503s, connection resets,
403s and a stalled upload. Every run reads its CSV from the bucket and writes its whole
workdir there. `params_sha256` of each gs:// run must equal that of the same 60-step run
on local disk (constant learning rate, so a 40-step run resumed to 60 is the same
computation).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jax
import pytest

from tests import gcs_emulator
from tests.conftest import DATA_DIR, ROOT, tiny_config
from trainer import checkpoint
from trainer import lease
from trainer import storage
from trainer import train
from trainer.errors import StorageError, UserError

BUCKET = "jaxjob-test"
CSV_URL = f"gs://{BUCKET}/data/train.csv"
FLAGS = ["--config=trainer/configs/mobile_price.py", f"--config.data.path={CSV_URL}",
         "--config.optimizer.schedule=constant", "--config.train.checkpoint_every=20",
         "--config.train.eval_every=20", "--config.train.log_every=10"]
RUN_FILES = {"run.json", "metrics.jsonl", "data_stats.json", "summary.json", "eval/report.txt",
             "eval/report.json", "eval/history.json", "plots/history.png"}


@pytest.fixture(scope="module")
def emulator():
  fake = gcs_emulator.FakeGCS().start()
  fake.create_bucket(BUCKET)
  fake.upload(BUCKET, "data/train.csv", (DATA_DIR / "train.csv").read_bytes())
  import fsspec.config  # pylint: disable=g-import-not-at-top
  saved = dict(fsspec.config.conf.get("gcs", {}))
  yield fake
  fake.close()
  fsspec.config.conf["gcs"] = saved


@pytest.fixture(autouse=True)
def _restore_environ():
  # `storage.configure()` sets variables the test did not; none may outlive the test.
  saved = dict(os.environ)
  yield
  os.environ.clear()
  os.environ.update(saved)


@pytest.fixture
def gcs_env(emulator, tmp_path):
  """Points this process's GCS clients at `url` (default: the emulator)."""

  def point_at(url: str = emulator.url) -> None:
    for key in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_APPLICATION_CREDENTIALS",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
      os.environ.pop(key, None)
    os.environ.update(gcs_emulator.env(url, str(tmp_path)))

  point_at()
  return point_at


@pytest.fixture(scope="module")
def reference_sha(tmp_path_factory):
  """params_sha256 of the 60-step run, on local disk, in this process."""
  config = tiny_config("mobile_price.py", data__path=str(DATA_DIR / "train.csv"),
                       optimizer__schedule="constant", train__steps=60,
                       train__checkpoint_every=20, train__eval_every=20)
  workdir = tmp_path_factory.mktemp("reference") / "run"
  return train.train_and_evaluate(config, str(workdir))["params_sha256"]


def _trainer(args, url, tmp_path, **kwargs):
  env = gcs_emulator.subprocess_env(url, str(tmp_path))
  return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False, **kwargs)


def _summary(emulator, run: str) -> dict:
  return json.loads(emulator.download(BUCKET, f"runs/{run}/summary.json"))


def _committed_steps(names: list[str], run: str) -> list[int]:
  prefix = f"runs/{run}/checkpoints/"
  return sorted(int(n[len(prefix):].split("/")[0]) for n in names
                if n.startswith(prefix) and n.endswith("/commit_success.txt")
                and n.count("/") == 4 and n[len(prefix):].split("/")[0].isdigit())


def _upload_status(url: str, data: bytes, headers=None) -> int:
  request = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status
  except urllib.error.HTTPError as e:
    return e.code


def test_emulator_is_loopback_only_and_its_precondition_gap_is_known(emulator):
  with open("/proc/net/tcp", encoding="ascii") as f:
    listening = [line.split()[1] for line in f.readlines()[1:] if line.split()[3] == "0A"]
  ours = [address for address in listening if int(address.split(":")[1], 16) == emulator.port]
  assert ours == ["0100007F:%04X" % emulator.port]
  # Precondition self-test (docs/gcs.md, "Emulator gaps"). Multipart uploads, which
  # google-cloud-storage sends, honour ifGenerationMatch=0 ...
  upload = f"{emulator.url}/upload/storage/v1/b/{BUCKET}/o"
  body = lambda data: (b"--B\r\nContent-Type: application/json\r\n\r\n{\"name\": \"pre-mp\"}"
                       b"\r\n--B\r\nContent-Type: text/plain\r\n\r\n" + data + b"\r\n--B--\r\n")
  multipart = {"Content-Type": "multipart/related; boundary=B"}
  url = f"{upload}?uploadType=multipart&ifGenerationMatch=0"
  assert _upload_status(url, body(b"1"), multipart) == 200
  assert _upload_status(url, body(b"2"), multipart) == 412
  assert emulator.download(BUCKET, "pre-mp") == b"1"
  # ... but media uploads, which tensorstore sends for OCDBT manifests, ignore it: a
  # conditional-write race or a lost-answer retry that GCS rejects with 412 succeeds
  # here. If this starts failing, the emulator closed the gap: update docs/gcs.md.
  url = f"{upload}?uploadType=media&name=pre-media&ifGenerationMatch=0"
  assert [_upload_status(url, b"1"), _upload_status(url, b"2")] == [200, 200]
  assert emulator.download(BUCKET, "pre-media") == b"2"


def test_configure_points_every_client_at_the_emulator():
  os.environ["STORAGE_EMULATOR_HOST"] = "127.0.0.1:4443"
  os.environ.pop("TENSORSTORE_GCS_HTTP_URL", None)
  os.environ.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", None)
  storage.path("gs://bucket/x")
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
  assert os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
  os.environ["TENSORSTORE_GCS_HTTP_URL"] = "http://127.0.0.1:9999"
  storage.configure()
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:9999"  # Left alone.


def test_retry_backs_off_on_transient_errors_only(monkeypatch):
  sleeps = []
  monkeypatch.setattr(storage.time, "sleep", sleeps.append)
  attempts = []

  def flaky():
    attempts.append(1)
    if len(attempts) < 4:
      raise ConnectionResetError("reset by peer")
    return "ok"

  assert storage.retry(flaky) == "ok"
  assert sleeps == [1.0, 2.0, 4.0]

  def forbidden():
    attempts.append(1)
    raise PermissionError("Forbidden")

  attempts.clear()
  with pytest.raises(PermissionError):
    storage.retry(forbidden)
  assert len(attempts) == 1
  with pytest.raises(ConnectionResetError):
    storage.retry(flaky, deadline_s=0)


@pytest.mark.timeout(120)
def test_small_files_survive_503s_and_resets(emulator, gcs_env):
  proxy = gcs_emulator.FaultProxy(emulator.url, fail_rate=0.3, reset_rate=0.1).start()
  try:
    gcs_env(proxy.url)
    workdir = f"gs://{BUCKET}/runs/small-files"
    storage.check_writable(workdir)
    for i in range(6):
      storage.write_json(f"{workdir}/f{i}.json", {"i": i, "pad": "x" * 1000 * i})
    storage.write_bytes(f"{workdir}/blob.bin", bytes(range(256)) * 64)
    assert [storage.read_json(f"{workdir}/f{i}.json")["i"] for i in range(6)] == list(range(6))
    assert storage.read_bytes(f"{workdir}/blob.bin") == bytes(range(256)) * 64
  finally:
    proxy.close()
  assert proxy.counts["503"] >= 3 and proxy.counts["reset_before"] + proxy.counts[
      "reset_after"] >= 1, proxy.counts
  # Nothing else was left behind (no write probe, no temporary objects).
  assert emulator.list(BUCKET, "runs/small-files/") == sorted(
      [f"runs/small-files/f{i}.json" for i in range(6)] + ["runs/small-files/blob.bin"])


def test_permanent_errors_name_the_url_and_the_permission(emulator, gcs_env):
  with pytest.raises(UserError, match=r"^--workdir=gs://no-such-bucket/runs/x: bucket"
                     r" gs://no-such-bucket does not exist"):
    storage.check_writable("gs://no-such-bucket/runs/x")
  with pytest.raises(UserError, match="file not found"):
    storage.read_input(f"gs://{BUCKET}/data/missing.csv")
  proxy = gcs_emulator.FaultProxy(emulator.url, forbidden_buckets=(BUCKET,)).start()
  try:
    gcs_env(proxy.url)
    with pytest.raises(UserError) as error:
      storage.check_writable(f"gs://{BUCKET}/runs/x")
    assert str(error.value) == (
        f"--workdir=gs://{BUCKET}/runs/x: permission denied (HTTP 403): the job's identity"
        f" lacks storage.objects.create on gs://{BUCKET}; grant it roles/storage.objectUser"
        " on the bucket")
    with pytest.raises(UserError, match=r"lacks storage\.objects\.get on gs://jaxjob-test;"
                       r" grant it roles/storage\.objectViewer"):
      storage.read_input(CSV_URL)
  finally:
    proxy.close()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cli_exits_2_with_one_line_on_a_missing_bucket_or_unreadable_data(emulator, tmp_path):
  result = _trainer(["--workdir=gs://no-such-bucket/runs/x"],
                    emulator.url, tmp_path, timeout=100)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "error: --workdir=gs://no-such-bucket/runs/x: bucket gs://no-such-bucket does not"
      " exist or is not visible (HTTP 404); create it or fix the URL")
  proxy = gcs_emulator.FaultProxy(emulator.url, forbidden_buckets=(BUCKET,)).start()
  try:
    denied = _trainer([f"--workdir=gs://{BUCKET}/runs/denied"], proxy.url, tmp_path,
                      timeout=100)
    result = _trainer([*FLAGS, f"--workdir={tmp_path / 'run'}"], proxy.url, tmp_path,
                      timeout=100)
  finally:
    proxy.close()
  assert denied.returncode == 2, denied.stderr
  assert denied.stderr.strip().splitlines()[-1] == (
      f"error: --workdir=gs://{BUCKET}/runs/denied: permission denied (HTTP 403): the job's"
      f" identity lacks storage.objects.create on gs://{BUCKET}; grant it"
      " roles/storage.objectUser on the bucket")
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: {CSV_URL}: permission denied (HTTP 403): the job's identity lacks"
      f" storage.objects.get on gs://{BUCKET}; grant it roles/storage.objectViewer on the"
      " bucket")
  assert not (tmp_path / "run").exists()
  assert emulator.buckets() == [BUCKET]  # Nothing created a bucket.


_PRIVATE_ENDPOINT_SCRIPT = """
import numpy as np, orbax.checkpoint as ocp
from trainer import storage
storage.check_writable("gs://jaxjob-test/runs/endpoint")
storage.write_json("gs://jaxjob-test/runs/endpoint/x.json", {"a": 1})
assert storage.read_json("gs://jaxjob-test/runs/endpoint/x.json") == {"a": 1}
with ocp.CheckpointManager(storage.path("gs://jaxjob-test/runs/endpoint/checkpoints")) as m:
  m.save(1, args=ocp.args.StandardSave({"w": np.ones(3)}))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_private_endpoint_is_reached_through_the_documented_variables(emulator, tmp_path):
  # Without STORAGE_EMULATOR_HOST (so credentials would still be sent): gcsfs through
  # fsspec's FSSPEC_GCS_ENDPOINT_URL, tensorstore through TENSORSTORE_GCS_HTTP_URL.
  env = gcs_emulator.subprocess_env(emulator.url, str(tmp_path))
  del env["STORAGE_EMULATOR_HOST"]
  env.update(FSSPEC_GCS_ENDPOINT_URL=emulator.url, TENSORSTORE_GCS_HTTP_URL=emulator.url,
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  result = subprocess.run([sys.executable, "-c", _PRIVATE_ENDPOINT_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  names = emulator.list(BUCKET, "runs/endpoint/")
  assert "runs/endpoint/x.json" in names
  assert _committed_steps(names, "endpoint") == [1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_full_run_on_gcs_then_a_relaunch_resumes_from_the_bucket(emulator, reference_sha,
                                                                 tmp_path):
  workdir = f"gs://{BUCKET}/runs/full"
  first = _trainer([*FLAGS, f"--workdir={workdir}", "--config.train.steps=40"],
                   emulator.url, tmp_path, timeout=200)
  assert first.returncode == 0, first.stderr[-3000:]
  names = emulator.list(BUCKET, "runs/full/")
  relative = {n[len("runs/full/"):] for n in names}
  assert RUN_FILES <= relative, sorted(relative)
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in relative)
  assert not any(".jaxjob-write-probe" in n or ".tmp" in n for n in relative)
  assert _committed_steps(names, "full") == [20, 40]
  rows = [json.loads(line) for line in emulator.download(
      BUCKET, "runs/full/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30, 40]

  second = _trainer([*FLAGS, f"--workdir={workdir}", "--config.train.steps=60",
                     "--allow_config_change"], emulator.url, tmp_path, timeout=200)
  assert second.returncode == 0, second.stderr[-3000:]
  summary = _summary(emulator, "full")
  assert summary["resumed_from_step"] == 40
  assert summary["params_sha256"] == reference_sha
  run = json.loads(emulator.download(BUCKET, "runs/full/run.json"))
  assert [s["resumed_from_step"] for s in run["starts"]] == [0, 40]
  rows = [json.loads(line) for line in emulator.download(
      BUCKET, "runs/full/metrics.jsonl").decode().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  assert _committed_steps(emulator.list(BUCKET, "runs/full/"), "full") == [40, 60]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_503s_and_connection_resets_do_not_change_the_result(emulator, reference_sha,
                                                             tmp_path):
  proxy = gcs_emulator.FaultProxy(emulator.url, fail_rate=0.02, reset_rate=0.02,
                                  fault_every=15, seed=7).start()
  try:
    result = _trainer([*FLAGS, f"--workdir=gs://{BUCKET}/runs/faults",
                       "--config.train.steps=60"], proxy.url, tmp_path, timeout=220)
  finally:
    proxy.close()
  assert result.returncode == 0, result.stderr[-3000:]
  counts = proxy.counts
  assert min(counts["503"], counts["reset_before"], counts["reset_after"]) >= 2, counts
  # Both clients met faults: gcsfs (run files, Orbax metadata) and tensorstore (arrays).
  faults = proxy.faults_by_client
  assert faults.get("python-gcsfs", 0) >= 3 and faults.get("tensorstore", 0) >= 3, (
      faults, proxy.requests_by_client)
  assert _summary(emulator, "faults")["params_sha256"] == reference_sha
  assert _committed_steps(emulator.list(BUCKET, "runs/faults/"), "faults") == [40, 60]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_checkpoint_killed_mid_upload_is_never_restored(emulator, reference_sha, tmp_path):
  # Everything of step 40 reaches the bucket except its commit marker: the trainer is
  # killed while that upload hangs.
  proxy = gcs_emulator.FaultProxy(emulator.url).start()
  proxy.stall_when = lambda method, path: (
      method in ("POST", "PUT") and "runs/killed/checkpoints/40/commit_success.txt" in path)
  args = [*FLAGS, f"--workdir=gs://{BUCKET}/runs/killed", "--config.train.steps=60"]
  env = gcs_emulator.subprocess_env(proxy.url, str(tmp_path))
  log = tmp_path / "killed.log"
  with open(log, "wb") as out, subprocess.Popen(
      [sys.executable, "-m", "trainer", *args], cwd=ROOT, env=env, stdout=out,
      stderr=subprocess.STDOUT) as trainer:
    try:
      deadline = time.monotonic() + 150
      while not proxy.stalled.is_set() and trainer.poll() is None:
        assert time.monotonic() < deadline, "the step-40 commit marker was never uploaded"
        time.sleep(0.1)
      assert proxy.stalled.is_set(), log.read_text()[-3000:]
    finally:
      trainer.send_signal(signal.SIGKILL)
      trainer.wait()
      proxy.close()
  names = emulator.list(BUCKET, "runs/killed/")
  assert any(n.startswith("runs/killed/checkpoints/40/default/") for n in names)
  assert _committed_steps(names, "killed") == [20]
  emulator.upload(BUCKET, "runs/killed/checkpoints/40/default/stray", b"unfinished")

  result = _trainer(args, emulator.url, tmp_path, timeout=200)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = _summary(emulator, "killed")
  assert summary["resumed_from_step"] == 20
  assert summary["params_sha256"] == reference_sha
  run = json.loads(emulator.download(BUCKET, "runs/killed/run.json"))
  assert run["starts"][0]["exit"]["reason"] == "killed or crashed (no exit recorded)"
  names = emulator.list(BUCKET, "runs/killed/")
  assert _committed_steps(names, "killed") == [40, 60]
  # The unfinished step 40 was deleted at start-up, before it was saved again.
  assert "runs/killed/checkpoints/40/default/stray" not in names


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_two_processes_share_a_gcs_workdir(emulator, tmp_path):
  env = gcs_emulator.subprocess_env(emulator.url, str(tmp_path))
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-m", "launch", "local", "--processes", "2", "--devices-per-process",
       "2", "--", *FLAGS, f"--workdir=gs://{BUCKET}/runs/two", "--config.train.steps=40"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=220, check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  names = emulator.list(BUCKET, "runs/two/")
  assert RUN_FILES <= {n[len("runs/two/"):] for n in names}
  assert _committed_steps(names, "two") == [20, 40]
  for rank in (0, 1):  # Both processes wrote their part of every checkpoint.
    assert f"runs/two/checkpoints/40/default/ocdbt.process_{rank}/manifest.ocdbt" in names
  summary = _summary(emulator, "two")
  assert (summary["num_processes"], summary["num_devices"]) == (2, 4)
  assert summary["eval"]["accuracy"] > 0.85


def _config(steps: int):
  """The FLAGS run, in this process: mobile_price from the bucket, constant rate."""
  return tiny_config("mobile_price.py", data__path=CSV_URL, optimizer__schedule="constant",
                     train__steps=steps, train__checkpoint_every=20, train__eval_every=20)


def _lease_record(renewed: float) -> bytes:
  return json.dumps({"owner": "feedc0ffee00", "host": "other-host", "pid": 7, "pid_start": 1,
                     "started": renewed, "renewed": renewed,
                     "started_utc": "2026-01-01T00:00:00+00:00"}).encode()


def test_the_lease_on_gcs_is_a_compare_and_swap_on_the_generation(emulator, gcs_env):
  workdir = f"gs://{BUCKET}/runs/lease"
  store = lease._GcsStore(workdir)  # pylint: disable=protected-access
  assert store.read() == (None, 0)
  first = store.write({"owner": "a"}, 0)  # ifGenerationMatch=0: create only
  with pytest.raises(lease.Conflict):
    store.write({"owner": "b"}, 0)
  with pytest.raises(lease.Conflict):
    store.write({"owner": "b"}, first + 1)
  second = store.write({"owner": "a", "renewal": 1}, first)  # renew: ifGenerationMatch=<gen>
  assert store.read() == ({"owner": "a", "renewal": 1}, second) and second != first
  # Emulator gap (docs/gcs.md): a delete ignores ifGenerationMatch, where GCS answers 412
  # and keeps the object. If this starts failing, the emulator closed the gap.
  store.delete(first)
  assert store.read() == (None, 0)

  name = "runs/lease/lease.json"
  emulator.upload(BUCKET, name, _lease_record(renewed=time.time()))
  with pytest.raises(UserError, match=r"is in use: its lease is held by run feedc0ffee00 \(host"
                     r" other-host, pid 7, started 2026-01-01T00:00:00\+00:00\), renewed \d+ s"
                     r" ago \(stale after 150 s\)"):
    lease.Lease().acquire(workdir)
  assert json.loads(emulator.download(BUCKET, name))["owner"] == "feedc0ffee00"
  emulator.upload(BUCKET, name, _lease_record(renewed=time.time() - 1000))
  held = lease.Lease()
  held.acquire(workdir)
  assert held.takeover["owner"] == "feedc0ffee00"
  assert "not renewed for 10" in held.takeover["taken_over_because"]
  assert json.loads(emulator.download(BUCKET, name))["pid"] == os.getpid()
  held.release()
  assert emulator.list(BUCKET, "runs/lease/") == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_corrupt_step_on_gcs_is_moved_aside_and_outlives_the_clean_up(emulator, gcs_env,
                                                                       reference_sha):
  workdir = f"gs://{BUCKET}/runs/corrupt"
  train.train_and_evaluate(_config(40), workdir)
  emulator.upload(BUCKET, "runs/corrupt/checkpoints/40/default/_METADATA", b'{"tree_meta')
  resumed = train.train_and_evaluate(_config(60), workdir, True)
  assert resumed["resumed_from_step"] == 20
  assert resumed["params_sha256"] == reference_sha
  # A third start runs Orbax's clean-up of unfinished steps again: the folder stays.
  checkpoint.Checkpointer(storage.path(workdir) / "checkpoints", save_every=20, keep=2).close()
  names = emulator.list(BUCKET, "runs/corrupt/")
  folder = "runs/corrupt/checkpoints/quarantine/"
  (moved,) = {n[len(folder):].split("/")[0] for n in names if n.startswith(folder)} - {
      "commit_success.txt"}
  assert moved.startswith("40-")
  assert f"{folder}commit_success.txt" in names  # keeps Orbax's clean-up away
  assert emulator.download(BUCKET, f"{folder}{moved}/default/_METADATA") == b'{"tree_meta'
  assert f"{folder}{moved}/commit_success.txt" in names
  assert _committed_steps(names, "corrupt") == [40, 60]  # 40 was saved again
  run = json.loads(emulator.download(BUCKET, "runs/corrupt/run.json"))
  (event,) = run["starts"][-1]["checkpoint_events"]
  assert event["event"] == "quarantined" and event["moved_to"] == f"gs://{BUCKET}/{folder}{moved}"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_transient_errors_on_restore_are_retried_then_exit_1_keeping_every_step(
    emulator, gcs_env, monkeypatch):
  workdir = f"gs://{BUCKET}/runs/transient"
  train.train_and_evaluate(_config(40), workdir)
  before = emulator.list(BUCKET, "runs/transient/")
  proxy = gcs_emulator.FaultProxy(emulator.url).start()
  proxy.fail_when = lambda method, path: (
      method == "GET" and "/o/runs/transient/checkpoints/40/default/" in path)
  monkeypatch.setattr(checkpoint, "RESTORE_RETRY_DEADLINE_S", 1.0)
  started = time.monotonic()
  try:
    gcs_env(proxy.url)
    with pytest.raises(StorageError, match=r"checkpoint step 40 in gs://jaxjob-test/runs/"
                       r"transient/checkpoints kept failing with transient errors .*every"
                       r" checkpoint was left in place"):
      train.train_and_evaluate(_config(60), workdir, True)
  finally:
    proxy.close()
  print(f"gave up after {time.monotonic() - started:.0f} s and {proxy.counts['503']} 503s")
  assert proxy.counts["503"] >= 3  # the clients' own retries, then ours
  assert emulator.list(BUCKET, "runs/transient/") == before  # nothing moved or deleted


def test_a_save_that_fails_after_a_commit_names_itself_and_the_committed_step(
    emulator, gcs_env, monkeypatch):
  proxy = gcs_emulator.FaultProxy(emulator.url).start()
  try:
    gcs_env(proxy.url)
    monkeypatch.setattr(checkpoint, "_last_committed", None)  # this process's earlier runs
    ckpt = checkpoint.Checkpointer(storage.path(f"gs://{BUCKET}/runs/cut/checkpoints"),
                                   save_every=1, keep=5)
    state = {"w": jax.numpy.arange(4.0)}
    assert ckpt.save(1, state)
    ckpt._manager.wait_until_finished()  # pylint: disable=protected-access
    proxy.forbidden_buckets.add(BUCKET)  # step 1 is committed; the bucket goes now
    with pytest.raises(StorageError) as failed:
      ckpt.save(2, state)
    # Storage can no longer list the steps: step 1 is known committed from its own wait.
    assert failed.value.line.startswith(
        f"saving checkpoint step 2 to gs://{BUCKET}/runs/cut/checkpoints failed:"), failed.value
    assert failed.value.line.endswith("; last committed step: 1"), failed.value
  finally:
    proxy.close()
  assert _committed_steps(emulator.list(BUCKET, "runs/cut/"), "cut") == [1]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("failure", ["403", "404"])
def test_losing_the_bucket_mid_run_ends_with_one_line(emulator, tmp_path, failure):
  run = f"lost-{failure}"
  proxy = gcs_emulator.FaultProxy(emulator.url).start()
  env = gcs_emulator.subprocess_env(proxy.url, str(tmp_path))
  with subprocess.Popen([sys.executable, "-m", "trainer", *FLAGS, "--config.train.steps=5000",
                         f"--workdir=gs://{BUCKET}/runs/{run}"], cwd=ROOT, env=env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
    try:
      deadline = time.monotonic() + 150
      while not _committed_steps(emulator.list(BUCKET, f"runs/{run}/"), run):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
      (proxy.forbidden_buckets if failure == "403" else proxy.vanished_buckets).add(BUCKET)
      lost = time.monotonic()
      _, err = proc.communicate(timeout=200)
    finally:
      proc.kill()
      proxy.close()
  print(f"HTTP {failure} mid-run: exit {proc.returncode} after {time.monotonic() - lost:.1f} s")
  assert proc.returncode == 1, err[-3000:]
  # One line for the failure, last; before it only what any run may log (Orbax's
  # warnings about slow saves; against an emulator, tensorstore's note that it found no
  # credentials file): no traceback, no error record.
  lines = err.strip().splitlines()
  assert [l for l in lines if l.startswith("error: ")] == lines[-1:], err[-3000:]
  assert re.search(r"; last committed step: [1-9]\d*$", lines[-1]), lines[-1]
  assert "Traceback" not in err
  assert all("Could not find the credentials file" in l for l in lines if l.startswith("E"))
  assert emulator.list(BUCKET, f"runs/{run}/checkpoints/")  # nothing deleted
