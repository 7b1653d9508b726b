"""The trainer image, built from this tree and run as Kubernetes and Cloud TPU VMs run it.

`tests/container.py` starts (or finds) a Docker engine, makes the local base image and
builds the Dockerfile on it. Each Kubernetes case renders the CPU manifests with
`python -m launch k8s render` and turns the pod into `docker run` flags (user, read-only
root, dropped capabilities, no privilege escalation, emptyDir as a fresh world-writable
directory, env, command and args, memory limit, grace period), so a drift between manifests
and image fails here. The
run directory is `gs://` as in the manifests: fake-gcs-server on 127.0.0.1, reached over
the host network through `STORAGE_EMULATOR_HOST` (the one variable added to the pod's
env, with the no-metadata-server guards of tests/gcs_emulator.py). The tutorial CSV is
mounted read-only at /data.

The TPU VM case runs `python -m launch tpu-vm run --image=...` with a stand-in for `gcloud`
only: its `tpu-vm ssh --command=SCRIPT` runs SCRIPT here under bash, so the real `sudo
docker pull` (from docker-registry on 127.0.0.1) and `sudo docker run` start the container.

No engine here and JAXJOB_SKIP_CONTAINER_TESTS=1: skipped; no engine without it: failed.
"""

import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from launch import local
from tests import container
from tests import gcs_emulator
from tests.conftest import DATA_DIR, ROOT

# Whichever test comes first also waits for the base image and the build (up to ~10 min
# with nothing cached on 2 loaded cores); every wait inside a test has its own bound.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]
BUCKET = "jaxjob-ct"
DATA = "/data/mobile-price/train.csv"
STEPS, EVERY = 600, 100
# Same flags for every 2-node run, so the uninterrupted one is the reference of the others.
JOB_ARGS = ["--config=trainer/configs/mobile_price.py", f"--config.data.path={DATA}",
            f"--config.train.steps={STEPS}", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.eval_every=300", "--config.train.log_every=50",
            "--config.distributed.heartbeat_timeout=10"]
HEARTBEAT_BOUND_S = 30  # heartbeat_timeout=10 s above, with room for a loaded machine


@pytest.fixture(scope="module")
def image():
  try:
    container.engine()
    missing = None
  except container.Unavailable as e:
    missing = str(e)
  if missing and os.environ.get(container.SKIP_VARIABLE) == "1":
    pytest.skip(missing)
  if missing:
    pytest.fail(missing, pytrace=False)  # One line, no traceback.
  started = time.monotonic()
  base = container.base_image()
  tag, seconds = container.trainer_image(base)
  print(f"base {base} ready in {time.monotonic() - started - seconds:.0f} s;"
        f" docker build {seconds:.0f} s")
  return tag


@pytest.fixture(scope="module")
def gcs():
  server = gcs_emulator.FakeGCS().start()
  server.create_bucket(BUCKET)
  yield server
  server.close()


_COMMITTED = re.compile(r".*/checkpoints/(\d+)/commit_success\.txt")


