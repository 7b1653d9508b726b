"""The manifests of `python -m launch k8s`: the YAML under `k8s/`, built, then edited by the flags.

`kustomize` builds a directory with the part of kustomize the files use (resources and JSON 6902
patches; tests/test_k8s.py checks that `kubectl kustomize DIR` builds the same objects). `render`
then sets what the flags own: names, counts, image, trainer arguments, process variables,
resources (`SIZING`: per-accelerator defaults sized against GKE machine types), placement and the
restart policy, and turns the Indexed Job into a JobSet when asked.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import pathlib
import re

import yaml

from launch import common

K8S_DIR = pathlib.Path(__file__).resolve().parent.parent / "k8s"
PROFILES = {"cpu": "base", "gpu": "overlays/gpu", "tpu": "overlays/tpu-gke"}
CONTAINER = "trainer"
REPLICATED_JOB = "workers"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
JOB_INDEX_KEY = "jobset.sigs.k8s.io/job-index"  # Which slice (replica) of a JobSet a pod is in.
NODE_POOL = "cloud.google.com/gke-nodepool"
EXCLUSIVE_TOPOLOGY = "alpha.jobset.sigs.k8s.io/exclusive-topology"
GPU_SELECTOR = "cloud.google.com/gke-accelerator"
TPU_SELECTOR = "cloud.google.com/gke-tpu-accelerator"
TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"
_JOB_NAME = "batch.kubernetes.io/job-name"
_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10,
            "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


@dataclasses.dataclass(frozen=True)
class Machine:
  """A GKE machine type: vCPUs, memory in GB (10^9 bytes) and accelerators (GPUs or TPU chips)."""
  name: str
  vcpus: int
  memory_gb: int
  accelerators: int


@dataclasses.dataclass(frozen=True)
class Sizing:
  """Default requests per GPU or TPU chip, and the machine types they were sized to fit."""
  cpu: int
  memory_gib: int
  machines: tuple[Machine, ...]


# Keyed by the node label value (--gpu-type, --tpu-accelerator). Each default times the machine's
# accelerator count fits every listed machine's allocatable share (GKE's reservation formula,
# checked by tests/test_k8s.py) with room for the node's system pods.
SIZING = {
    "nvidia-l4": Sizing(3, 10, (Machine("g2-standard-4", 4, 16, 1),
                                Machine("g2-standard-96", 96, 384, 8))),
    "nvidia-tesla-a100": Sizing(10, 64, (Machine("a2-highgpu-1g", 12, 85, 1),
                                         Machine("a2-highgpu-8g", 96, 680, 8))),
    "nvidia-a100-80gb": Sizing(10, 140, (Machine("a2-ultragpu-1g", 12, 170, 1),
                                         Machine("a2-ultragpu-8g", 96, 1360, 8))),
    "nvidia-h100-80gb": Sizing(22, 192, (Machine("a3-highgpu-1g", 26, 234, 1),
                                         Machine("a3-highgpu-8g", 208, 1872, 8))),
    "nvidia-h100-mega-80gb": Sizing(22, 192, (Machine("a3-megagpu-8g", 208, 1872, 8),)),
    "nvidia-h200-141gb": Sizing(24, 320, (Machine("a3-ultragpu-8g", 224, 2952, 8),)),
    "nvidia-b200": Sizing(24, 440, (Machine("a4-highgpu-8g", 224, 3968, 8),)),
    "tpu-v4-podslice": Sizing(50, 80, (Machine("ct4p-hightpu-4t", 240, 407, 4),)),
    "tpu-v5-lite-podslice": Sizing(20, 36, (Machine("ct5lp-hightpu-1t", 24, 48, 1),
                                            Machine("ct5lp-hightpu-4t", 112, 192, 4),
                                            Machine("ct5lp-hightpu-8t", 224, 384, 8))),
    "tpu-v5p-slice": Sizing(44, 96, (Machine("ct5p-hightpu-4t", 208, 448, 4),)),
    "tpu-v6e-slice": Sizing(20, 150, (Machine("ct6e-standard-1t", 44, 176, 1),
                                      Machine("ct6e-standard-4t", 180, 720, 4),
                                      Machine("ct6e-standard-8t", 180, 1440, 8))),
}
CPU_DEFAULTS = ("2", "8Gi")  # The CPU profile: per pod, any machine with 4 vCPUs and 16 GB.
SHM_MAX_GIB = 64


def kustomize(directory: pathlib.Path) -> list[dict]:
  """Builds `directory` as `kubectl kustomize` does, for the features the files under k8s/ use.

  Raises:
    ValueError: the kustomization uses a field this reader does not implement.
  """
  kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
  unknown = set(kustomization) - {"apiVersion", "kind", "resources", "patches"}
  if unknown:
    raise ValueError(f"{directory}/kustomization.yaml: unsupported fields {sorted(unknown)}")
  docs: list[dict] = []
  for resource in kustomization.get("resources", []):
    path = directory / resource
    if path.is_dir():
      docs += kustomize(path)
    else:
      docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
  for patch in kustomization.get("patches", []):
    operations = yaml.safe_load((directory / patch["path"]).read_text())
    kind, name = patch["target"]["kind"], patch["target"].get("name")
    for doc in docs:
      if doc["kind"] == kind and name in (None, doc["metadata"]["name"]):
        json_patch(doc, operations)
  return docs


def json_patch(doc: dict, operations: list[dict]) -> None:
  """Applies JSON 6902 `add`, `replace` and `remove` operations to `doc` in place."""
  for operation in operations:
    keys = [k.replace("~1", "/").replace("~0", "~") for k in operation["path"].split("/")[1:]]
    node = doc
    for key in keys[:-1]:
      node = node[int(key)] if isinstance(node, list) else node[key]
    last, op = keys[-1], operation["op"]
    if op == "remove":
      del node[int(last) if isinstance(node, list) else last]
    elif op not in ("add", "replace"):
      raise ValueError(f"unsupported JSON patch operation {op!r} at {operation['path']}")
    elif isinstance(node, list) and last == "-":
      node.append(copy.deepcopy(operation["value"]))
    elif isinstance(node, list):
      index = int(last)
      if op == "add":
        node.insert(index, copy.deepcopy(operation["value"]))
      else:
        node[index] = copy.deepcopy(operation["value"])
    else:
      if op == "replace" and last not in node:
        raise KeyError(f"replace of missing {operation['path']}")
      node[last] = copy.deepcopy(operation["value"])


def quantity(value: str) -> float:
  """A Kubernetes quantity (`500m`, `8Gi`, `16G`) as a number; raises ValueError otherwise."""
  found = _QUANTITY.fullmatch(value)
  if not found:
    raise ValueError(value)
  return float(found.group(1)) * _FACTORS[found.group(2)]


def render(args: argparse.Namespace) -> list[dict]:
  """Returns the manifests of the job that `args` (already checked) describes."""
  docs = kustomize(K8S_DIR / PROFILES[args.accelerator])
  service, job = _one(docs, "Service"), _one(docs, "Job")
  port = service["spec"]["ports"][0]["port"]
  for doc in docs:
    _set_metadata(doc, args)
  service["spec"]["selector"] = {_JOB_NAME: args.name}
  _edit_job(job, args, coordinator=f"{args.name}-0.{args.name}:{port}")
  if args.accelerator == "gpu":
    _edit_gpu(job, args)
  elif args.accelerator == "tpu":
    _edit_tpu(job, args)
  _set_resources(job, args)
  if args.jobset:
    return [_to_jobset(job, args, port)]
  if args.accelerator == "tpu" and args.nodes > 1:
    _keep_slice_in_one_node_pool(job, args)
  return docs


def notes(args: argparse.Namespace) -> list[str]:
  """What the user must know about the rendered job that the manifests cannot enforce."""
  if args.accelerator == "tpu" and not args.no_host_network:
    return ["TPU pods use the host network, so Workload Identity does not apply: they reach",
            "GCS as the TPU node pool's service account (roles/storage.objectUser on the bucket,",
            "cloud-platform scope: docs/gke.md step 0), not as --service-account="
            f"{args.service_account}.",
            "--no-host-network puts them on the pod network, where Workload Identity applies."]
  return []


def dump(docs: list[dict], comments: list[str] = ()) -> str:
  """Returns `docs` as one YAML stream (each document opened by `---`), after `# comments`."""
  head = "".join(f"# {line}\n" for line in comments)
  return head + yaml.safe_dump_all(docs, explicit_start=True, sort_keys=False)


def default_resources(args: argparse.Namespace, pod: dict) -> tuple[str, str]:
  """(cpu, memory) requests of `pod`: SIZING per GPU or TPU chip times the pod's count.

  Raises:
    UsageError: no default is known for the accelerator and --cpu/--memory were not both given.
  """
  if args.accelerator == "cpu":
    return CPU_DEFAULTS
  limits = _container(pod)["resources"]["limits"]
  if args.accelerator == "gpu":
    label, count = pod["nodeSelector"][GPU_SELECTOR], limits["nvidia.com/gpu"]
  else:
    label, count = pod["nodeSelector"][TPU_SELECTOR], limits["google.com/tpu"]
  sizing = SIZING.get(label)
  if sizing is not None:
    return str(sizing.cpu * count), f"{sizing.memory_gib * count}Gi"
  if args.cpu is not None and args.memory is not None:
    return args.cpu, args.memory
  raise common.UsageError(
      f"no default --cpu/--memory for {label} (known: {', '.join(sorted(SIZING))}): pass both")


def _one(docs: list[dict], kind: str) -> dict:
  (doc,) = [d for d in docs if d["kind"] == kind]
  return doc


def _container(pod: dict) -> dict:
  (container,) = [c for c in pod["containers"] if c["name"] == CONTAINER]
  return container


def _set_env(container: dict, name: str, value: str) -> None:
  (entry,) = [e for e in container["env"] if e["name"] == name]
  entry["value"] = value


def _set_metadata(doc: dict, args: argparse.Namespace) -> None:
  rest = {k: v for k, v in doc["metadata"].items() if k not in ("name", "namespace")}
  doc["metadata"] = {"name": args.name, "namespace": args.namespace, **rest}
  doc["metadata"]["labels"]["app.kubernetes.io/instance"] = args.name
  if doc["kind"] == "Job":
    doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] = args.name


def _edit_job(job: dict, args: argparse.Namespace, coordinator: str) -> None:
  spec = job["spec"]
  spec["parallelism"] = spec["completions"] = args.nodes
  # backoffLimit counts failed pods over all indices; one gang restart fails up to `nodes` pods.
  spec["backoffLimit"] = args.max_restarts * args.nodes
  spec["ttlSecondsAfterFinished"] = args.ttl_after_finished
  _set_fail_fast(spec, args.fail_exit_codes)
  pod = spec["template"]["spec"]
  pod["subdomain"] = args.name
  pod["serviceAccountName"] = args.service_account
  container = _container(pod)
  container["image"] = args.image
  trainer_args = list(args.trainer_args) if args.trainer_args else container["args"]
  container["args"] = trainer_args + [f"--workdir={args.workdir}"]
  _set_env(container, "JAX_COORDINATOR_ADDRESS", coordinator)
  _set_env(container, "JAX_NUM_PROCESSES", str(args.nodes))


def _set_fail_fast(job_spec: dict, codes: list[int]) -> None:
  (rule,) = [r for r in job_spec["podFailurePolicy"]["rules"] if "onExitCodes" in r]
  rule["onExitCodes"]["values"] = list(codes)


def _set_resources(job: dict, args: argparse.Namespace) -> None:
  pod = job["spec"]["template"]["spec"]
  resources = _container(pod)["resources"]
  default_cpu, default_memory = default_resources(args, pod)
  memory = args.memory or default_memory
  resources["requests"].update(cpu=args.cpu or default_cpu, memory=memory)
  resources["limits"]["memory"] = memory  # Over the request, the pod would be OOM-killed first.
  shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
  if shm:
    size = args.shm_size or shm_default(memory)
    if quantity(size) >= quantity(memory):
      raise common.UsageError(f"--shm-size={size} must be below the pod's memory ({memory}):"
                              " /dev/shm pages count against the memory limit")
    shm[0]["emptyDir"]["sizeLimit"] = size


def shm_default(memory: str) -> str:
  """An eighth of the pod's memory, 1 to 64 GiB: /dev/shm pages count against the memory limit."""
  gib = int(quantity(memory) // 2**30)
  return f"{min(max(gib // 8, 1), SHM_MAX_GIB)}Gi"


def _edit_gpu(job: dict, args: argparse.Namespace) -> None:
  pod = job["spec"]["template"]["spec"]
  if args.gpu_type:
    pod["nodeSelector"][GPU_SELECTOR] = args.gpu_type
  if args.gpus_per_node:
    _container(pod)["resources"]["limits"]["nvidia.com/gpu"] = args.gpus_per_node


def _edit_tpu(job: dict, args: argparse.Namespace) -> None:
  pod = job["spec"]["template"]["spec"]
  container = _container(pod)
  selector, limits = pod["nodeSelector"], container["resources"]["limits"]
  if args.tpu_accelerator:
    selector[TPU_SELECTOR] = args.tpu_accelerator
  if args.tpu_topology:
    selector[TPU_TOPOLOGY] = args.tpu_topology
  if args.tpus_per_node:
    limits["google.com/tpu"] = args.tpus_per_node
  chips = math.prod(int(n) for n in selector[TPU_TOPOLOGY].split("x"))
  per_node = limits["google.com/tpu"]
  if chips != args.nodes * per_node:
    raise common.UsageError(
        f"--nodes={args.nodes}: a {selector[TPU_TOPOLOGY]} slice has {chips} chips and each node"
        f" {per_node} (--tpus-per-node), so expected --nodes={chips / per_node:g}")
  if args.no_host_network:
    del pod["hostNetwork"], pod["dnsPolicy"]
  if args.tpu_privileged:
    # The documented exception for TPU node pools older than GKE 1.28; the API rejects
    # privileged together with allowPrivilegeEscalation: false.
    container["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)


def _keep_slice_in_one_node_pool(job: dict, args: argparse.Namespace) -> None:
  """Pod affinity that keeps an Indexed Job's pods in one node pool (one TPU slice).

  The first pod may go to any matching pool; every later pod must join a pool that holds a pod of
  this Job, and none may join a pool that holds a pod of another Job (what JobSet's
  exclusive-topology annotation does for a JobSet).
  """
  own = {"labelSelector": {"matchLabels": {_JOB_NAME: args.name}}, "topologyKey": NODE_POOL}
  others = {"labelSelector": {"matchExpressions": [
      {"key": _JOB_NAME, "operator": "Exists"},
      {"key": _JOB_NAME, "operator": "NotIn", "values": [args.name]}]}, "topologyKey": NODE_POOL}
  job["spec"]["template"]["spec"]["affinity"] = {
      "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [own]},
      "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [others]}}


def _to_jobset(job: dict, args: argparse.Namespace, port: int) -> dict:
  (jobset,) = kustomize(K8S_DIR / "jobset")
  _set_metadata(jobset, args)
  spec = jobset["spec"]
  spec["network"]["subdomain"] = args.name
  spec["failurePolicy"]["maxRestarts"] = args.max_restarts
  spec["ttlSecondsAfterFinished"] = args.ttl_after_finished
  if args.accelerator == "tpu":
    # One slice per node pool, and no other Job in it (JobSet's TPU guide calls this crucial).
    jobset["metadata"]["annotations"] = {EXCLUSIVE_TOPOLOGY: NODE_POOL}
  (replicated,) = spec["replicatedJobs"]
  replicated["replicas"] = args.num_slices
  job_spec = replicated["template"]["spec"]
  _set_fail_fast(job_spec, args.fail_exit_codes)
  for key, value in copy.deepcopy(job["spec"]).items():
    if key != "ttlSecondsAfterFinished":  # The JobSet owns its Jobs' lifetime.
      job_spec.setdefault(key, value)  # The JobSet's own backoffLimit and podFailurePolicy win.
  pod = job_spec["template"]["spec"]
  del pod["subdomain"]  # JobSet sets it from spec.network.
  host = f"{args.name}-{replicated['name']}-0-0.{args.name}"
  container = _container(pod)
  if args.num_slices == 1:
    _set_env(container, "JAX_COORDINATOR_ADDRESS", f"{host}:{port}")
  else:
    _multislice_env(container, args, host)
  return jobset


def _multislice_env(container: dict, args: argparse.Namespace, host: str) -> None:
  """Process variables of a multi-slice TPU job: JAX's own GKE TPU detection, joined by DCN.

  Without JAX_COORDINATOR_ADDRESS the trainer calls `jax.distributed.initialize()` with no
  arguments on a TPU host; JAX then numbers the processes from TPU_WORKER_ID (set by GKE on each
  TPU pod) plus MEGASCALE_SLICE_ID x hosts per slice, and coordinates at the first host of slice 0.
  """
  names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  container["env"] = [e for e in container["env"] if e["name"] not in names] + [
      {"name": "MEGASCALE_COORDINATOR_ADDRESS", "value": host},
      {"name": "MEGASCALE_NUM_SLICES", "value": str(args.num_slices)},
      {"name": "MEGASCALE_SLICE_ID", "valueFrom": {"fieldRef": {
          "fieldPath": f"metadata.labels['{JOB_INDEX_KEY}']"}}},
  ]
