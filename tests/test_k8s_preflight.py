"""Tests of the GKE pre-flight properties of `python -m launch k8s` (no cluster).

The four things a real job needs that no offline run shows, checked on the rendered manifests and
on docs/gke.md's commands: which identity writes to GCS (TPU pods on the host network use the node
pool's service account), the GPU driver path and `JAX_PLATFORMS`, one TPU slice per node pool
(every scheduling order over two pools is enumerated), and CPU/memory/`/dev/shm` that fit the
machine types (GKE's allocatable formula). Also: lifetime, restart exit codes (the trainer's one
list), several slices, and why several nodes are a JobSet (real JAX processes, slow).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

from launch import common, k8s_render
from tests.test_k8s import (BUCKET, CONFIG, REGISTRY, ROOT, env_of, job_parts, jobset_validator,
                            launch, pss_violations, rendered, validate)




def test_tpu_pods_on_the_host_network_say_which_identity_writes_to_gcs(capsys):
  code, out, _ = launch(["render", "--name=demo", f"--image={REGISTRY}:v1",
                         f"--workdir={BUCKET}/demo", "--accelerator=tpu", "--nodes=2"], capsys)
  assert code == 0
  head = "".join(line[2:] for line in out.splitlines(keepends=True) if line.startswith("# "))
  assert "node pool's service account" in head and "roles/storage.objectUser" in head
  assert "cloud-platform" in head
  _, pod, _ = job_parts(list(yaml.safe_load_all(out)))
  assert pod["hostNetwork"] is True
  # Off the host network, Workload Identity applies: no note, and Pod Security "restricted".
  code, out, _ = launch(["render", "--name=demo", f"--image={REGISTRY}:v1",
                         f"--workdir={BUCKET}/demo", "--accelerator=tpu", "--nodes=2",
                         "--no-host-network"], capsys)
  assert code == 0 and not out.startswith("#")
  _, pod, _ = job_parts(list(yaml.safe_load_all(out)))
  assert "hostNetwork" not in pod and "dnsPolicy" not in pod and not pss_violations(pod)
  assert [d["kind"] for d in rendered(capsys, "--nodes=2", "--gpus-per-node=8")] == [
      "Service", "Job"]  # GPU and CPU pods: no note, the KSA is the identity.


def _docs_commands(text: str) -> list[list[str]]:
  """Every shell command of the fenced blocks of a Markdown page, continuation lines joined."""
  blocks = re.findall(r"```sh\n(.*?)```", text, flags=re.S)
  joined = "\n".join(blocks).replace("\\\n", " ")
  return [shlex.split(line, comments=True) for line in joined.splitlines()
          if line.strip() and not line.lstrip().startswith("#")]


def test_docs_tpu_node_pool_can_write_to_the_bucket():
  commands = _docs_commands((ROOT / "docs" / "gke.md").read_text())
  pools = [c for c in commands if c[:4] == ["gcloud", "container", "node-pools", "create"]]
  (tpu_pool,) = [c for c in pools if any(a.startswith("--tpu-topology=") for a in c)]
  flags = dict(a.split("=", 1) for a in tpu_pool if a.startswith("--") and "=" in a)
  assert "cloud-platform" in flags["--scopes"].split(",")
  account = flags["--service-account"]
  grants = [c for c in commands
            if c[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"]
            and f"--member=serviceAccount:{account}" in c]
  assert grants and "--role=roles/storage.objectUser" in grants[0]
  for pool in pools:  # Workload Identity on every pool, for the pods off the host network.
    assert "--workload-metadata=GKE_METADATA" in pool


def test_platform_and_driver_environment(capsys):
  _, _, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=8"))
  env = env_of(container)
  assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64"  # GKE's driver mount
  assert env["JAX_PLATFORMS"] == "cuda"  # no GPU: fail at start, never train on the CPU
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"].split()
  assert 0.5 <= float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) < 1
  for jobset in (False, True):
    _, _, container = job_parts(rendered(capsys, "--accelerator=tpu", "--nodes=2", jobset=jobset))
    assert env_of(container)["JAX_PLATFORMS"] == "tpu"
    assert "LD_LIBRARY_PATH" not in env_of(container)
  # The CPU pod stays runnable on any machine (the container tests run it with docker).
  _, _, container = job_parts(rendered(capsys, "--nodes=2"))
  assert not {"JAX_PLATFORMS", "LD_LIBRARY_PATH", "XLA_FLAGS"} & set(env_of(container))


@pytest.mark.parametrize("flags, known", [(None, True), ("--xla_gpu_no_such_flag=true", False)])
def test_gpu_xla_flags_are_known_to_this_jaxlib(flags, known, capsys):
  """XLA aborts at start on a flag it does not know, on any backend: a renamed flag in the GPU
  overlay would kill every GPU pod. The CPU build of jaxlib parses the same flag table."""
  _, _, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=8"))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  env.update(XLA_FLAGS=flags or env_of(container)["XLA_FLAGS"], JAX_PLATFORMS="cpu",
             XLA_PYTHON_CLIENT_MEM_FRACTION=env_of(container)["XLA_PYTHON_CLIENT_MEM_FRACTION"])
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.jit(lambda x: x + 1)(1))"],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert (proc.returncode == 0) == known, proc.stderr[-500:]
  if not known:
    assert "Unknown flag in XLA_FLAGS" in proc.stderr


def _placements(affinity: dict, job: str, pools: dict[str, int], placed: dict[str, list[str]],
                pods: int) -> set[tuple[str, ...]]:
  """Every way the scheduler may place `pods` pods of `job`, one by one, under inter-pod affinity.

  `pools` gives the nodes of each pool (one TPU pod per node); `placed` the jobs of the pods
  already running in each pool. Returns the sorted pools of this job's pods for every possible
  order of choices ("pending" for a pod that fits nowhere).
  """
  def matches(term, other_job):
    selector = term["labelSelector"]
    if "matchLabels" in selector:
      return selector["matchLabels"]["batch.kubernetes.io/job-name"] == other_job
    return all(other_job not in e.get("values", []) for e in selector["matchExpressions"])

  def feasible(pool, state):
    here = state.get(pool, [])
    own_anywhere = any(j == job for jobs in state.values() for j in jobs)
    ok = len(here) < pools[pool]
    for term in affinity.get("podAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", []):
      # A pod that matches its own term may open a domain while no pod matches anywhere.
      ok = ok and (any(matches(term, j) for j in here) or not own_anywhere)
    for term in affinity.get("podAntiAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", []):
      ok = ok and not any(matches(term, j) for j in here)
    return ok

  def place(state, left, mine):
    if not left:
      return {tuple(sorted(mine))}
    choices = [pool for pool in pools if feasible(pool, state)]
    if not choices:
      return place(state, left - 1, mine + ["pending"])
    results = set()
    for pool in choices:
      results |= place({**state, pool: state.get(pool, []) + [job]}, left - 1, mine + [pool])
    return results

  return place({k: list(v) for k, v in placed.items()}, pods, [])


def test_a_tpu_slice_stays_in_one_node_pool(capsys):
  (jobset,) = rendered(capsys, "--accelerator=tpu", "--nodes=2", jobset=True)
  assert jobset["metadata"]["annotations"] == {
      "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
  (gpu_jobset,) = rendered(capsys, "--nodes=2", "--gpus-per-node=8", jobset=True)
  assert "annotations" not in gpu_jobset["metadata"]
  _, pod, _ = job_parts(rendered(capsys, "--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4"))
  affinity = pod["affinity"]
  for term in (affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
               + affinity["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]):
    assert term["topologyKey"] == "cloud.google.com/gke-nodepool"
  # Two matching 4-node pools (two slices): without the affinity, the 4 pods can be split.
  pools = {"pool-a": 4, "pool-b": 4}
  assert ("pool-a", "pool-a", "pool-b", "pool-b") in _placements({}, "demo", pools, {}, 4)
  assert _placements(affinity, "demo", pools, {}, 4) == {("pool-a",) * 4, ("pool-b",) * 4}
  # A pool that holds another job's pod is not entered, even with free nodes.
  assert _placements(affinity, "demo", pools, {"pool-a": ["other"]}, 4) == {("pool-b",) * 4}
  _, pod, _ = job_parts(rendered(capsys, "--accelerator=tpu", "--tpu-topology=2x2",
                                 "--nodes=1"))
  assert "affinity" not in pod  # One host: nothing to keep together.


def _allocatable_gib(machine) -> tuple[float, float]:
  """GKE Standard's allocatable (vCPU, GiB) of a machine: its reservation formula, 100 MiB
  eviction threshold (cloud.google.com/kubernetes-engine/docs/concepts/plan-node-sizes)."""
  memory = machine.memory_gb * 1e9 / 2**30  # Conservative: GB taken as 10^9 bytes.
  reserved, left = 0.0, memory
  for size, share in ((4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (math.inf, 0.02)):
    part = min(left, size)
    reserved, left = reserved + part * share, left - part
  cpu_reserved, left = 0.0, machine.vcpus
  for size, share in ((1, 0.06), (1, 0.01), (2, 0.005), (math.inf, 0.0025)):
    part = min(left, size)
    cpu_reserved, left = cpu_reserved + part * share, left - part
  return machine.vcpus - cpu_reserved, memory - reserved - 100 / 1024


@pytest.mark.parametrize("label", sorted(k8s_render.SIZING))
def test_default_resources_fit_the_machine_types(label):
  sizing = k8s_render.SIZING[label]
  for machine in sizing.machines:
    cpu, memory = _allocatable_gib(machine)
    # Room for the node's system pods (logging, device plugin): half a CPU and 1 GiB.
    assert sizing.cpu * machine.accelerators + 0.5 <= cpu, machine
    assert sizing.memory_gib * machine.accelerators + 1 <= memory, machine


def test_resources_and_shared_memory(capsys):
  _, pod, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=8"))
  resources = container["resources"]
  assert resources["requests"] == {"cpu": "176", "memory": "1536Gi"}  # a3-highgpu-8g
  assert resources["limits"]["memory"] == "1536Gi"
  (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
  assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
  _, pod, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=1",
                                         "--gpu-type=nvidia-l4"))
  assert container["resources"]["requests"] == {"cpu": "3", "memory": "10Gi"}
  assert [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]["sizeLimit"] == "1Gi"
  _, pod, container = job_parts(rendered(capsys, "--nodes=2", "--gpus-per-node=2",
                                         "--gpu-type=nvidia-tesla-t4", "--cpu=7500m",
                                         "--memory=40Gi", "--shm-size=8Gi"))
  assert container["resources"]["requests"] == {"cpu": "7500m", "memory": "40Gi"}
  assert container["resources"]["limits"]["memory"] == "40Gi"
  assert [v for v in pod["volumes"] if v["name"] == "dshm"][0]["emptyDir"]["sizeLimit"] == "8Gi"
  _, _, container = job_parts(rendered(capsys, "--accelerator=tpu", "--nodes=2"))
  assert container["resources"]["requests"] == {"cpu": "80", "memory": "144Gi"}
  _, pod, container = job_parts(rendered(capsys, "--nodes=2"))
  assert container["resources"]["requests"] == {"cpu": "2", "memory": "8Gi"}
  assert [v["name"] for v in pod["volumes"]] == ["tmp", "compile-cache"]  # No /dev/shm.


@pytest.mark.parametrize("flags", [
    ["--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4", "--num-slices=2", "--jobset"],
    ["--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4", "--indexed-job"],
    ["--gpus-per-node=2", "--gpu-type=nvidia-tesla-t4", "--cpu=8", "--memory=30Gi", "--jobset"],
], ids=["multislice", "tpu-affinity", "gpu-explicit-resources"])
def test_preflight_renders_validate(flags, capsys, jobset_validator):  # pylint: disable=redefined-outer-name
  code, out, err = launch(["render", "--name=demo", f"--image={REGISTRY}:v1",
                           f"--workdir={BUCKET}/demo", *flags], capsys)
  assert code == 0, err
  for doc in yaml.safe_load_all(out):
    validate(doc, jobset_validator)


def test_lifetime_restart_codes_and_slices(capsys):
  spec, _, _ = job_parts(rendered(capsys, "--nodes=2", "--ttl-after-finished=600",
                                  "--fail-exit-codes=1,2,3,139"))
  assert spec["ttlSecondsAfterFinished"] == 600
  (rule,) = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
  assert rule["onExitCodes"]["values"] == [1, 2, 3, 139]
  (jobset,) = rendered(capsys, "--nodes=2", "--fail-exit-codes=2", jobset=True)
  spec, _, _ = job_parts([jobset])
  assert jobset["spec"]["ttlSecondsAfterFinished"] == 86400
  assert "ttlSecondsAfterFinished" not in spec  # The JobSet owns its Jobs' lifetime.
  (rule,) = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
  assert rule["onExitCodes"]["values"] == [2]
  (jobset,) = rendered(capsys, "--accelerator=tpu", "--tpu-topology=4x4", "--nodes=4",
                       "--num-slices=2", jobset=True)
  (replicated,) = jobset["spec"]["replicatedJobs"]
  assert replicated["replicas"] == 2
  env = env_of(job_parts([jobset])[2])
  assert not {"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} & set(env)
  assert env["MEGASCALE_NUM_SLICES"] == "2"
  assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "demo-workers-0-0.demo"
  assert env["MEGASCALE_SLICE_ID"] == {"fieldRef": {
      "fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}}


@pytest.mark.parametrize("flags, message", [
    (["--gpu-type=nvidia-tesla-t4", "--gpus-per-node=1"], "no default --cpu/--memory"),
    (["--gpus-per-node=8", "--memory=16Gi", "--shm-size=16Gi"], "must be below the pod's memory"),
    (["--gpu-type=nvidia-l4", "--gpus-per-node=1", "--shm-size=10Gi"], "(10Gi)"),
    (["--shm-size=1Gi"], "--shm-size applies to --accelerator=gpu"),
    (["--cpu=two"], "--cpu='two'"),
    (["--memory=8"], "--memory='8'"),
    (["--fail-exit-codes=1,1"], "--fail-exit-codes"),
    (["--fail-exit-codes=0"], "--fail-exit-codes"),
    (["--num-slices=2", "--accelerator=tpu", "--nodes=2", "--indexed-job"], "needs a JobSet"),
    (["--num-slices=2", "--gpus-per-node=1"], "needs a JobSet"),
    (["--no-host-network", "--gpus-per-node=1"], "--no-host-network does not apply"),
    (["--ttl-after-finished=-1"], "--ttl-after-finished"),
    (["--", CONFIG, "--config.x=a\nb"], "control characters"),
])
def test_bad_resource_and_policy_flags_exit_2(flags, message, capsys):
  argv = ["render", "--name=demo", f"--image={REGISTRY}:v1", f"--workdir={BUCKET}/demo", *flags]
  code, out, err = launch(argv, capsys)
  assert (code, out) == (2, "")
  assert message in err and len(err.strip().splitlines()) == 1


def test_exit_codes_are_the_trainers_one_list():
  from trainer import errors  # pylint: disable=g-import-not-at-top
  # 1 is Python's exit code for an unhandled exception; the others are the trainer's classes.
  assert common.FAIL_FAST_EXIT_CODES == (1, errors.UserError.exit_code, errors.Diverged.exit_code)
  assert common.PREEMPTED_EXIT_CODE == errors.Preempted.exit_code
  assert common.PREEMPTED_EXIT_CODE not in common.FAIL_FAST_EXIT_CODES
  # The YAML under k8s/ keeps literal lists, for `kubectl kustomize`; they are the same list.
  (job,) = [d for d in k8s_render.kustomize(k8s_render.K8S_DIR / "base") if d["kind"] == "Job"]
  (jobset,) = k8s_render.kustomize(k8s_render.K8S_DIR / "jobset")
  for spec in (job["spec"], jobset["spec"]["replicatedJobs"][0]["template"]["spec"]):
    (rule,) = [r for r in spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
    assert tuple(rule["onExitCodes"]["values"]) == common.FAIL_FAST_EXIT_CODES


_PEER = """
import sys, time
import jax
jax.config.update("jax_platforms", "cpu")
index, address, init_timeout = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index,
                           coordinator_bind_address=address, heartbeat_timeout_seconds=10,
                           initialization_timeout=init_timeout)