class Job:
  """The pods of one rendered Indexed Job (or JobSet), run as containers named NAME-INDEX-N."""

  def __init__(self, image: str, gcs, nodes: int, args: list[str], run: str,
               kind: str = "indexed-job"):
    self.name = f"ct-{uuid.uuid4().hex[:8]}"
    self.image, self.gcs, self.nodes, self.run = image, gcs, nodes, run
    rendered = subprocess.run(
        [sys.executable, "-m", "launch", "k8s", "render", f"--name={self.name}",
         f"--{kind}", f"--nodes={nodes}", f"--image={image}",
         f"--workdir=gs://{BUCKET}/{run}", "--",
         *args], cwd=ROOT, capture_output=True, text=True, check=True)
    documents = list(yaml.safe_load_all(rendered.stdout))
    (self.manifest,) = [d for d in documents if d["kind"] in ("Job", "JobSet")]
    job = self.manifest
    if job["kind"] == "JobSet":  # One replicated Job of `nodes` pods (one slice).
      (replicated,) = job["spec"]["replicatedJobs"]
      job = replicated["template"]
    self.job_spec = job["spec"]
    self.pod = job["spec"]["template"]["spec"]
    rules = job["spec"].get("podFailurePolicy", {}).get("rules", [])
    self.fail_job_codes = {code for rule in rules if rule["action"] == "FailJob"
                           for code in rule.get("onExitCodes", {}).get("values", [])}
    self.started: list[str] = []
    self.current: list[str] = []
    self.port = 0

  def start(self, env: dict | None = None) -> None:
    """Starts one container per completion index (fresh containers on every call)."""
    self.port = local._free_port()  # pylint: disable=protected-access
    self.current = [""] * self.nodes
    for index in range(self.nodes):
      self.start_index(index, env)

  def start_index(self, index: int, env: dict | None = None) -> None:
    """Starts a container for `index` alone, with the group's coordinator address."""
    extra = [f"--volume={DATA_DIR / 'train.csv'}:{DATA}:ro"]
    extra += [f"--env={key}={value}" for key, value in (env or {}).items()]
    for key, value in gcs_emulator.env(self.gcs.url, "/nonexistent").items():
      if key != "CLOUDSDK_CONFIG":
        extra.append(f"--env={key}={value}")
    flags = container.pod_run_flags(self.pod, index=index,
                                    coordinator=f"127.0.0.1:{self.port}")
    name = f"{self.name}-{index}-{len(self.started)}"
    container.docker("run", "--detach", f"--name={name}", *flags, *extra, self.image,
                     *container.pod_command(self.pod))
    self.started.append(name)
    self.current[index] = name

  def wait(self, index: int, timeout: float = 300) -> int:
    out = container.docker("wait", self.current[index], timeout=timeout).stdout
    return int(out.strip())

  def logs(self, index: int) -> str:
    proc = container.docker("logs", self.current[index])
    return proc.stdout + proc.stderr

  def committed(self) -> list[int]:
    names = self.gcs.list(BUCKET, f"{self.run}/checkpoints/")
    # Orbax marks a committed step on GCS with <step>/commit_success.txt.
    return sorted(int(m.group(1)) for m in map(_COMMITTED.fullmatch, names) if m)

  def wait_for_commit(self, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in self.committed()):
      running = container.docker("inspect", "--format", "{{.State.Running}}",
                                 *self.current).stdout.split()
      assert "false" not in running and time.monotonic() < deadline, (
          f"no checkpoint >= {step}: {running}\n{self.logs(0)[-3000:]}")
      time.sleep(0.2)

  def file(self, name: str) -> dict:
    return json.loads(self.gcs.download(BUCKET, f"{self.run}/{name}"))

  def remove(self) -> None:
    for name in self.started:
      container.docker("rm", "--force", name, check=False)


@pytest.fixture
def jobs():
  made = []
  yield lambda *args, **kwargs: made.append(Job(*args, **kwargs)) or made[-1]
  for job in made:
    job.remove()


def test_rendered_pod_runs_as_the_manifest_says(image, gcs, jobs):
  # The flags come from the pod, and the image agrees with them: a numeric non-root user
  # (runAsNonRoot needs one the kubelet can check), the trainer as the entrypoint.
  job = jobs(image, gcs, 1, JOB_ARGS, "flags")
  flags = container.pod_run_flags(job.pod, index=0, coordinator="127.0.0.1:1")
  for flag in ("--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges",
               "--user=10001:10001", "--stop-timeout=60", "--entrypoint=python",
               "--env=JAX_PROCESS_ID=0"):
    assert flag in flags
  for path in ("/tmp", "/var/cache/jaxjob"):  # the pod's emptyDirs: fresh, world-writable
    (mount,) = [f for f in flags if f.startswith("--volume=") and f.endswith(f":{path}:rw")]
    assert os.stat(mount.split("=", 1)[1].split(":")[0]).st_mode & 0o7777 == 0o1777
  assert container.image_user(image) == "10001:10001"
  job.pod["containers"][0]["securityContext"]["privileged"] = True
  with pytest.raises(ValueError, match="privileged"):
    container.pod_run_flags(job.pod, index=0, coordinator="127.0.0.1:1")


