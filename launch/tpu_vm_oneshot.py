"""`python -m launch tpu-vm launch`: one command from code to a finished run on Cloud TPU VMs.

With `--build=DIR` it first builds the TPU trainer image with the user's project in DIR on top
and pushes it to `--image` (`python -m launch image build --accelerator=tpu --project=DIR
--push`), then runs the pushed digest.
Creates the TPU VM (directly, or as a queued resource waited for until ACTIVE) unless one of that
name exists, which is then reused; starts the trainer on every worker (`run`); follows every
worker's log (`logs`, lines prefixed `[worker N]`); exits with the trainer's exit code (the first
non-zero one of any worker, 0 when all succeeded); and deletes what it created, also after a
failure, at `--max-runtime` and on Ctrl-C, unless `--keep` is given. A reused TPU VM is never
deleted. `--max-runtime` is enforced here while the command runs; with `--flex-start` it is also
gcloud's `--max-run-duration`, which deletes the TPU even if this command is gone.
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import time

from launch import common
from launch import image
from launch import tpu_vm

TIMED_OUT = 124  # Like timeout(1): --max-runtime ended the run.
_EXITED = re.compile(r"^\[worker (\d+)\] jaxjob: trainer exited with code (\d+)$")
_QUEUED_STATES = {"ACTIVE": True, "FAILED": False, "SUSPENDED": False, "SUSPENDING": False}


class _Deadline(Exception):
  """--max-runtime was reached."""


class _Tee:
  """Prints the `[worker N]` lines and keeps the trainer's exit code of each worker."""

  def __init__(self, out):
    self.out, self.codes, self._partial = out, {}, ""

  def write(self, text: str) -> None:
    self.out.write(text)
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      found = _EXITED.match(line)
      if found:
        self.codes[int(found.group(1))] = int(found.group(2))

  def flush(self) -> None:
    self.out.flush()


def launch(args: argparse.Namespace) -> int:
  """The `launch` verb. Every flag is checked before anything runs."""
  if args.max_runtime is not None:
    tpu_vm.check_duration(args.max_runtime, "--max-runtime")
  server_side = args.max_runtime if args.flex_start else None
  notes, (create,) = tpu_vm.create_argvs(argparse.Namespace(**{**vars(args),
                                                               "max_runtime": server_side}))
  _, (run,) = tpu_vm.run_argvs(args)
  _, (delete,) = tpu_vm.delete_argvs(args)
  if args.build:
    if not args.image:
      raise common.UsageError("--build needs --image=REGISTRY/PATH:TAG, where the built image is"
                              " pushed")
    code, pinned = image.build_and_push(args.image, args.build, "tpu", dry_run=args.dry_run)
    if code:
      return code
    args = argparse.Namespace(**{**vars(args), "image": pinned})
    _, (run,) = tpu_vm.run_argvs(args)
  where = [f"--zone={args.zone}", f"--project={args.project}"]
  exists = [*tpu_vm.TPUS, "tpu-vm", "describe", args.name, *where, "--format=value(state)"]
  queued = [*tpu_vm.TPUS, "queued-resources", "describe", args.name, *where,
            "--format=value(state.state)"]
  for note in notes:
    print(f"# {note}", flush=True)
  if args.dry_run:
    return _dry_run(args, exists, create, queued, run, delete)
  created = False
  previous = signal.signal(signal.SIGALRM, _raise_deadline)
  if args.max_runtime:
    signal.alarm(tpu_vm.seconds(args.max_runtime))
  try:
    common.echo(exists, dry_run=False)
    found = subprocess.run(exists, capture_output=True, text=True, check=False)
    if found.returncode == 0:
      print(f"# {args.name} exists: reused, and kept at the end", flush=True)
    elif "NOT_FOUND" not in found.stderr + found.stdout:
      # Auth, network or quota: whether it exists is unknown, so nothing is created (or deleted).
      print(f"cannot tell whether {args.name} exists: {found.stderr.strip()}", file=sys.stderr)
      return found.returncode
    else:
      rc = common.run(create, dry_run=False)
      created = rc == 0  # A failed create may be a name taken meanwhile: never delete that.
      if rc or (args.queued and not _wait_active(queued, args.poll_seconds)):
        return rc or 1
    rc = tpu_vm.run_shown(run, dry_run=False)
    if rc:
      return rc
    return _follow(args)
  except _Deadline:
    print(f"--max-runtime={args.max_runtime} reached", file=sys.stderr)
    return TIMED_OUT
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    if created and not args.keep:
      common.run(delete, dry_run=False)
    elif created:
      print(f"# kept {args.name}: `python -m launch tpu-vm status --zone={args.zone}"
            f" --project={args.project}` lists what is left running", flush=True)


