"""JAX's persistent compilation cache, on by default: a second run skips XLA compilation.

Where it lives, first match wins:

* `JAXJOB_COMPILATION_CACHE_DIR`: a local path or gs:// URL; `off` (or `0`, `none`,
  `false`, `no`, empty) turns the cache off, also one that `JAX_COMPILATION_CACHE_DIR`
  would have turned on;
* `JAX_COMPILATION_CACHE_DIR`, JAX's own variable, when a user already sets it;
* `$XDG_CACHE_HOME/jaxjob/jax` (default `~/.cache/jaxjob/jax`).

The image sets `JAXJOB_COMPILATION_CACHE_DIR=/var/cache/jaxjob/jax` (a writable
directory); the Kubernetes manifests and the TPU VM launcher mount a volume at
/var/cache/jaxjob. A local directory that cannot be created or written is skipped with a
warning: the cache only ever costs time, never a result (JAX keys each entry by the
computation, the compile options, the backend and the jax/jaxlib versions, and turns its
own read and write errors into warnings). Only process 0 writes entries (JAX's rule), so
in a multi-host job a per-host directory fills on process 0's host alone; a gs:// path
serves every host.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "JAXJOB_COMPILATION_CACHE_DIR"
_OFF = ("off", "0", "none", "false", "no", "")
# Compilations shorter than this are not written. JAX's default (1 s) skips every
# compilation of a small job; at 0 a warm tutorial run loads all 6 of its executables
# (0.1 s) instead of compiling 4 of them again (0.4 s; measured on 2 CPU cores).
MIN_COMPILE_TIME_S = 0.0


def directory() -> str | None:
  """The cache directory the environment asks for, or None when it is off."""
  value = os.environ.get(ENV)
  if value is not None:
    return None if value.strip().lower() in _OFF else value.strip()
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxjob", "jax")


def enable() -> str | None:
  """Points JAX at `directory()`, or turns its cache off; returns the directory or None.

  Call it before the compilations it should cover. JAX opens its cache once per process,
  at the first compilation after a directory is set; a call that changes the directory
  makes the next compilation open the new one.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  path = _usable(directory())
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()
  if path is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
  return path


def _usable(path: str | None) -> str | None:
  """`path` if the cache can live there (a local directory is created), else None."""
  if path is None or "://" in path:
    return path  # A URL is JAX's to open: its errors become warnings there.
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    log.warning("compilation cache %s not usable (%s): compiling without it", path, e)
    return None
  if not os.access(path, os.W_OK):
    log.warning("compilation cache %s is not writable: compiling without it", path)
    return None
  return path
