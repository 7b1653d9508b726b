"""`python -m launch k8s render|apply|logs|status|wait|delete`: the trainer as a Kubernetes job.

The manifests are the plain YAML files under `k8s/`: an Indexed Job plus a headless Service in
`base/` (the CPU profile), the overlays `overlays/gpu/` and `overlays/tpu-gke/`, and the `jobset/`
variant. `render` builds them with the part of kustomize they use (resources and JSON 6902 patches;
`kubectl kustomize DIR` builds the same objects), applies the flags as edits of the parsed objects
and prints them with `yaml.safe_dump`. Every kubectl call is an argv list, every name is checked
before anything is built, and `--dry-run` prints each argv (and the manifests a command reads on
stdin) and runs nothing.

Examples (docs/gke.md has the full walk-through):
  python -m launch k8s render --nodes=2 --image=IMAGE --workdir=gs://BUCKET/runs/r1 -- --config=...
  python -m launch k8s apply --gpus-per-node=8 --nodes=2 --image=IMAGE --workdir=... -- --config=...
  python -m launch k8s logs --name=NAME --nodes=2 --follow
  python -m launch k8s wait --name=NAME
  python -m launch k8s delete --name=NAME

Exit codes of `status` and `wait`: 0 when the job succeeded; the trainer's exit code that failed it
(1, 2, 3, 42 or 128+N) when it failed; 75 while it is pending or running.

Common issues: a Job's pod template cannot change, so `delete` before applying again under the same
name; `logs` selects pods by the completion-index label (Kubernetes 1.28+); `--jobset` needs the
JobSet controller; a TPU slice needs --nodes = chips in --tpu-topology / --tpus-per-node.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import pathlib
import queue
import re
import shutil
import subprocess
import sys
import threading
import time

import yaml

from launch import common

K8S_DIR = pathlib.Path(__file__).resolve().parent.parent / "k8s"
PROFILES = {"cpu": "base", "gpu": "overlays/gpu", "tpu": "overlays/tpu-gke"}
CONTAINER = "trainer"
REPLICATED_JOB = "workers"
INDEX_KEY = "batch.kubernetes.io/job-completion-index"
STILL_RUNNING = 75  # sysexits EX_TEMPFAIL: not finished, ask again later.
_GPU_SELECTOR = "cloud.google.com/gke-accelerator"
_TPU_SELECTOR = "cloud.google.com/gke-tpu-accelerator"
_TPU_TOPOLOGY = "cloud.google.com/gke-tpu-topology"

# Docker reference grammar: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
_HOST_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"^(?:{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]{{1,5}})?/)?"
                    rf"{_PATH_PART}(?:/{_PATH_PART})*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$")
_GCS_URL = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](?:/[A-Za-z0-9._~=+@,/-]*)?$")
_TOPOLOGY = re.compile(r"^[1-9][0-9]{0,2}(?:x[1-9][0-9]{0,2}){1,2}$")
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Rendering.


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


def render(args: argparse.Namespace) -> list[dict]:
  """Returns the manifests of the job that `args` (already checked) describes."""
  docs = kustomize(K8S_DIR / PROFILES[args.accelerator])
  service, job = _one(docs, "Service"), _one(docs, "Job")
  port = service["spec"]["ports"][0]["port"]
  for doc in docs:
    _set_metadata(doc, args)
  service["spec"]["selector"] = {"batch.kubernetes.io/job-name": args.name}
  _edit_job(job, args, coordinator=f"{args.name}-0.{args.name}:{port}")
  if args.accelerator == "gpu":
    _edit_gpu(job, args)
  elif args.accelerator == "tpu":
    _edit_tpu(job, args)
  if args.jobset:
    return [_to_jobset(job, args, port)]
  return docs


def dump(docs: list[dict]) -> str:
  """Returns `docs` as one YAML stream, each document opened by `---`."""
  return yaml.safe_dump_all(docs, explicit_start=True, sort_keys=False)


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
  pod = spec["template"]["spec"]
  pod["subdomain"] = args.name
  pod["serviceAccountName"] = args.service_account
  container = _container(pod)
  container["image"] = args.image
  trainer_args = list(args.trainer_args) if args.trainer_args else container["args"]
  container["args"] = trainer_args + [f"--workdir={args.workdir}"]
  _set_env(container, "JAX_COORDINATOR_ADDRESS", coordinator)
  _set_env(container, "JAX_NUM_PROCESSES", str(args.nodes))


def _edit_gpu(job: dict, args: argparse.Namespace) -> None:
  pod = job["spec"]["template"]["spec"]
  if args.gpu_type:
    pod["nodeSelector"][_GPU_SELECTOR] = args.gpu_type
  if args.gpus_per_node:
    _container(pod)["resources"]["limits"]["nvidia.com/gpu"] = args.gpus_per_node


def _edit_tpu(job: dict, args: argparse.Namespace) -> None:
  pod = job["spec"]["template"]["spec"]
  container = _container(pod)
  selector, limits = pod["nodeSelector"], container["resources"]["limits"]
  if args.tpu_accelerator:
    selector[_TPU_SELECTOR] = args.tpu_accelerator
  if args.tpu_topology:
    selector[_TPU_TOPOLOGY] = args.tpu_topology
  if args.tpus_per_node:
    limits["google.com/tpu"] = args.tpus_per_node
  chips = math.prod(int(n) for n in selector[_TPU_TOPOLOGY].split("x"))
  per_node = limits["google.com/tpu"]
  if chips != args.nodes * per_node:
    raise common.UsageError(
        f"--nodes={args.nodes}: a {selector[_TPU_TOPOLOGY]} slice has {chips} chips and each node"
        f" {per_node} (--tpus-per-node), so expected --nodes={chips / per_node:g}")
  if args.tpu_privileged:
    # The documented exception for TPU node pools older than GKE 1.28; the API rejects
    # privileged together with allowPrivilegeEscalation: false.
    container["securityContext"].update(privileged=True, allowPrivilegeEscalation=True)


def _to_jobset(job: dict, args: argparse.Namespace, port: int) -> dict:
  (jobset,) = kustomize(K8S_DIR / "jobset")
  _set_metadata(jobset, args)
  jobset["spec"]["network"]["subdomain"] = args.name
  jobset["spec"]["failurePolicy"]["maxRestarts"] = args.max_restarts
  (replicated,) = jobset["spec"]["replicatedJobs"]
  spec = replicated["template"]["spec"]
  for key, value in copy.deepcopy(job["spec"]).items():
    spec.setdefault(key, value)  # The JobSet's own backoffLimit and podFailurePolicy win.
  pod = spec["template"]["spec"]
  del pod["subdomain"]  # JobSet sets it from spec.network.
  host = f"{args.name}-{replicated['name']}-0-0.{args.name}"
  _set_env(_container(pod), "JAX_COORDINATOR_ADDRESS", f"{host}:{port}")
  return jobset


# ---------------------------------------------------------------------------------------------
# Checking the flags.


def _check(args: argparse.Namespace) -> argparse.Namespace:
  """Validates every name and value before anything is built. Raises UsageError."""
  common.validate_name(args.name, "--name", max_len=40)
  common.validate_name(args.namespace, "--namespace")
  for flag, low, high in (("--nodes", 1, 4096), ("--max-restarts", 0, 1000),
                          ("--gpus-per-node", 1, 16), ("--tpus-per-node", 1, 8),
                          ("--timeout", 0, 10**7), ("--poll-seconds", 0.1, 3600)):
    value = getattr(args, flag[2:].replace("-", "_"), None)
    if value is not None and not low <= value <= high:
      raise common.UsageError(f"{flag}={value}: expected a number from {low} to {high}")
  if getattr(args, "image", None) is not None:  # render and apply
    _check_job(args)
  if not args.dry_run and args.verb != "render" and shutil.which("kubectl") is None:
    raise common.UsageError("kubectl is not on PATH: install it, or use --dry-run")
  return args


def _check_job(args: argparse.Namespace) -> None:
  if not _IMAGE.match(args.image) or len(args.image) > 255:
    raise common.UsageError(f"--image={args.image!r} is not an image reference like"
                            " REGISTRY/PATH:TAG or REGISTRY/PATH@sha256:DIGEST")
  if not _GCS_URL.match(args.workdir):
    raise common.UsageError(f"--workdir={args.workdir!r}: expected gs://BUCKET/PATH (letters,"
                            " digits and ._~=+@,/- only); a pod's own disk does not outlive it")
  common.validate_name(args.service_account, "--service-account")
  _check_accelerator(args)
  args.trainer_args = _check_trainer_args(args.trainer_args)


def _check_accelerator(args: argparse.Namespace) -> None:
  gpu_flags = [f for f, v in (("--gpus-per-node", args.gpus_per_node),
                              ("--gpu-type", args.gpu_type)) if v is not None]
  tpu_flags = [f for f, v in (("--tpu-accelerator", args.tpu_accelerator),
                              ("--tpu-topology", args.tpu_topology),
                              ("--tpus-per-node", args.tpus_per_node),
                              ("--tpu-privileged", args.tpu_privileged or None)) if v is not None]
  if args.accelerator is None:
    args.accelerator = "gpu" if gpu_flags else "tpu" if tpu_flags else "cpu"
  wrong = (gpu_flags if args.accelerator != "gpu" else []) + (
      tpu_flags if args.accelerator != "tpu" else [])
  if wrong:
    raise common.UsageError(f"{wrong[0]} does not apply to --accelerator={args.accelerator}")
  for flag, value in (("--gpu-type", args.gpu_type), ("--tpu-accelerator", args.tpu_accelerator)):
    if value is not None:
      common.validate_name(value, flag)
  if args.tpu_topology is not None and not _TOPOLOGY.match(args.tpu_topology):
    raise common.UsageError(f"--tpu-topology={args.tpu_topology!r}: expected AxB or AxBxC")


def _check_trainer_args(trainer_args: list[str]) -> list[str]:
  if trainer_args and trainer_args[0] != "--":
    raise common.UsageError(f"unexpected argument {trainer_args[0]!r}: trainer flags go after --")
  trainer_args = trainer_args[1:]
  for arg in trainer_args:
    if "\0" in arg:
      raise common.UsageError(f"trainer argument {arg!r} contains a NUL character")
    if arg.split("=")[0] in ("--workdir", "-workdir"):
      raise common.UsageError(f"{arg!r}: pass the run directory as the launcher's --workdir")
  return trainer_args


# ---------------------------------------------------------------------------------------------
# Verbs.


def _render_verb(args: argparse.Namespace) -> int:
  print(dump(render(_check(args))), end="")
  return 0


def _apply_verb(args: argparse.Namespace) -> int:
  manifests = dump(render(_check(args)))
  argv = ["kubectl", "apply", "-f", "-"]
  print(("$ " if args.dry_run else "+ ") + common.format_argv(argv), flush=True)
  if args.dry_run:
    print("# stdin of the command above:")
    print(manifests, end="")
    return 0
  return subprocess.run(argv, input=manifests, text=True, check=False).returncode


def _delete_verb(args: argparse.Namespace) -> int:
  _check(args)
  kinds = ["jobset"] if args.jobset else ["job", "service"]
  rc = 0
  for kind in kinds:
    argv = ["kubectl", "delete", kind, args.name, "-n", args.namespace, "--ignore-not-found"]
    if kind != "service":
      argv.append("--cascade=foreground")  # Pods go first, so no trainer outlives its Job.
    rc = common.run(argv, dry_run=args.dry_run) or rc
  return rc


class _KubectlFailed(Exception):
  """`kubectl get` failed (job missing, API unreachable); `returncode` is its exit code."""

  def __init__(self, returncode: int):
    super().__init__(returncode)
    self.returncode = returncode


def _status_verb(args: argparse.Namespace) -> int:
  try:
    return _status(_check(args), echo=True)
  except _KubectlFailed as e:
    return e.returncode


def _wait_verb(args: argparse.Namespace) -> int:
  _check(args)
  deadline = time.monotonic() + args.timeout if args.timeout else math.inf
  code, failures = STILL_RUNNING, 0
  for attempt in itertools.count():
    try:
      code, failures = _status(args, echo=attempt == 0), 0
    except _KubectlFailed as e:
      failures += 1  # An API hiccup is not the job's outcome; three in a row end the wait.
      if failures == 3:
        return e.returncode
    if args.dry_run or code != STILL_RUNNING:
      return code
    if time.monotonic() >= deadline:
      print(f"still running after --timeout={args.timeout}", file=sys.stderr)
      return code
    time.sleep(args.poll_seconds)


def _owner_label(args: argparse.Namespace) -> str:
  key = "jobset.sigs.k8s.io/jobset-name" if args.jobset else "batch.kubernetes.io/job-name"
  return f"{key}={args.name}"


def _status(args: argparse.Namespace, echo: bool) -> int:
  kind = "jobset" if args.jobset else "job"
  outputs = []
  for argv in (["kubectl", "get", kind, args.name, "-n", args.namespace, "-o", "json"],
               ["kubectl", "get", "pods", "-n", args.namespace, "-l", _owner_label(args),
                "-o", "json"]):
    if echo or args.dry_run:
      print(("$ " if args.dry_run else "+ ") + common.format_argv(argv), flush=True)
    if args.dry_run:
      continue
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      print(proc.stderr.strip(), file=sys.stderr)
      raise _KubectlFailed(proc.returncode)
    outputs.append(json.loads(proc.stdout))
  if args.dry_run:
    return 0
  code, message = outcome(outputs[0], outputs[1].get("items", []))
  print(f"{kind}/{args.name}: {message}", flush=True)
  return code


def outcome(obj: dict, pods: list[dict]) -> tuple[int, str]:
  """Returns (exit code, one-line description) of a Job or JobSet and its pods."""
  status = obj.get("status", {})
  true = {c["type"]: c for c in status.get("conditions", []) if c.get("status") == "True"}
  if "Complete" in true or "Completed" in true:
    return 0, "succeeded"
  if "Failed" in true:
    condition = true["Failed"]
    message = condition.get("message", "")
    found = re.search(r"exit code (\d+)", message)
    code = int(found.group(1)) if found else _failed_exit_code(pods)
    return code or 1, f"failed with exit code {code or 1} ({condition.get('reason')}: {message})"
  if "replicatedJobsStatus" in status:  # JobSet
    counts = dict(status["replicatedJobsStatus"][0], restarts=status.get("restarts", 0))
    counts.pop("name", None)
  else:
    counts = {k: status.get(k, 0) for k in ("active", "ready", "succeeded", "failed")}
  return STILL_RUNNING, "running (" + ", ".join(f"{k}={v}" for k, v in counts.items()) + ")"


def _failed_exit_code(pods: list[dict]) -> int:
  """The most recent failing trainer exit code, preferring the fail-fast codes 1, 2 and 3."""
  codes = []
  for pod in pods:
    for status in pod.get("status", {}).get("containerStatuses", []):
      if status.get("name") != CONTAINER:
        continue
      state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get(
          "terminated")
      if state and state.get("exitCode"):
        codes.append((state["exitCode"] in (1, 2, 3), state.get("finishedAt", ""),
                      state["exitCode"]))
  return max(codes)[2] if codes else 1


def _logs_verb(args: argparse.Namespace) -> int:
  _check(args)
  argvs = []
  for index in range(args.nodes):
    selector = f"{_owner_label(args)},{INDEX_KEY}={index}"
    argv = ["kubectl", "logs", "-n", args.namespace, "-l", selector, "-c", CONTAINER,
            "--tail=-1", "--timestamps"]
    argvs.append(argv + ["--follow"] if args.follow else argv)
  for argv in argvs:
    print(("$ " if args.dry_run else "+ ") + common.format_argv(argv),
          file=sys.stdout if args.dry_run else sys.stderr, flush=True)
  return 0 if args.dry_run else stream_logs(argvs, follow=args.follow)


def stream_logs(argvs: list[list[str]], follow: bool) -> int:
  """Runs one `kubectl logs` per pod index and prints every line as `[pod N] line`.

  With `follow`, lines print as they arrive; otherwise they are merged by kubectl's timestamps so
  the output reads in time order across pods. Returns the first non-zero exit code, or 0.
  """
  lines: queue.Queue = queue.Queue()
  procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace") for argv in argvs]
  for index, proc in enumerate(procs):
    threading.Thread(target=_pump, args=(index, proc.stdout, lines), daemon=True).start()
  collected, open_streams = [], len(procs)
  while open_streams:
    item = lines.get()
    if item is None:
      open_streams -= 1
    elif follow:
      print(f"[pod {item[1]}] {item[3]}", flush=True)
    else:
      collected.append(item)
  for _, index, _, text in sorted(collected):
    print(f"[pod {index}] {text}")
  codes = [proc.wait() for proc in procs]
  return next((code for code in codes if code), 0)


def _pump(index: int, stream, lines: queue.Queue) -> None:
  """Queues (time key, pod index, line number, text) for each line of one pod's log."""
  key = ("", "")
  for number, raw in enumerate(stream):
    found = _TIMESTAMP.match(raw.rstrip("\n"))
    if found:  # RFC 3339 with trailing zeros trimmed: pad the fraction so keys compare.
      key = (found.group(1), (found.group(2) or "").ljust(9, "0"))
      text = found.group(3)
    else:
      text = raw.rstrip("\n")
    lines.put((key, index, number, text))
  lines.put(None)


