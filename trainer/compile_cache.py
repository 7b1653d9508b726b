"""JAX's persistent compilation cache, on by default: a second run skips XLA compilation.

Where it lives, first match wins:

* `JAXJOB_COMPILATION_CACHE_DIR`: a local path or gs:// URL; `off` (or `0`, `none`)
  turns the cache off;
* `JAX_COMPILATION_CACHE_DIR`, JAX's own variable, when a user already sets it;
* `$XDG_CACHE_HOME/jaxjob/jax` (default `~/.cache/jaxjob/jax`).

The image sets `JAXJOB_COMPILATION_CACHE_DIR=/var/cache/jaxjob/jax` (a writable
directory); the Kubernetes manifests and the TPU VM launcher mount a volume there so a
restarted container finds its compilations. A cache that cannot be created is skipped
with a warning: it only ever costs time, never a result (JAX keys each entry by the
computation, the compile options, the backend and the jax/jaxlib versions).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "JAXJOB_COMPILATION_CACHE_DIR"
_OFF = ("off", "0", "none", "false", "no")
# Compilations shorter than this are not written (reading one back costs about as much).
MIN_COMPILE_TIME_S = 0.1


def directory() -> str | None:
  """The cache directory the environment asks for, or None when it is off."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in _OFF + ("",) else value.strip()
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxjob", "jax")


def enable() -> str | None:
  """Points JAX at the cache directory (before the first compilation); returns it."""
  import jax  # pylint: disable=g-import-not-at-top
  path = directory()
  if path is None:
    return None
  if "://" not in path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      log.warning("compilation cache %s not usable (%s): compiling without it", path, e)
      return None
    if not os.access(path, os.W_OK):
      log.warning("compilation cache %s is not writable: compiling without it", path)
      return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return path
