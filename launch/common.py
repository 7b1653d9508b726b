"""Shared by every launcher: the validation rules, the exit-code policy, argv display and execution.

Each rule a launcher applies to a user value is defined here once (image references, `gs://`
URLs, names, trainer arguments), so a value one launcher takes is never refused by another.
Commands are always argv lists handed to `subprocess` without a shell, so a user value is exactly
one argument. `--dry-run` prints each argv (shell-quoted for reading) and runs nothing.
"""

from __future__ import annotations

import queue
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence

# The trainer's exit codes (shared/DESIGN.md section 4; trainer/errors.py): restarting cannot help
# after 1 (an unhandled error), 2 (bad config, flags or data) or 3 (diverged); 42 (stopped after
# committing a checkpoint) and signal deaths (128+N) are worth a restart. tests/test_k8s.py checks
# this list against trainer/errors.py and against the literal lists in k8s/*.yaml.
FAIL_FAST_EXIT_CODES = (1, 2, 3)
PREEMPTED_EXIT_CODE = 42

# RFC 1123 label: what Kubernetes object names and GCE resource names accept.
_RFC1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# Docker reference grammar: [registry[:port]/]path[:tag][@sha256:digest], lower-case path.
_HOST_PART = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?:{_HOST_PART}(?:\.{_HOST_PART})*(?::[0-9]{{1,5}})?/)?"
                    rf"{_PATH_PART}(?:/{_PATH_PART})*"
                    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?")
# A bucket name, then an object prefix of the characters a run directory needs: no spaces, quotes,
# shell or YAML syntax, so the URL reads the same in a manifest, a remote script and a log line.
_GCS_URL = re.compile(r"gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](?:/[A-Za-z0-9._~=+@,/-]*)?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# kubectl logs --timestamps: RFC 3339 with trailing zeros of the fraction trimmed.
_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z (.*)$", re.DOTALL)


class UsageError(Exception):
  """A bad flag or value; the launcher prints one line and exits 2."""


def validate_name(value: str, what: str, max_len: int = 63) -> str:
  """Checks that `value` is an RFC 1123 label of at most `max_len` characters.

  Raises:
    UsageError: naming the flag and what was expected.
  """
  if len(value) > max_len or not _RFC1123_LABEL.fullmatch(value) or value[0].isdigit():
    raise UsageError(
        f"{what}={value!r} is not a valid name: expected lower-case letters, digits and"
        f" '-', starting with a letter, ending with a letter or digit, at most {max_len}"
        " characters")
  return value


def validate_image(value: str, what: str = "--image") -> str:
  """Checks a container image reference. Raises UsageError."""
  if len(value) > 255 or not _IMAGE.fullmatch(value):
    raise UsageError(f"{what}={value!r} is not an image reference like"
                     " REGISTRY/PATH:TAG or REGISTRY/PATH@sha256:DIGEST")
  return value


def validate_gcs_url(value: str, what: str = "--workdir") -> str:
  """Checks a `gs://BUCKET/PATH` run directory. Raises UsageError."""
  if not _GCS_URL.fullmatch(value):
    raise UsageError(f"{what}={value!r}: expected gs://BUCKET/PATH (letters, digits and"
                     " ._~=+@,/- only); a machine's own disk does not outlive the job")
  return value


def trainer_args(remainder: Sequence[str], *, workdir_in_flags: bool = False) -> list[str]:
  """Returns the trainer flags from argparse's REMAINDER (`-- FLAG ...`). Raises UsageError.

  Every flag must come after `--`; control characters (a newline could end a remote script's
  here-document or a log line) are refused, and so is `--workdir` there unless
  `workdir_in_flags` (`launch local`, which has no --workdir of its own).
  """
  remainder = list(remainder)
  if remainder and remainder[0] != "--":
    raise UsageError(f"unexpected argument {remainder[0]!r}: trainer flags go after --")
  for arg in remainder[1:]:
    if _CONTROL.search(arg):
      raise UsageError(f"trainer flag {arg!r}: control characters (newlines, tabs) are refused")
    if not workdir_in_flags and arg.split("=")[0] in ("--workdir", "-workdir"):
      raise UsageError(f"{arg!r}: pass the run directory once, as the launcher's --workdir")
  return remainder[1:]


def format_argv(argv: Sequence[str]) -> str:
  """Returns `argv` as one shell-quoted line, for display only."""
  return shlex.join(argv)


def echo(argv: Sequence[str], *, dry_run: bool, file=None) -> None:
  """Prints `argv` as `$ ...` (dry run: what would run) or `+ ...` (what runs now)."""
  print(("$ " if dry_run else "+ ") + format_argv(argv), file=file or sys.stdout, flush=True)


def run(argv: Sequence[str], *, dry_run: bool, check: bool = True) -> int:
  """Runs `argv` (no shell), or prints it when `dry_run`. Returns the exit code."""
  echo(argv, dry_run=dry_run)
  if dry_run:
    return 0
  proc = subprocess.run(list(argv), check=False)
  if check and proc.returncode != 0:
    print(f"command failed with exit code {proc.returncode}: {argv[0]}", file=sys.stderr)
  return proc.returncode


def stream_prefixed(argvs: Sequence[Sequence[str]], labels: Sequence[str], *,
                    timestamps: bool = False, in_time_order: bool = False, out=None) -> int:
  """Runs the argvs at once and prints each output line as `LABEL line`: every launcher's logs.

  Args:
    argvs: one command per stream (a pod's or a worker's log).
    labels: the prefix of each stream's lines, e.g. `[pod 3]` or `[worker 0]`.
    timestamps: lines start with an RFC 3339 time (kubectl --timestamps), which is dropped.
    in_time_order: print nothing until every stream ended, then all lines merged by that time
      (needs `timestamps`); otherwise lines print as they arrive.
    out: where to print (default: stdout).

  Returns:
    0 when every command exited 0, else the first non-zero exit code (130 on Ctrl-C).
  """
  out = out or sys.stdout
  lines: queue.Queue = queue.Queue()
  procs = [subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace") for argv in argvs]
  for index, proc in enumerate(procs):
    threading.Thread(target=_pump, args=(index, proc.stdout, lines, timestamps),
                     daemon=True).start()
  collected, open_streams = [], len(procs)
  try:
    while open_streams:
      item = lines.get()
      if item is None:
        open_streams -= 1
      elif in_time_order:
        collected.append(item)
      else:
        out.write(f"{labels[item[1]]} {item[3]}\n")
        out.flush()
    for _, index, _, text in sorted(collected):
      out.write(f"{labels[index]} {text}\n")
    codes = [proc.wait() for proc in procs]
  except BaseException as e:  # Ctrl-C, or a deadline's exception: no stream outlives us.
    for proc in procs:
      proc.terminate()
    if isinstance(e, KeyboardInterrupt):
      return 130
    raise
  return next((code for code in codes if code), 0)


def _pump(index: int, stream, lines: queue.Queue, timestamps: bool) -> None:
  """Queues (time key, stream index, line number, text) for each line of one stream."""
  key = ("", "")
  for number, raw in enumerate(stream):
    text = raw.rstrip("\n")
    found = _TIMESTAMP.match(text) if timestamps else None
    if found:  # Pad the fraction so that keys compare as times.
      key = (found.group(1), (found.group(2) or "").ljust(9, "0"))
      text = found.group(3)
    lines.put((key, index, number, text))
  lines.put(None)
