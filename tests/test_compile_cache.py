"""Tests of JAX's persistent compilation cache as the trainer turns it on (compile_cache.py).

In this process: where `directory()` looks, first match wins; `enable()` points JAX at it,
turns off a cache JAX's own variable turned on, hands over to a new directory, and skips one
it cannot create with a warning, compiling on without it. In subprocesses (`python -m
trainer`, slow): a first run writes entries, a second run reads every one of them back and
ends with the same parameters; the default directory is `$XDG_CACHE_HOME/jaxjob/jax`, and
`off` writes nothing there; the same on gs:// (the GCS emulator), where a missing bucket costs
a warning, not the run.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache as jax_cache
import pytest

from tests import gcs_emulator
from tests.conftest import run_trainer
from trainer import compile_cache

ENV = compile_cache.ENV
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
# The default config, short: 20 steps, an eval and a checkpoint every 10.
TRAIN_ARGS = ["--config.train.steps=20", "--config.optimizer.warmup_steps=0",
              "--config.train.eval_every=10", "--config.train.checkpoint_every=10",
              "--config.train.log_every=10"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
  """No cache variable set, HOME in tmp_path; returns monkeypatch to set them."""
  for name in (ENV, JAX_ENV, "XDG_CACHE_HOME"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  return monkeypatch


@pytest.fixture
def jax_cache_config():
  """Restores JAX's cache settings (the session's, tests/conftest.py) after the test."""
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  yield
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])
  jax_cache.reset_cache()


def entries(directory, prefix: str = "") -> list[str]:
  """The cache entries in `directory` whose names start with `prefix`."""
  if not directory.is_dir():
    return []
  return sorted(p.name for p in directory.glob(f"{prefix}*-cache"))


def compile_new(constant: float) -> None:
  """Compiles (and runs) `jit__lambda`, a computation no earlier test compiled."""
  assert float(jax.jit(lambda x: x * constant + 1.0)(np.float32(2.0))) == 2.0 * constant + 1.0


# ---------------------------------------------------------------------------------------------
# directory() and enable(), in this process.


@pytest.mark.parametrize("variables, expected", [
    ({}, "{home}/.cache/jaxjob/jax"),
    ({JAX_ENV: ""}, "{home}/.cache/jaxjob/jax"),
    ({"XDG_CACHE_HOME": "/xdg"}, "/xdg/jaxjob/jax"),
    ({"XDG_CACHE_HOME": "/xdg", JAX_ENV: "/jax"}, "/jax"),
    ({"XDG_CACHE_HOME": "/xdg", JAX_ENV: "/jax", ENV: " /mine "}, "/mine"),
    ({ENV: "gs://bucket/cache"}, "gs://bucket/cache"),
    ({JAX_ENV: "/jax", ENV: "off"}, None),
])
def test_directory_first_match_wins(variables, expected, clean_env, tmp_path):
  for name, value in variables.items():
    clean_env.setenv(name, value)
  want = expected and expected.format(home=tmp_path / "home")
  assert compile_cache.directory() == want


@pytest.mark.parametrize("value", ["off", "OFF", " off ", "0", "none", "false", "no", ""])
def test_directory_off(value, clean_env):
  clean_env.setenv(ENV, value)
  assert compile_cache.directory() is None


def test_enable_creates_the_directory_and_points_jax_at_it(clean_env, tmp_path,
                                                           jax_cache_config):
  path = tmp_path / "not" / "there" / "yet"
  clean_env.setenv(ENV, str(path))
  clean_env.setattr(compile_cache, "MIN_COMPILE_TIME_S", 0.0)  # Every compilation is written.
  assert compile_cache.enable() == str(path)
  assert path.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(path)
  compile_new(3.0)
  assert len(entries(path, "jit__lambda")) == 1


def test_a_new_directory_takes_over(clean_env, tmp_path, jax_cache_config):
  # JAX opens its cache once per process; enable() makes it open the new one.
  clean_env.setattr(compile_cache, "MIN_COMPILE_TIME_S", 0.0)
  first, second = tmp_path / "first", tmp_path / "second"
  clean_env.setenv(ENV, str(first))
  compile_cache.enable()
  compile_new(5.0)
  clean_env.setenv(ENV, str(second))
  compile_cache.enable()
  compile_new(7.0)
  assert (len(entries(first, "jit__lambda")), len(entries(second, "jit__lambda"))) == (1, 1)


def test_off_turns_off_a_cache_jax_was_given(clean_env, tmp_path, jax_cache_config):
  # JAX reads JAX_COMPILATION_CACHE_DIR into its config when imported; `off` still wins.
  theirs = tmp_path / "theirs"
  jax.config.update("jax_compilation_cache_dir", str(theirs))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  clean_env.setenv(ENV, "off")
  assert compile_cache.enable() is None
  assert jax.config.jax_compilation_cache_dir is None
  compile_new(11.0)
  assert entries(theirs) == []


@pytest.mark.parametrize("where", ["a file", "below a file"])
def test_unusable_directory_warns_and_compiles_without_it(where, clean_env, tmp_path, caplog,
                                                          jax_cache_config):
  blocker = tmp_path / "blocker"
  blocker.write_text("a file where the cache directory should be\n")
  path = blocker if where == "a file" else blocker / "jax"
  clean_env.setenv(ENV, str(path))
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "earlier"))
  with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
    assert compile_cache.enable() is None
  (record,) = [r for r in caplog.records if r.name == compile_cache.__name__]
  assert record.levelno == logging.WARNING
  assert f"compilation cache {path} not usable" in record.getMessage()
  assert "compiling without it" in record.getMessage()
  assert jax.config.jax_compilation_cache_dir is None
  compile_new(13.0)
  assert blocker.read_text().startswith("a file")
  assert not (tmp_path / "earlier").exists()


# ---------------------------------------------------------------------------------------------
# End to end: `python -m trainer` twice.


def train(workdir, **env):
  """One short run of the default config; returns (params_sha256, combined output)."""
  proc = run_trainer([*TRAIN_ARGS, f"--workdir={workdir}"],
                     env={"JAX_LOG_COMPILES": "1", **env})  # Logs each cache hit by its key.
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  return json.loads((workdir / "summary.json").read_text())["params_sha256"], output


def hits(output: str) -> set[str]:
  """The cache keys a run's JAX_LOG_COMPILES output reports as persistent cache hits."""
  marker = "Persistent compilation cache hit for "
  return {line.split(" with key ")[1].strip().strip("'")
          for line in output.splitlines() if marker in line}


