"""`python -m trainer`: flags -> `train_and_evaluate(config, workdir)`, and exit codes.

Exit codes (DESIGN.md section 4): 0 done; 2 bad config, flags or data (one line on
stderr, nothing written); 42 preempted after a committed checkpoint; 3 diverged; 1 other.
"""

import gc

# Python's cyclic garbage collector paused a run for 0.3 s in all: three full collections
# of the large heap that importing JAX, Flax and Optax builds. It stays off until the
# imports are done, and then skips what they made (`_settle_heap`).
if __name__ == "__main__":
  gc.disable()

# pylint: disable=g-import-not-at-top,wrong-import-position
import logging as std_logging
import os
import re
import sys
import threading
import traceback

from trainer import preemption

preemption.install_early_handler()  # Before the slow imports: a SIGTERM now is not lost.

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from trainer import errors
# pylint: enable=g-import-not-at-top,wrong-import-position

# How long a run that ends on a storage failure waits for background threads at exit.
_EXIT_GRACE_S = 10.0
_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

# A bad flag, or a config file that is missing, does not load or raises in get_config():
# the user's input, whatever the exception. config_flags reads the file (and applies
# --config.* overrides) when the flag is defined, when flags are parsed, or on first
# access to the value, so all three places catch these.
_FLAG_ERRORS = (Exception,)
_FLAG_KINDS = (flags.Error, OSError, SyntaxError, ImportError, AttributeError, KeyError,
               TypeError, ValueError)  # errors whose own words say what was wrong


def _bad_flags(e: Exception):
  if isinstance(e, (KeyError, AttributeError)):
    e = _explain_missing_key(sys.argv, e)
  elif not isinstance(e, _FLAG_KINDS):  # raised by the config file's own code
    path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")),
                _DEFAULT_CONFIG)
    e = f"the config file {path} failed to load: {type(e).__name__}: {e}"
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
  found = re.search(r"\w+", str(error))  # the key, quoted, perhaps with a suggestion
  key = found.group(0) if found else ""
  prefix = f"--config.model.{key}="
  if not any(a.startswith(prefix) for a in argv):
    override = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and key in a.split("=", 1)[0][len("--config."):].split(".")), None)
    if override is None:
      return error
    hint = re.search(r'Did you mean "(\w+)"', str(error))
    expected = f"{hint.group(1)!r}?" if hint else (
        "a field the config file defines (trainer/configs/base.py lists the common ones)")
    return f"{override}: the config has no field {key!r}; expected {expected}"
  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), _DEFAULT_CONFIG)
  name = next((a.split("=", 1)[1] for a in argv if a.startswith("--config.model.name=")), None)
  from trainer import models  # pylint: disable=g-import-not-at-top
  try:
    return models.explain_override(path, key, name)
  except Exception:  # pylint: disable=broad-except
    return f"--config.model.{key}: the config's model section has no such key"


class _OrbaxErrors(std_logging.Filter):
  """Holds back Orbax's ERROR records (with tracebacks) until the run's outcome is known.

  A failed async save is logged with its traceback by each of Orbax's background threads
  (four times for one full disk) and then re-raised in the main thread. When that
  failure ends the run as one storage-error line, the copies are dropped (run.json keeps
  the reason; `--verbosity=1` shows everything); otherwise they are printed at the end.
  """

  def __init__(self):
    super().__init__()
    self.held: list[std_logging.LogRecord] = []

  def filter(self, record):
    # asyncio's "exception was never retrieved" for a failed write of the same save comes
    # from its event loop whenever that future is garbage-collected: the same failure again.
    if record.levelno >= std_logging.ERROR and ("/orbax/" in record.pathname
                                                or record.name == "asyncio"):
      self.held.append(record)
      return False
    return True

  def release(self) -> None:
    for record in self.held:
      std_logging.getLogger().handle(record)  # The root's handlers, past this filter.
    self.held.clear()


def _abandoned_write(kind, value, tb) -> bool:
  """Whether an exception is the "Event loop is closed" of a write a failed save left.

  When one write of an async save fails, Orbax stops waiting for the others and closes
  the event loop of that save; tensorstore then completes each abandoned write by
  calling `loop.call_soon_threadsafe` on the closed loop, and the RuntimeError reaches
  `sys.excepthook` or `sys.unraisablehook` (dozens on a full disk). The save's failure
  itself reaches the main thread and is reported once.
  """
  frames = traceback.extract_tb(tb)
  return (kind is RuntimeError and str(value) == "Event loop is closed" and bool(frames)
          and frames[0].name == "call_soon_threadsafe")


