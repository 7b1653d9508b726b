"""Test set-up: 8 virtual CPU devices before JAX starts, a session compilation cache, and
shared helpers."""

import atexit
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

# Must run before anything imports jax: every test sees the same 8-device CPU mesh.
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split()
     if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"])
os.environ["JAX_PLATFORMS"] = "cpu"
# JAX's compilation cache (trainer/compile_cache.py) for this session and its subprocesses: a
# temporary directory, so tests never write into the user's ~/.cache. A cache the caller sets
# (a CI's, kept between runs) is used as it is.
if "JAXJOB_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="jaxjob-test-compilation-cache-")
  os.environ["JAXJOB_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
  atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "examples" / "digits_nnx"  # the example user project (its own package)
DATA_DIR = pathlib.Path(os.environ.get(
    "JAXJOB_DATA_DIR", ROOT.parent / "shared" / "data")) / "mobile-price"


def tiny_config(name: str = "default.py", **overrides):
  """A config file's get_config() with dotted overrides, e.g. train__steps=20.

  `name` is a file of trainer/configs, or an absolute path (e.g. the example project's).
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("cfg", ROOT / "trainer" / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.log_every = 10
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config.lock()
  return config


def run_trainer(args, *, env=None, timeout=300, cwd=ROOT):
  """Runs `python -m trainer ARGS` (from the repo root); returns the CompletedProcess."""
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=full_env,
                        capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def mobile_price_csv():
  path = DATA_DIR / "train.csv"
  assert path.exists(), f"shared data missing: {path} (set JAXJOB_DATA_DIR)"
  return path


def check_golden(path: pathlib.Path, text: str) -> None:
  """Compares `text` with the golden file `path`; JAXJOB_UPDATE_GOLDENS=1 rewrites it first."""
  if os.environ.get("JAXJOB_UPDATE_GOLDENS") == "1":
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  assert path.exists(), f"missing {path}: run with JAXJOB_UPDATE_GOLDENS=1"
  assert text == path.read_text(), f"{path} differs: rerun with JAXJOB_UPDATE_GOLDENS=1 and review"
