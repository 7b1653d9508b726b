"""`python -m launch k8s render|apply|logs|status|wait|delete`: the trainer as a Kubernetes job.

The manifests are the plain YAML files under `k8s/`: an Indexed Job plus a headless Service in
`base/` (the CPU profile), the overlays `overlays/gpu/` and `overlays/tpu-gke/`, and the `jobset/`
variant; `launch/k8s_render.py` builds them and applies the flags. Every kubectl call is an argv
list, every value is checked (launch/common.py) before anything is built, and `--dry-run` prints
each argv (and the manifests a command reads on stdin) and runs nothing.

Examples (docs/gke.md has the full walk-through):
  python -m launch k8s render --nodes=2 --image=IMAGE --workdir=gs://BUCKET/runs/r1 -- --config=...
  python -m launch k8s apply --gpus-per-node=8 --nodes=2 --image=IMAGE --workdir=... -- --config=...
  python -m launch k8s apply --wait --logs --delete ...  (apply, stream, outcome, delete)
  python -m launch k8s logs --name=NAME --follow
  python -m launch k8s wait --name=NAME
  python -m launch k8s delete --name=NAME

Exit codes of `status`, `wait` and `apply --wait`: 0 when the job succeeded; the trainer's exit
code that failed it (1, 2, 3, 42 or 128+N) when it failed; 75 while it is pending or running.

More than one node is a JobSet unless --indexed-job: when one JAX process dies, its peers abort
(JAX is fail-stop) and a recreated process cannot join their running coordination service, so the
JobSet's restart of every pod at once is the restart that converges (docs/gke.md). `logs`,
`status`, `wait` and `delete` find which kind a name is, unless told (--jobset, --indexed-job).

Common issues: a Job's pod template cannot change, so `delete` before applying again under the same
name; a finished job is deleted after --ttl-after-finished seconds (its records stay on GCS); a
JobSet needs the JobSet controller; a TPU slice needs --nodes = chips in --tpu-topology /
--tpus-per-node.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import time

from launch import common
from launch import k8s_logs
from launch import k8s_render
from launch.k8s_render import CONTAINER, PROFILES, dump

STILL_RUNNING = 75  # sysexits EX_TEMPFAIL: not finished, ask again later.
_TOPOLOGY = re.compile(r"^[1-9][0-9]{0,2}(?:x[1-9][0-9]{0,2}){1,2}$")
_CPU = re.compile(r"[0-9]+(\.[0-9]+)?m?")
_MEMORY = re.compile(r"[0-9]+(Ki|Mi|Gi|Ti|k|M|G|T)")
_RANGES = (("--nodes", 1, 4096), ("--max-restarts", 0, 1000), ("--gpus-per-node", 1, 16),
           ("--tpus-per-node", 1, 8), ("--num-slices", 1, 64), ("--timeout", 0, 10**7),
           ("--poll-seconds", 0.1, 3600), ("--ttl-after-finished", 0, 10**8))


# ---------------------------------------------------------------------------------------------
# Checking the flags.


def _check(args: argparse.Namespace) -> argparse.Namespace:
  """Validates every name and value before anything is built. Raises UsageError."""
  common.validate_name(args.name, "--name", max_len=40)
  common.validate_name(args.namespace, "--namespace")
  for flag, low, high in _RANGES:
    value = getattr(args, flag[2:].replace("-", "_"), None)
    if value is not None and not low <= value <= high:
      raise common.UsageError(f"{flag}={value}: expected a number from {low} to {high}")
  if getattr(args, "image", None) is not None:  # render and apply
    _check_job(args)
    # One pod's restart is not the job's: a recreated JAX process cannot join the peers'
    # running coordination service, so several nodes restart together, as a JobSet.
    args.jobset = args.jobset or (not args.indexed_job and args.nodes * args.num_slices > 1)
  if not args.dry_run and args.verb != "render" and shutil.which("kubectl") is None:
    raise common.UsageError("kubectl is not on PATH: install it, or use --dry-run")
  return args


def _check_job(args: argparse.Namespace) -> None:
  common.validate_image(args.image)
  common.validate_gcs_url(args.workdir)
  common.validate_name(args.service_account, "--service-account")
  _check_accelerator(args)
  args.trainer_args = common.trainer_args(args.trainer_args)
  args.fail_exit_codes = _exit_codes(args.fail_exit_codes)
  for flag, value, pattern in (("--cpu", args.cpu, _CPU), ("--memory", args.memory, _MEMORY),
                               ("--shm-size", args.shm_size, _MEMORY)):
    if value is not None and (not pattern.fullmatch(value) or k8s_render.quantity(value) <= 0):
      raise common.UsageError(f"{flag}={value!r}: expected a Kubernetes quantity such as"
                              f" {'8 or 500m' if flag == '--cpu' else '64Gi'}")
  if args.shm_size and args.accelerator != "gpu":
    raise common.UsageError(f"--shm-size applies to --accelerator=gpu, not {args.accelerator}")
  if args.num_slices > 1 and (args.indexed_job or args.accelerator != "tpu"):
    raise common.UsageError(f"--num-slices={args.num_slices} needs a JobSet and"
                            " --accelerator=tpu (one Job per slice)")


def _exit_codes(text: str) -> list[int]:
  codes = text.split(",")
  if not all(c.isdigit() and 1 <= int(c) <= 255 for c in codes) or len(set(codes)) < len(codes):
    raise common.UsageError(f"--fail-exit-codes={text!r}: expected distinct exit codes 1 to 255"
                            " separated by commas, such as 1,2,3")
  return [int(c) for c in codes]


def _check_accelerator(args: argparse.Namespace) -> None:
  gpu_flags = [f for f, v in (("--gpus-per-node", args.gpus_per_node),
                              ("--gpu-type", args.gpu_type)) if v is not None]
  tpu_flags = [f for f, v in (("--tpu-accelerator", args.tpu_accelerator),
                              ("--tpu-topology", args.tpu_topology),
                              ("--tpus-per-node", args.tpus_per_node),
                              ("--tpu-privileged", args.tpu_privileged or None),
                              ("--no-host-network", args.no_host_network or None)) if v is not None]
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


# ---------------------------------------------------------------------------------------------
# Verbs.


def _manifests(args: argparse.Namespace) -> str:
  return dump(k8s_render.render(args), k8s_render.notes(args))


def _render_verb(args: argparse.Namespace) -> int:
  print(_manifests(_check(args)), end="")
  return 0


def _apply_verb(args: argparse.Namespace) -> int:
  manifests = _manifests(_check(args))
  if (args.logs or args.delete) and not args.wait:
    raise common.UsageError("--logs and --delete go with --wait")
  argv = ["kubectl", "apply", "-f", "-"]
  common.echo(argv, dry_run=args.dry_run)
  if args.dry_run:
    print("# stdin of the command above:")
    print(manifests, end="")
  else:
    rc = subprocess.run(argv, input=manifests, text=True, check=False).returncode
    if rc or not args.wait:
      return rc
  if not args.wait:
    return 0
  try:
    if args.logs and k8s_logs.follow_when_started(args, _status_quiet) == 130:
      return 130  # Ctrl-C while streaming: stop here (and delete, if asked).
    return _wait(args)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  finally:
    if args.delete:
      _delete(args)


def _find_kind(args: argparse.Namespace) -> None:
  """Sets `args.jobset` for a verb on an existing job: an Indexed Job if one has the name.

  Raises:
    _KubectlFailed: kubectl could not ask (API unreachable, no credentials).
  """
  if args.jobset or args.indexed_job:
    return
  argv = ["kubectl", "get", "job", args.name, "-n", args.namespace, "--ignore-not-found",
          "-o", "name"]
  common.echo(argv, dry_run=args.dry_run, file=sys.stdout if args.dry_run else sys.stderr)
  if args.dry_run:
    print("# an Indexed Job if the command above names one, else a JobSet (shown here)")
    args.jobset = True
    return
  proc = subprocess.run(argv, capture_output=True, text=True, check=False)
  if proc.returncode:
    print(proc.stderr.strip(), file=sys.stderr)
    raise _KubectlFailed(proc.returncode)
  args.jobset = not proc.stdout.strip()


def _delete_verb(args: argparse.Namespace) -> int:
  return _on_found(args, _delete)


def _delete(args: argparse.Namespace) -> int:
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
  return _on_found(args, lambda found: _status(found, echo=True))


def _wait_verb(args: argparse.Namespace) -> int:
  return _on_found(args, _wait)


def _on_found(args: argparse.Namespace, verb) -> int:
  """Runs `verb(args)` once the job's kind is known; kubectl's exit code when it is not."""
  try:
    _find_kind(_check(args))
    return verb(args)
  except _KubectlFailed as e:
    return e.returncode


def _wait(args: argparse.Namespace) -> int:
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


def _status_quiet(args: argparse.Namespace) -> int:
  """The outcome without printing (STILL_RUNNING when kubectl failed: asked again later)."""
  try:
    return _status(args, echo=False, report=False)
  except _KubectlFailed:
    return STILL_RUNNING


def _status(args: argparse.Namespace, echo: bool, report: bool = True) -> int:
  kind = "jobset" if args.jobset else "job"
  outputs = []
  for argv in (["kubectl", "get", kind, args.name, "-n", args.namespace, "-o", "json"],
               k8s_logs.get_pods_argv(args)):
    if echo or args.dry_run:
      common.echo(argv, dry_run=args.dry_run)
    if args.dry_run:
      continue
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      if report:
        print(proc.stderr.strip(), file=sys.stderr)
      raise _KubectlFailed(proc.returncode)
    outputs.append(json.loads(proc.stdout))
  if args.dry_run:
    return 0
  code, message = outcome(outputs[0], outputs[1].get("items", []))
  if report:
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
  """The most recent failing trainer exit code, preferring the fail-fast codes."""
  codes = []
  for pod in pods:
    for status in pod.get("status", {}).get("containerStatuses", []):
      if status.get("name") != CONTAINER:
        continue
      state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get(
          "terminated")
      if state and state.get("exitCode"):
        codes.append((state["exitCode"] in common.FAIL_FAST_EXIT_CODES,
                      state.get("finishedAt", ""), state["exitCode"]))
  return max(codes)[2] if codes else 1


def _logs_verb(args: argparse.Namespace) -> int:
  try:
    _find_kind(_check(args))
  except _KubectlFailed as e:
    return e.returncode
  return k8s_logs.logs(args)


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
  kinds = target.add_mutually_exclusive_group()
  kinds.add_argument("--jobset", action="store_true",
                     help="a JobSet (default for apply and render with --nodes > 1)")
  kinds.add_argument("--indexed-job", action="store_true",
                     help="an Indexed Job (default for --nodes=1); other verbs find the kind")
  target.add_argument("--dry-run", action="store_true",
                      help="print each command and the manifests; run nothing")
  spec = argparse.ArgumentParser(add_help=False)
  _add_job_flags(spec)
  waiting = argparse.ArgumentParser(add_help=False)
  waiting.add_argument("--timeout", type=int, default=0, help="seconds, 0: no limit")
  waiting.add_argument("--poll-seconds", type=float, default=15.0)
  for verb, func, parents, text in (
      ("render", _render_verb, [target, spec], "print the manifests"),
      ("apply", _apply_verb, [target, spec, waiting],
       "render and pipe to `kubectl apply -f -`; with --wait, also the outcome"),
      ("logs", _logs_verb, [target], "the newest pod of each index, lines prefixed [pod N]"),
      ("status", _status_verb, [target], "print the state; exit code = outcome (75: running)"),
      ("wait", _wait_verb, [target, waiting], "block until the job ends; exit code = outcome"),
      ("delete", _delete_verb, [target], "delete the job, its pods and its Service")):
    verb_parser = verbs.add_parser(verb, parents=parents, help=text, description=text)
    verb_parser.set_defaults(func=func)
    if verb == "logs":
      verb_parser.add_argument("--nodes", type=int,
                               help="pods expected (completions x slices): missing ones are named")
      verb_parser.add_argument("--follow", action="store_true", help="stream until the pods end")
    elif verb == "apply":
      verb_parser.add_argument("--wait", action="store_true",
                               help="then wait for the outcome and exit with it (like `wait`)")
      verb_parser.add_argument("--logs", action="store_true",
                               help="with --wait: stream every pod's log while waiting")
      verb_parser.add_argument("--delete", action="store_true",
                               help="with --wait: delete the job when it ends (or on Ctrl-C)")


def _add_job_flags(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--image", required=True, help="trainer image, e.g. REGISTRY/PATH:TAG")
  parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH of the run")
  parser.add_argument("--nodes", type=int, default=1,
                      help="pods per slice = JAX processes per slice (default: 1)")
  parser.add_argument("--service-account", default="jaxjob",
                      help="Kubernetes service account that Workload Identity grants the bucket")
  parser.add_argument("--max-restarts", type=int, default=3,
                      help="gang restarts after exit 42 or a signal death (default: 3)")
  parser.add_argument("--fail-exit-codes", default=",".join(map(str, common.FAIL_FAST_EXIT_CODES)),
                      help="trainer exit codes that fail the job without a restart"
                           " (default: %(default)s)")
  parser.add_argument("--ttl-after-finished", type=int, default=86400,
                      help="seconds before a finished job and its pods are deleted"
                           " (default: %(default)s)")
  parser.add_argument("--cpu", help="CPU request per pod (default: per accelerator, SIZING)")
  parser.add_argument("--memory", help="memory request = limit per pod, e.g. 64Gi (default: per"
                                       " accelerator)")
  parser.add_argument("--shm-size", help="GPU: /dev/shm size (default: memory / 8, at most 64Gi)")
  parser.add_argument("--accelerator", choices=sorted(PROFILES),
                      help="default: gpu with --gpus-per-node, tpu with --tpu-*, else cpu")
  parser.add_argument("--gpus-per-node", type=int, help="nvidia.com/gpu per pod")
  parser.add_argument("--gpu-type", help="cloud.google.com/gke-accelerator, e.g. nvidia-l4")
  parser.add_argument("--tpu-accelerator",
                      help="cloud.google.com/gke-tpu-accelerator, e.g. tpu-v5-lite-podslice")
  parser.add_argument("--tpu-topology", help="cloud.google.com/gke-tpu-topology, e.g. 4x4")
  parser.add_argument("--tpus-per-node", type=int, help="google.com/tpu chips per pod")
  parser.add_argument("--num-slices", type=int, default=1,
                      help="TPU slices (JobSet replicas), joined over the data-centre network")
  parser.add_argument("--no-host-network", action="store_true",
                      help="TPU pods on the pod network: Workload Identity applies")
  parser.add_argument("--tpu-privileged", action="store_true",
                      help="privileged TPU container (GKE node pools before 1.28 only)")
  parser.add_argument("trainer_args", nargs=argparse.REMAINDER,
                      help="-- then trainer flags, e.g. -- --config=trainer/configs/default.py")