def test_tutorial_job_in_one_container(image, gcs, jobs):
  args = ["--config=trainer/configs/mobile_price.py", f"--config.data.path={DATA}"]
  job = jobs(image, gcs, 1, args, "tutorial")
  job.start()
  assert job.wait(0) == 0, job.logs(0)[-3000:]
  assert "compilation cache" not in job.logs(0)  # the mounted cache directory is usable
  summary = job.file("summary.json")
  assert summary["eval"]["accuracy"] == pytest.approx(0.975, abs=1e-9)  # README's table
  names = set(gcs.list(BUCKET, "tutorial/"))
  for name in ("run.json", "metrics.jsonl", "eval/report.txt", "eval/report.json",
               "plots/history.png", "summary.json", "checkpoints/1000/commit_success.txt"):
    assert f"tutorial/{name}" in names, sorted(names)
  assert any(n.startswith("tutorial/tensorboard/") for n in names)
  assert job.file("run.json")["starts"][-1]["exit"]["code"] == 0


def test_image_imports_every_dependency_and_holds_no_test_suites(image):
  # The Dockerfile cuts the packages' own tests/ directories; what the trainer imports
  # (pyproject's dependencies, by import name) must still import on the read-only root.
  script = ("import jax, optax, flax, orbax.checkpoint, ml_collections, absl, numpy, pandas,"
            " sklearn, matplotlib, tensorboardX, etils.epath, gcsfs, google.cloud.storage, tqdm,"
            " sklearn.linear_model, scipy.stats, trainer.train; print(jax.default_backend())")
  proc = container.docker("run", "--rm", "--network=none", "--read-only", "--tmpfs=/tmp",
                          "--entrypoint=python", image, "-c", script)
  assert proc.stdout.strip() == "cpu"
  left = container.docker("run", "--rm", "--network=none", "--entrypoint=find", image,
                          "/opt/venv/lib", "-type", "d", "-path", "*/site-packages/*/tests")
  assert left.stdout == ""


def test_the_manifests_own_arguments_run_in_the_image(image, gcs, jobs):
  # Rendered without trainer flags, the pod keeps k8s/base's args (--config=trainer/configs/
  # default.py): that path must exist in the image's working directory.
  job = jobs(image, gcs, 1, [], "default")
  assert job.pod["containers"][0]["args"][0] == "--config=trainer/configs/default.py"
  job.start()
  assert job.wait(0) == 0, job.logs(0)[-3000:]
  assert job.file("summary.json")["config"] == "default"


@pytest.fixture(scope="module")
def reference(image, gcs):
  """The rendered 2-node job as 2 containers, uninterrupted: (params_sha256, seconds)."""
  job = Job(image, gcs, 2, JOB_ARGS, "reference")
  try:
    started = time.monotonic()
    job.start()
    codes = [job.wait(i) for i in range(2)]
    assert codes == [0, 0], job.logs(0)[-3000:] + job.logs(1)[-3000:]
    seconds = time.monotonic() - started
    summary = job.file("summary.json")
    assert (summary["num_processes"], summary["num_devices"]) == (2, 2)
    return summary["params_sha256"], seconds
  finally:
    job.remove()