def _drop_abandoned_writes() -> None:
  """Routes every other exception to the hooks installed before."""
  excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

  def on_exception(kind, value, tb):
    if not _abandoned_write(kind, value, tb):
      excepthook(kind, value, tb)

  def on_unraisable(unraisable):
    if not _abandoned_write(unraisable.exc_type, unraisable.exc_value,
                            unraisable.exc_traceback):
      unraisablehook(unraisable)

  sys.excepthook, sys.unraisablehook = on_exception, on_unraisable


def _storage_failure(e: Exception, workdir: str | None) -> str:
  """One line for a storage failure outside checkpoint saves, with the last step."""
  from trainer import checkpoint  # pylint: disable=g-import-not-at-top
  from trainer import storage  # pylint: disable=g-import-not-at-top
  last = checkpoint.last_committed_step()
  if workdir:
    try:
      steps = [int(p.name) for p in (storage.path(workdir) / "checkpoints").iterdir()
               if p.name.isdigit() and (p / "commit_success.txt").exists()]
      last = max(steps, default=last)
    except Exception:  # pylint: disable=broad-except
      pass  # Gone or forbidden: what this process saw committed.
  return f"storage failed: {storage.reason(e)}; last committed step: {last}"


def main(argv, config_flag, workdir_flag, allow_flag):
  if len(argv) > 1:
    print(f"error: unexpected positional arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  verbose = flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 1
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  orbax_errors = _OrbaxErrors()
  if not verbose:
    std_logging.getLogger("absl").addFilter(orbax_errors)
    std_logging.getLogger("asyncio").addFilter(orbax_errors)
    _drop_abandoned_writes()
  try:
    config = config_flag.value
    config.name  # pylint: disable=pointless-statement  (loads a lazily parsed config)
  except _FLAG_ERRORS as e:
    _bad_flags(e)
  from trainer import storage  # pylint: disable=g-import-not-at-top
  from trainer import train  # pylint: disable=g-import-not-at-top
  _settle_heap()
  try:
    train.train_and_evaluate(config, workdir_flag.value, allow_flag.value)
  except errors.UserError as e:
    _exit(f"error: {e}", e.exit_code, orbax_errors, verbose=verbose)
  except (errors.Preempted, errors.Diverged) as e:
    _exit(str(e), e.exit_code, orbax_errors)
  except errors.StorageError as e:
    _exit(f"error: {e.line}", e.exit_code, orbax_errors, storage_failure=True,
          verbose=verbose)
  except Exception as e:  # pylint: disable=broad-except
    if not storage.is_storage_error(e):
      orbax_errors.release()
      raise
    _exit(f"error: {_storage_failure(e, workdir_flag.value)}", 1, orbax_errors,
          storage_failure=True, verbose=verbose)
  orbax_errors.release()
  _leave(0)


def _settle_heap() -> None:
  """Turns the garbage collector back on, with what the imports made out of its walks.

  `gc.freeze` moves every object alive now (modules, classes, JAX's tables) to a
  generation that collections skip; with it, the run's collections took 0.04-0.09 s
  instead of 0.3 s (2 CPU cores). Cyclic garbage left by the imports is never freed.
  """
  gc.freeze()
  gc.enable()


def _leave(code: int) -> None:
  """Ends a completed run without Python's interpreter teardown.

  Everything the run writes is written, committed and closed by now (`train.run`); what
  is left is garbage collection of JAX's and Orbax's objects and their atexit handlers,
  which took seconds on a loaded 2-core machine. Several processes first leave JAX's
  distributed service together (its shutdown barrier), as a normal exit would.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    jax.distributed.shutdown()
  std_logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _exit(line: str, code: int, orbax_errors: _OrbaxErrors, *, storage_failure=False,
          verbose=False):
  """Prints `line` (after Orbax's held-back errors, unless `line` reports them) and exits."""
  if storage_failure:
    orbax_errors.held.clear()  # Copies of the failure that `line` reports.
  orbax_errors.release()
  if verbose:
    traceback.print_exc()
  print(line, file=sys.stderr, flush=True)
  if storage_failure:
    # A save that failed early can leave Orbax's signalling threads (not daemons) waiting
    # for writes that never come, and Python's exit waits for them forever. The failure
    # is reported and recorded: give a normal exit a bound, then leave without them.
    timer = threading.Timer(_EXIT_GRACE_S, os._exit, (code,))  # pylint: disable=protected-access
    timer.daemon = True
    timer.start()
  sys.exit(code)


if __name__ == "__main__":
  _flags = _define_flags()
  app.run(lambda argv: main(argv, *_flags), flags_parser=_parse_flags)
