"""`python -m trainer`: flags -> `train_and_evaluate(config, workdir)`, and exit codes.

Exit codes (DESIGN.md section 4): 0 done; 2 bad config, flags or data (one line on
stderr, nothing written); 42 preempted after a committed checkpoint; 3 diverged; 1 other.
"""

import os
import re
import sys

from trainer import preemption

preemption.install_early_handler()  # Before the slow imports: a SIGTERM now is not lost.

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trainer import errors
# pylint: enable=g-import-not-at-top,wrong-import-position

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

# A bad flag, or a config file that is missing or does not load. config_flags reads the
# file (and applies --config.* overrides) when the flag is defined, when flags are
# parsed, or on first access to the value, so all three places catch these.
_FLAG_ERRORS = (flags.Error, OSError, SyntaxError, ImportError, AttributeError, KeyError,
                TypeError, ValueError)


def _bad_flags(e: Exception):
  if isinstance(e, (KeyError, AttributeError)):
    e = _explain_missing_key(sys.argv, e)
  print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
  sys.exit(2)


def _define_flags():
  try:
    config = config_flags.DEFINE_config_file(
        "config", _DEFAULT_CONFIG, "Config file; override fields with --config.a.b=value.",
        lock_config=True)
  except _FLAG_ERRORS as e:
    _bad_flags(e)
  workdir = flags.DEFINE_string(
      "workdir", None, "Run directory, local or gs://. Default: runs/<config>-<UTC time>."
      " A workdir holding a committed checkpoint resumes.")
  allow = flags.DEFINE_bool(
      "allow_config_change", False, "Resume a workdir whose recorded config differs in"
      " fields that change the result (e.g. more steps).")
  return config, workdir, allow


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _FLAG_ERRORS as e:
    _bad_flags(e)


def _explain_missing_key(argv, error: Exception):
  """An override of a key the config lacks: for config.model, say what the model takes."""
  found = re.match(r"""["']*(\w+)""", str(error))
  key = found.group(1) if found else ""
  prefix = f"--config.model.{key}="
  if not any(a.startswith(prefix) for a in argv):
    return error
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), _DEFAULT_CONFIG)
  name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config.model.name=")), None)
  from trainer import models  # pylint: disable=g-import-not-at-top
  try:
    return models.explain_override(path, key, name)
  except Exception:  # pylint: disable=broad-except
    return f"--config.model.{key}: the config's model section has no such key"


def main(argv, config_flag, workdir_flag, allow_flag):
  if len(argv) > 1:
    print(f"error: unexpected positional arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    config = config_flag.value
    config.name  # pylint: disable=pointless-statement  (loads a lazily parsed config)
  except _FLAG_ERRORS as e:
    _bad_flags(e)
  from trainer import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, workdir_flag.value, allow_flag.value)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except (errors.Preempted, errors.Diverged) as e:
    print(str(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, *_flags), flags_parser=_parse_flags)