from jax.experimental import multihost_utils
print("joined", flush=True)
for step in range(10**6):
  multihost_utils.process_allgather(jax.numpy.array([step]))
  if step == 3:
    print("stepping", flush=True)
  time.sleep(0.2)
"""


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(240)
def test_a_recreated_process_cannot_join_running_peers(tmp_path):
  """What an Indexed Job does after one pod dies, on real JAX: the recreated process (same index)
  is refused by the running coordination service, and the surviving peer aborts too (134): no
  step is trained until every process starts again. The reason several nodes are a JobSet."""
  script = tmp_path / "peer.py"
  script.write_text(_PEER)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}

  def start(index):
    return subprocess.Popen([sys.executable, str(script), str(index), address, "20"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

  first, second = start(0), start(1)
  for proc in (first, second):
    for line in proc.stdout:
      if line.startswith("stepping"):
        break
  second.kill()  # The pod of index 1 dies (SIGKILL, 137) ...
  second.wait()
  again = start(1)  # ... and is recreated with the same index while index 0 still runs.
  outputs = [proc.communicate(timeout=180)[0] for proc in (first, again)]
  assert [first.returncode, again.returncode] == [-6, -6], outputs  # SIGABRT: exit code 134
  assert "different incarnation" in outputs[0]
  assert "stepping" not in outputs[1]
