"""Helpers shared by every launcher: name validation, argv display and execution.

Commands are always argv lists handed to `subprocess` without a shell, so a user value
is exactly one argument. `--dry-run` prints each argv (shell-quoted for reading) and
runs nothing.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

# RFC 1123 label: what Kubernetes object names and GCE resource names accept.
_RFC1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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


def format_argv(argv: Sequence[str]) -> str:
  """Returns `argv` as one shell-quoted line, for display only."""
  return shlex.join(argv)


def run(argv: Sequence[str], *, dry_run: bool, check: bool = True) -> int:
  """Runs `argv` (no shell), or prints it when `dry_run`. Returns the exit code."""
  print(("$ " if dry_run else "+ ") + format_argv(argv), flush=True)
  if dry_run:
    return 0
  proc = subprocess.run(list(argv), check=False)
  if check and proc.returncode != 0:
    print(f"command failed with exit code {proc.returncode}: {argv[0]}", file=sys.stderr)
  return proc.returncode