# ---------------------------------------------------------------------------------------------
# Command line.


def add_parser(subparsers) -> None:
  """Adds `k8s` and its verbs to the `python -m launch` parser."""
  parser = subparsers.add_parser("k8s", help="run the trainer as a Kubernetes job",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
  verbs = parser.add_subparsers(dest="verb", required=True)
  target = argparse.ArgumentParser(add_help=False)
  target.add_argument("--name", default="jaxjob",
                      help="Job or JobSet (and Service) name (default: %(default)s)")
  target.add_argument("--namespace", default="jaxjob", help="(default: %(default)s)")
  target.add_argument("--jobset", action="store_true", help="a JobSet instead of an Indexed Job")
  target.add_argument("--dry-run", action="store_true",
                      help="print each command and the manifests; run nothing")
  spec = argparse.ArgumentParser(add_help=False)
  _add_job_flags(spec)
  for verb, func, parents, text in (
      ("render", _render_verb, [target, spec], "print the manifests"),
      ("apply", _apply_verb, [target, spec], "render and pipe to `kubectl apply -f -`"),
      ("logs", _logs_verb, [target], "all pods' logs, each line prefixed with [pod N]"),
      ("status", _status_verb, [target], "print the state; exit code = outcome (75: running)"),
      ("wait", _wait_verb, [target], "block until the job ends; exit code = outcome"),
      ("delete", _delete_verb, [target], "delete the job, its pods and its Service")):
    verb_parser = verbs.add_parser(verb, parents=parents, help=text, description=text)
    verb_parser.set_defaults(func=func)
    if verb == "logs":
      verb_parser.add_argument("--nodes", type=int, required=True, help="pods (completions)")
      verb_parser.add_argument("--follow", action="store_true", help="stream until the pods end")
    elif verb == "wait":
      verb_parser.add_argument("--timeout", type=int, default=0, help="seconds, 0: no limit")
      verb_parser.add_argument("--poll-seconds", type=float, default=15.0)


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--image", required=True, help="trainer image, e.g. REGISTRY/PATH:TAG")
  parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH of the run")
  parser.add_argument("--nodes", type=int, default=1, help="pods = JAX processes (default: 1)")
  parser.add_argument("--service-account", default="jaxjob",
                      help="Kubernetes service account that Workload Identity grants the bucket")
  parser.add_argument("--max-restarts", type=int, default=3,
                      help="gang restarts after exit 42 or a signal death (default: 3)")
  parser.add_argument("--accelerator", choices=sorted(PROFILES),
                      help="default: gpu with --gpus-per-node, tpu with --tpu-*, else cpu")
  parser.add_argument("--gpus-per-node", type=int, help="nvidia.com/gpu per pod")
  parser.add_argument("--gpu-type", help="cloud.google.com/gke-accelerator, e.g. nvidia-l4")
  parser.add_argument("--tpu-accelerator",
                      help="cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5-lite-podslice")
  parser.add_argument("--tpu-topology", help="cloud.google.com/gke-tpu-topology, e.g. 4x4")
  parser.add_argument("--tpus-per-node", type=int, help="google.com/tpu chips per pod")
  parser.add_argument("--tpu-privileged", action="store_true",
                      help="privileged TPU container (GKE node pools before 1.28 only)")
  parser.add_argument("trainer_args", nargs=argparse.REMAINDER,
                      help="-- then trainer flags, e.g. -- --config=trainer/configs/default.py")