def _raise_deadline(signum, frame):
  del signum, frame
  raise _Deadline()


def _wait_active(queued: list[str], poll_seconds: float) -> bool:
  """Polls the queued resource until ACTIVE (True) or a state it cannot leave (False)."""
  common.echo(queued, dry_run=False)
  while True:
    proc = subprocess.run(queued, capture_output=True, text=True, check=False)
    state = proc.stdout.strip()
    if state in _QUEUED_STATES:
      print(f"# queued resource {state}", flush=True)
      return _QUEUED_STATES[state]
    time.sleep(poll_seconds)


def _follow(args: argparse.Namespace) -> int:
  """Follows every worker until its trainer ends; returns the trainer's exit code."""
  tee = _Tee(sys.stdout)
  follow = argparse.Namespace(**{**vars(args), "workers": None, "follow": True})
  rc = tpu_vm.logs(follow, out=tee)
  if rc == 130:
    raise KeyboardInterrupt
  if not tee.codes:
    print("no worker reported the trainer's exit code", file=sys.stderr)
    return rc or 1
  # A worker whose ssh failed reports no code; its ssh exit code (rc) is the outcome then.
  return next((code for _, code in sorted(tee.codes.items()) if code), 0) or rc


def _dry_run(args, exists, create, queued, run, delete) -> int:
  print("# create the TPU VM unless the describe below finds one (then reused and kept):")
  common.run(exists, dry_run=True)
  common.run(create, dry_run=True)
  if args.queued:
    print(f"# every {args.poll_seconds:g} s until ACTIVE (FAILED or SUSPENDED: stop):")
    common.run(queued, dry_run=True)
  tpu_vm.run_shown(run, dry_run=True)
  tpu_vm.logs(argparse.Namespace(**{**vars(args), "workers": None, "follow": True}))
  print("# exit code: the first non-zero trainer exit code of any worker, else 0")
  if args.keep:
    print("# --keep: nothing is deleted")
    return 0
  when = f"at --max-runtime={args.max_runtime} (exit {TIMED_OUT}), " if args.max_runtime else ""
  print(f"# then, {when}after a failure and on Ctrl-C too, delete what was created:")
  common.run(delete, dry_run=True)
  return 0


def add_parser(verbs, add_common) -> None:
  """Adds the `launch` verb to `python -m launch tpu-vm`."""
  parser = verbs.add_parser("launch", allow_abbrev=False,
                            help="create, run, follow, exit with the outcome, delete",
                            description=__doc__.split("\n\n")[1])
  add_common(parser)
  tpu_vm.add_create_flags(parser)
  parser.add_argument("--max-runtime",
                      help="end the run and delete the TPU after this (e.g. 6h; server-side too"
                           " with --flex-start)")
  parser.add_argument("--keep", action="store_true", help="do not delete the TPU VM at the end")
  parser.add_argument("--build", metavar="DIR",
                      help="first build the TPU image with the project in DIR on top, push it to"
                           " --image and run the pushed digest (see `launch image build`)")
  parser.add_argument("--poll-seconds", type=float, default=30.0,
                      help="queued: seconds between state checks (default: %(default)s)")
  tpu_vm.add_run_flags(parser)
  parser.set_defaults(func=launch)