@pytest.mark.multiprocess
def test_two_containers_form_one_job_equal_to_launch_local(reference, tmp_path):
  # Same topology here: 2 processes of 1 CPU device each (the pods set no
  # JAXJOB_DEVICES_PER_PROCESS, so each container has JAX's one CPU device).
  args = [a.replace(DATA, str(DATA_DIR / "train.csv")) for a in JOB_ARGS]
  proc = subprocess.run(
      [sys.executable, "-m", "launch", "local", "--processes=2", "--devices-per-process=1",
       "--", *args, f"--workdir={tmp_path / 'run'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=500, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  print(f"2 containers: {reference[1]:.0f} s")
  assert summary["params_sha256"] == reference[0]


@pytest.mark.multiprocess
def test_docker_stop_exits_42_in_grace_and_fresh_containers_resume(reference, image, gcs,
                                                                  jobs):
  job = jobs(image, gcs, 2, JOB_ARGS, "stopped")
  grace = job.pod["terminationGracePeriodSeconds"]
  # The whole run takes a few seconds: a 10 s pause before the eval at step 300 (results
  # are unchanged) is when the stop lands.
  job.start(env={"JAXJOB_FAULTS": "slow_eval@10"})
  deadline = time.monotonic() + 240
  while "step 300/" not in job.logs(0):
    assert time.monotonic() < deadline, job.logs(0)[-3000:]
    time.sleep(0.2)
  sent = time.monotonic()
  container.docker("stop", f"--time={grace}", job.current[1], timeout=grace + 30)
  elapsed = time.monotonic() - sent
  codes = [job.wait(i, timeout=120) for i in range(2)]
  print(f"docker stop -> exit {codes} in {elapsed:.1f} s (grace {grace} s)")
  assert codes == [42, 42], job.logs(0)[-2000:] + job.logs(1)[-2000:]
  assert elapsed < grace
  step = max(job.committed())
  assert f"preempted: checkpoint committed at step {step}" in job.logs(1)
  assert step < STEPS, "the run finished before the stop"
  job.start()
  assert [job.wait(i) for i in range(2)] == [0, 0], job.logs(0)[-3000:]
  starts = job.file("run.json")["starts"]
  assert [s["exit"]["code"] for s in starts] == [42, 0]
  assert starts[-1]["resumed_from_step"] == step
  assert job.file("summary.json")["params_sha256"] == reference[0]


@pytest.mark.multiprocess
def test_docker_kill_of_one_container_ends_the_other_within_the_heartbeat_bound(
    image, gcs, jobs):
  args = [a.replace(f"steps={STEPS}", "steps=100000") for a in JOB_ARGS]
  job = jobs(image, gcs, 2, args, "killed")
  job.start()
  job.wait_for_commit(EVERY)
  container.docker("kill", job.current[1])
  killed = time.monotonic()
  code = job.wait(0, timeout=HEARTBEAT_BOUND_S * 4)
  elapsed = time.monotonic() - killed
  print(f"rank 1 killed: rank 0 exited {code} after {elapsed:.1f} s")
  assert code != 0 and job.wait(1) == 137
  # The survivor's death must be one the Job restarts (here: JAX aborts on the failed
  # shutdown barrier, 134 or 139), not a code its podFailurePolicy fails the Job on.
  assert job.fail_job_codes and code not in job.fail_job_codes, job.logs(0)[-3000:]
  assert elapsed < HEARTBEAT_BOUND_S, job.logs(0)[-3000:]


_GCLOUD = """\
#!{python}
# Stand-in for gcloud: `compute tpus tpu-vm ssh NAME ... --command=SCRIPT` runs SCRIPT here
# under bash (this machine is the only worker); `describe` answers as one READY worker.
import subprocess, sys
args = sys.argv[1:]
with open({log!r}, "a") as log:
  log.write(repr(args) + "\\n")
command = [a.partition("=")[2] for a in args if a.startswith("--command=")]
if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and command:
  sys.exit(subprocess.run(["bash", "-c", command[0]]).returncode)
if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
  print("127.0.0.1" if any("networkEndpoints" in a for a in args) else "READY\\tHEALTHY\\tv4-8")
  sys.exit(0)
sys.exit(f"gcloud stand-in: unexpected {{args}}")
"""


@pytest.fixture
def registry():
  server = container.Registry(local._free_port()).start()  # pylint: disable=protected-access
  yield server
  server.close()


def _tpu_vm(verb: str, name: str, *args: str, path: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "launch", "tpu-vm", verb, f"--name={name}", "--zone=us-central2-b",
       "--project=my-project", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "PATH": path}, check=False)


def test_tpu_vm_run_starts_the_image_and_logs_and_status_find_it(image, gcs, registry,
                                                                  tmp_path):
  # On a TPU VM the VM's identity reaches GCS; here the emulator's address is baked into a
  # one-layer image on top of the one under test (the script's `docker run` takes no -e).
  container.tool("sudo", "sudo", "the TPU VM script runs `sudo docker`")
  pushed = f"{registry.host}/jaxjob:cpu-rehearsal"
  env_lines = "".join(f"ENV {k}={v}\n" for k, v in gcs_emulator.env(gcs.url, "/x").items()
                      if k != "CLOUDSDK_CONFIG")
  container.docker("build", "--network=none", "--tag", pushed, "-",
                   input=f"FROM {image}\n{env_lines}")
  container.docker("push", pushed, timeout=900)
  container.docker("rmi", pushed)  # The script must pull it.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(_GCLOUD.format(python=sys.executable, log=str(tmp_path / "gcloud.log")))
  gcloud.chmod(0o755)
  path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
  name = f"ct-{uuid.uuid4().hex[:8]}"
  files = {k: f"/tmp/jaxjob-{name}.{k}" for k in ("log", "exit", "pid", "sh")}
  try:
    # The script sets JAX_PLATFORMS=tpu unless told otherwise: this rehearsal runs on the CPU.
    started = _tpu_vm("run", name, f"--image={pushed}", f"--workdir=gs://{BUCKET}/tpu-vm",
                      "--env=JAX_PLATFORMS=cpu", "--", "--config=trainer/configs/breast_cancer.py",
                      "--config.train.steps=60", path=path)
    assert started.returncode == 0, started.stdout + started.stderr
    deadline = time.monotonic() + 300
    # Finished: the exit file is written, and the detached `sh` that wrote it has ended.
    while not os.path.exists(files["exit"]) or os.path.exists(
        f"/proc/{open(files['pid']).read().strip()}"):
      assert time.monotonic() < deadline, open(files["log"]).read()[-3000:]
      time.sleep(0.5)
    logs = _tpu_vm("logs", name, "--workers=1", "--no-follow", path=path)
    status = _tpu_vm("status", name, path=path)
  finally:
    container.docker("rm", "--force", f"jaxjob-{name}", check=False)
    pulled = container.docker("image", "inspect", pushed, check=False).returncode == 0
    container.docker("rmi", pushed, check=False)
    for file in files.values():
      if os.path.exists(file):
        os.remove(file)
  assert logs.returncode == 0, logs.stderr
  assert "[worker 0] done: step 60 held-out accuracy" in logs.stdout, logs.stdout[-3000:]
  assert "[worker 0] jaxjob: trainer exited with code 0" in logs.stdout
  assert status.returncode == 0 and "] exited with code 0" in status.stdout, status.stdout
  summary = json.loads(gcs.download(BUCKET, "tpu-vm/summary.json"))
  assert summary["final_step"] == 60
  # The tag was removed after the push: the script's own `sudo docker pull` brought it back.
  assert pulled


@pytest.mark.parametrize("accelerator, package", [("cuda12", "jax-cuda12-plugin"),
                                                  ("tpu", "libtpu")])
def test_accelerator_extra_resolves_in_the_image(image, accelerator, package):
  # The Dockerfile's own requirements step for ACCELERATOR, then pip's resolver on top of
  # what the CPU image holds, with the image's Python and pip (nothing is installed).
  from tests import test_dockerfile  # pylint: disable=import-outside-toplevel
  requirements = test_dockerfile.install_command().split(" && ")[0]
  script = (f"cd /tmp && cp /src/pyproject.toml . && {requirements}"
            " && python -m pip install --dry-run --quiet --report /tmp/report.json"
            " --requirement requirements.txt && cat /tmp/report.json")
  proc = container.docker(
      "run", "--rm", "--network=host", "--read-only", "--tmpfs=/tmp:rw,exec",
      f"--volume={ROOT / 'pyproject.toml'}:/src/pyproject.toml:ro",
      f"--env=ACCELERATOR={accelerator}", "--entrypoint=sh", image, "-c", script)
  report = json.loads(proc.stdout)
  names = {item["metadata"]["name"] for item in report["install"]}
  assert package in names, sorted(names)


@pytest.mark.parametrize("skip, outcome", [("", "1 error"), ("1", "1 skipped")])
def test_without_an_engine_one_line_fails_or_the_variable_skips(skip, outcome):
  # PATH holds only this Python: no docker, no dockerd, no apt-get to install them.
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs",
       "tests/test_container.py", "-k", "rendered_pod"], cwd=ROOT, capture_output=True,
      text=True, timeout=300, check=False,
      env={**os.environ, "PATH": os.path.dirname(sys.executable),
           container.SKIP_VARIABLE: skip})
  assert outcome in proc.stdout, proc.stdout[-3000:]
  assert "no Docker engine: `docker info` fails and dockerd is not installed" in proc.stdout
  assert "Traceback" not in proc.stdout and "During handling" not in proc.stdout
