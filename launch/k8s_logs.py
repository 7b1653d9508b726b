"""Pod logs of a `launch k8s` job: the newest attempt of each index, one stream per pod.

A failed pod of an Indexed Job stays after its index is recreated, so a label selector would
mix an index's earlier attempts into its stream (and `kubectl logs -l` follows at most 5 pods
unless told otherwise). Instead the pods are listed once, the newest pod of each index is chosen,
and one `kubectl logs POD` runs per chosen pod; each line is printed as `[pod N] line`, or
`[slice S pod N] line` for the slices after the first of a multi-slice JobSet.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from launch import common
from launch.k8s_render import CONTAINER, INDEX_KEY, JOB_INDEX_KEY

_STARTED = ("Running", "Succeeded", "Failed")  # Phases whose container has a log to read.


def owner_label(args: argparse.Namespace) -> str:
  key = "jobset.sigs.k8s.io/jobset-name" if args.jobset else "batch.kubernetes.io/job-name"
  return f"{key}={args.name}"


def get_pods_argv(args: argparse.Namespace) -> list[str]:
  return ["kubectl", "get", "pods", "-n", args.namespace, "-l", owner_label(args), "-o", "json"]


def logs_argv(args: argparse.Namespace, pod: str, follow: bool) -> list[str]:
  argv = ["kubectl", "logs", "-n", args.namespace, pod, "-c", CONTAINER, "--tail=-1",
          "--timestamps"]
  return argv + ["--follow"] if follow else argv


def newest_pods(pods: list[dict]) -> dict[tuple[int, int], dict]:
  """The newest pod of each (slice, completion index), from `kubectl get pods -o json` items."""
  chosen: dict[tuple[int, int], dict] = {}
  for pod in pods:
    meta = pod.get("metadata", {})
    tags = {**meta.get("annotations", {}), **meta.get("labels", {})}
    if INDEX_KEY not in tags:
      continue
    key = (int(tags.get(JOB_INDEX_KEY, 0)), int(tags[INDEX_KEY]))
    stamp = (meta.get("creationTimestamp", ""), meta.get("name", ""))
    old = chosen.get(key)
    if old is None or stamp > (old["metadata"].get("creationTimestamp", ""),
                               old["metadata"].get("name", "")):
      chosen[key] = pod
  return dict(sorted(chosen.items()))


def label(key: tuple[int, int]) -> str:
  return f"[pod {key[1]}]" if key[0] == 0 else f"[slice {key[0]} pod {key[1]}]"


def logs(args: argparse.Namespace, follow: bool | None = None) -> int:
  """The `logs` verb (and `apply --logs`): lists the pods, then streams the newest of each index."""
  follow = args.follow if follow is None else follow
  get = get_pods_argv(args)
  if args.dry_run:
    common.echo(get, dry_run=True)
    print("# then, for the newest pod of each index (earlier attempts left out):")
    common.echo(logs_argv(args, "POD", follow), dry_run=True)
    return 0
  common.echo(get, dry_run=False, file=sys.stderr)
  proc = subprocess.run(get, capture_output=True, text=True, check=False)
  if proc.returncode:
    print(proc.stderr.strip(), file=sys.stderr)
    return proc.returncode
  items = json.loads(proc.stdout).get("items", [])
  chosen = newest_pods(items)
  earlier = len([p for p in items if INDEX_KEY in {**p["metadata"].get("labels", {}),
                                                   **p["metadata"].get("annotations", {})}])
  if earlier > len(chosen):
    print(f"# {earlier - len(chosen)} earlier attempt(s) left out; read one with"
          f" kubectl logs -n {args.namespace} POD", file=sys.stderr)
  missing = (getattr(args, "nodes", None) or 0) - len(chosen)
  if missing > 0:
    print(f"# {missing} of {args.nodes} pods not created yet", file=sys.stderr)
  argvs = [logs_argv(args, pod["metadata"]["name"], follow) for pod in chosen.values()]
  for argv in argvs:
    common.echo(argv, dry_run=False, file=sys.stderr)
  labels = [label(k) for k in chosen]
  rc = common.stream_prefixed(argvs, labels, timestamps=True,
                              in_time_order=not follow) if argvs else 1
  return rc or (1 if missing > 0 else 0)


def follow_when_started(args: argparse.Namespace, status) -> int:
  """`apply --logs`: waits until every pod has started (or the job ended), then follows them.

  Args:
    args: the checked flags of `apply`; `--timeout` bounds the wait for the pods too.
    status: `status(args)` returns the job's outcome code, 75 while it runs.

  Returns:
    The exit code of the log streams (130 after Ctrl-C).
  """
  if args.dry_run:
    return logs(args, follow=True)
  deadline = time.monotonic() + args.timeout if args.timeout else None
  expected = args.nodes * args.num_slices
  while deadline is None or time.monotonic() < deadline:
    proc = subprocess.run(get_pods_argv(args), capture_output=True, text=True, check=False)
    pods = newest_pods(json.loads(proc.stdout).get("items", [])) if proc.returncode == 0 else {}
    started = [p for p in pods.values() if p.get("status", {}).get("phase") in _STARTED]
    if len(started) >= expected or status(args) != 75:
      break
    time.sleep(args.poll_seconds)
  return logs(args, follow=True)
