"""Exceptions that end a run with a documented exit code (DESIGN.md section 4)."""


class UserError(Exception):
  """Bad config, flags or data. One line on stderr, exit 2, nothing written."""

  exit_code = 2


class Preempted(Exception):
  """Stopped on purpose (SIGTERM / preemption) after committing a checkpoint."""

  exit_code = 42


class Diverged(Exception):
  """Loss or gradients became non-finite; the last good checkpoint is kept."""

  exit_code = 3


class StorageError(Exception):
  """Storage failed: disk full, permission lost, bucket gone, an outage past the retries.

  One line on stderr naming what failed, where, and the last committed step; every
  committed checkpoint is left in place. `line` is that line; `str()` adds the
  storage's own words in full, for run.json.
  """

  exit_code = 1

  def __init__(self, line: str, detail: str | None = None):
    super().__init__(f"{line} [{detail}]" if detail else line)
    self.line = line