@pytest.mark.slow
def test_second_run_reads_every_entry_and_trains_the_same(tmp_path):
  cache = tmp_path / "cache"
  first, output = train(tmp_path / "first", **{ENV: str(cache)})
  written = entries(cache)
  assert written, "the first run wrote no cache entry"
  assert not hits(output)
  second, output = train(tmp_path / "second", **{ENV: str(cache)})
  assert hits(output) == {name.removesuffix("-cache") for name in written}
  assert entries(cache) == written
  assert second == first


@pytest.mark.slow
def test_default_directory_and_off(tmp_path, monkeypatch):
  monkeypatch.delenv(ENV)  # The session's cache (tests/conftest.py): the default here.
  monkeypatch.delenv(JAX_ENV, raising=False)
  monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "matplotlib"))  # Not under XDG_CACHE_HOME.
  used = tmp_path / "xdg-used"
  train(tmp_path / "default", XDG_CACHE_HOME=str(used))
  assert entries(used / "jaxjob" / "jax")
  unused, theirs = tmp_path / "xdg-unused", tmp_path / "theirs"
  unused.mkdir()
  train(tmp_path / "off", XDG_CACHE_HOME=str(unused), **{ENV: "off", JAX_ENV: str(theirs)})
  assert list(unused.iterdir()) == []
  assert entries(theirs) == []


@pytest.fixture(scope="module")
def gcs():
  fake = gcs_emulator.FakeGCS().start()
  fake.create_bucket("jaxjob-cache")
  yield fake
  fake.close()


@pytest.mark.slow
def test_cache_on_gcs(gcs, tmp_path, monkeypatch):
  emulator = gcs_emulator.subprocess_env(gcs.url, str(tmp_path))
  for name in set(os.environ) - set(emulator):
    monkeypatch.delenv(name)
  for name, value in emulator.items():
    monkeypatch.setenv(name, value)
  cache = "gs://jaxjob-cache/jax"
  first, _ = train(tmp_path / "first", **{ENV: cache})
  written = [name for name in gcs.list("jaxjob-cache") if name.endswith("-cache")]
  assert written and all(name.startswith("jax/") for name in written)
  second, output = train(tmp_path / "second", **{ENV: cache})
  assert hits(output) == {name[len("jax/"):].removesuffix("-cache") for name in written}
  assert second == first
  # A bucket that is not there: JAX warns, the run trains without the cache.
  missing, output = train(tmp_path / "missing", **{ENV: "gs://no-such-bucket/jax"})
  assert missing == first
  assert "Error reading persistent compilation cache entry" in output
