"""Tests for `python -m launch image {build,push}`: goldens, bad input, real gcloud and docker.

The dry runs are compared with tests/golden/image/ (`JAXJOB_UPDATE_GOLDENS=1` rewrites them).
The printed `gcloud auth configure-docker` runs for real, with HOME and the gcloud config in a
temporary directory. The slow test builds the trainer image and a small project on top with
the Docker engine of tests/container.py, pushes it to Debian's docker-registry on 127.0.0.1,
removes it, pulls it back and runs it.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from launch import image as image_launcher
from launch import local
from tests import container
from tests.conftest import ROOT, check_golden

GOLDEN_DIR = ROOT / "tests" / "golden" / "image"
AR = "us-docker.pkg.dev/my-project/jaxjob"
INVOCATIONS = {
    "build_cpu": ["build", f"--tag={AR}/jaxjob:cpu", "--jaxjob-dir=jaxjob"],
    "build_cuda12_base_host_network": [
        "build", f"--tag={AR}/jaxjob:cuda12", "--accelerator=cuda12", "--network=host",
        "--base-image=python:3.12-slim-bookworm", "--jaxjob-dir=jaxjob"],
    "build_tpu_project": ["build", f"--tag={AR}/my-model:tpu", "--accelerator=tpu",
                          "--project=my_project", "--jaxjob-dir=jaxjob"],
    "build_project_push": ["build", f"--tag={AR}/my-model:cpu", "--project=my_project",
                           "--jaxjob-dir=jaxjob", "--push", "--configure-docker"],
    "push_artifact_registry": ["push", f"--tag={AR}/my-model:tpu"],
    "push_configure_docker": ["push", f"--tag={AR}/my-model:tpu", "--configure-docker"],
    "push_local_registry": ["push", "--tag=127.0.0.1:5000/jaxjob:cpu"],
}
# A user project: its own package, a config file and a dependency the trainer image lacks.
_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-project"
version = "0.1.0"
dependencies = [{dependency}]

[tool.setuptools]
packages = ["tiny_project"]
"""


def _project(directory, dependency: str = ""):
  (directory / "tiny_project").mkdir(parents=True)
  (directory / "pyproject.toml").write_text(_PYPROJECT.format(dependency=dependency))
  (directory / "tiny_project" / "__init__.py").write_text('GREETING = "tiny project"\n')
  # A config of the project's own, run by path as in a checkout: `--config=tiny_project/...`.
  (directory / "tiny_project" / "config.py").write_text(
      "from trainer.configs import breast_cancer\n\n\ndef get_config():\n"
      "  config = breast_cancer.get_config()\n  config.name = 'tiny'\n  return config\n")
  return directory


@pytest.fixture
def workspace(tmp_path, monkeypatch):
  """A directory with `jaxjob` (this checkout) and `my_project`, as the goldens name them."""
  (tmp_path / "jaxjob").symlink_to(ROOT)
  _project(tmp_path / "my_project")
  monkeypatch.chdir(tmp_path)
  return tmp_path


def cli(argv, capsys):
  from launch.__main__ import main  # pylint: disable=import-outside-toplevel
  try:
    code = main(["image", *argv])
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def dry_run_text(name, capsys):
  argv = [*INVOCATIONS[name], "--dry-run"]
  code, out, err = cli(argv, capsys)
  assert (code, err) == (0, ""), err
  return f"# {shlex.join(['python', '-m', 'launch', 'image', *argv])}\n{out}"


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_dry_run_matches_golden(name, workspace, capsys):
  text = dry_run_text(name, capsys)
  check_golden(GOLDEN_DIR / f"{name}.txt", text)


def test_no_stale_goldens():
  assert {p.stem for p in GOLDEN_DIR.glob("*.txt")} == set(INVOCATIONS)


@pytest.mark.parametrize("argv, expected", [
    (["build", "--tag=Jaxjob:cpu"], "--tag='Jaxjob:cpu' is not an image reference"),
    (["build", f"--tag={AR}/jaxjob@sha256:{'a' * 64}"], "without @sha256:"),
    (["build", "--tag=j:cpu", "--project=missing"],
     "--project='missing': expected a directory with pyproject.toml or setup.py"),
    (["build", "--tag=j:cpu", "--jaxjob-dir=my_project"],
     "--jaxjob-dir='my_project': expected a directory with Dockerfile"),
    (["build", "--tag=j:cpu", "--base-image=python 3"], "--base-image='python 3'"),
    (["build", "--tag=j:cpu", "--accelerator=rocm"], "invalid choice: 'rocm'"),
    (["push", "--tag=jaxjob:cpu"], "with a registry host"),
    (["build", "--tag=jaxjob:cpu", "--push"], "with a registry host"),
    (["build", f"--tag={AR}/j:cpu", "--configure-docker"], "--configure-docker goes with --push"),
    (["push", "--tag=127.0.0.1:5000/j:cpu", "--configure-docker"], "is not Artifact Registry"),
])
def test_bad_input_is_one_line_and_exit_2(argv, expected, workspace, capsys):
  code, out, err = cli([*argv, "--dry-run"], capsys)
  assert code == 2 and out == "", out
  assert expected in err and err.count("\n") == 1, err


def test_a_project_with_its_own_trainer_package_is_refused(workspace, capsys):
  (workspace / "my_project" / "trainer").mkdir()
  code, _, err = cli(["build", "--tag=j:cpu", "--project=my_project", "--dry-run"], capsys)
  assert code == 2 and "would replace jaxjob's trainer package" in err


def test_accelerators_and_user_are_the_dockerfiles():
  dockerfile = (ROOT / "Dockerfile").read_text()
  extras = re.search(r"extras = \{(.*?)\}", dockerfile, re.S).group(1)
  assert tuple(re.findall(r'"(\w+)":', extras)) == image_launcher.ACCELERATORS
  assert re.findall(r"^USER (\S+)$", dockerfile, re.M) == [image_launcher.TRAINER_USER]


def test_printed_configure_docker_runs_in_real_gcloud(workspace, capsys):
  # Real gcloud, offline: it writes docker's credential helper for the host and nothing else.
  (login,) = [shlex.split(line[2:]) for line in
              dry_run_text("push_configure_docker", capsys).splitlines()
              if line.startswith("$ gcloud ")]
  home = workspace / "home"
  env = dict(os.environ, HOME=str(home), CLOUDSDK_CONFIG=str(workspace / "gcloud"),
             CLOUDSDK_CORE_DISABLE_PROMPTS="1")
  proc = subprocess.run(login, env=env, capture_output=True, text=True, timeout=120,
                        check=False, stdin=subprocess.DEVNULL)
  assert proc.returncode == 0, proc.stderr
  config = json.loads((home / ".docker" / "config.json").read_text())
  assert config == {"credHelpers": {"us-docker.pkg.dev": "gcloud"}}
  wrong = subprocess.run([*login, "--bogus-flag"], env=env, capture_output=True, text=True,
                         timeout=120, check=False, stdin=subprocess.DEVNULL)
  assert wrong.returncode == 2, wrong.stderr


@pytest.fixture
def registry():
  server = container.Registry(local._free_port()).start()  # pylint: disable=protected-access
  yield server
  server.close()


def _launch(*argv: str, cwd) -> subprocess.CompletedProcess:
  # The classic builder: BuildKit would fetch the Dockerfile's `# syntax=` frontend first.
  return subprocess.run([sys.executable, "-m", "launch", "image", *argv], cwd=cwd,
                        capture_output=True, text=True, timeout=2400, check=False,
                        env={**os.environ, "DOCKER_BUILDKIT": "0", "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_build_push_pull_and_run_a_project_image(registry, tmp_path):
  try:
    container.engine()
  except container.Unavailable as e:
    if os.environ.get(container.SKIP_VARIABLE) == "1":
      pytest.skip(str(e))
    pytest.fail(str(e), pytrace=False)
  base = container.base_image()
  # The project's one dependency is not in the trainer image: pip must install it on top.
  project = _project(tmp_path / "tiny", dependency='"six"')
  tag = f"{registry.host}/tiny-project:cpu"
  started = time.monotonic()
  built = _launch("build", f"--tag={tag}", f"--project={project}", f"--base-image={base}",
                  "--network=host", "--push", cwd=tmp_path)
  seconds = {"build and push": time.monotonic() - started}
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  (digest,) = re.findall(r"^pushed: (\S+@sha256:[0-9a-f]{64}) ", built.stdout, re.M)
  assert digest.startswith(f"{registry.host}/tiny-project@")
  pushed = _launch("push", f"--tag={tag}", cwd=tmp_path)  # Again: the same digest.
  assert pushed.returncode == 0, pushed.stdout + pushed.stderr
  assert f"pushed: {digest} " in pushed.stdout
  container.docker("rmi", tag)  # What runs next must come from the registry.
  assert container.docker("image", "inspect", digest, check=False).returncode != 0
  pulling = time.monotonic()
  container.docker("pull", digest, timeout=900)
  seconds["pull"] = time.monotonic() - pulling
  print("image build --push (trainer image cached), pull: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
  script = ("import six, tiny_project, trainer.train, jax; print(tiny_project.GREETING,"
            " tiny_project.__file__, jax.default_backend())")
  proc = container.docker("run", "--rm", "--network=none", "--read-only", "--tmpfs=/tmp",
                          "--entrypoint=python", digest, "-c", script)
  assert proc.stdout.split() == ["tiny", "project", "/app/tiny_project/__init__.py", "cpu"]
  assert container.image_user(digest) == image_launcher.TRAINER_USER
  job = container.docker("run", "--rm", "--network=none", "--read-only", "--tmpfs=/tmp",
                         digest, "--config=tiny_project/config.py", "--config.train.steps=20",
                         "--workdir=/tmp/run")
  assert "done: step 20 held-out accuracy" in job.stdout + job.stderr, job.stdout[-3000:]
  container.docker("rmi", digest, check=False)


def test_every_documented_image_command_is_a_valid_dry_run(tmp_path, monkeypatch, capsys):
  # The docs' `--project=../my-model` is a project beside the working directory.
  _project(tmp_path / "my-model")
  (tmp_path / "work").mkdir()
  monkeypatch.chdir(tmp_path / "work")
  pages = [ROOT / "README.md", ROOT / "docs" / "gke.md", ROOT / "docs" / "tpu-vm.md"]
  commands = [shlex.split(line)[4:] for page in pages for line in page.read_text().splitlines()
              if line.startswith("python -m launch image ")]
  assert {argv[0] for argv in commands} == {"build", "push"} and len(commands) >= 6
  for argv in commands:
    code, out, err = cli([*argv, "--dry-run"], capsys)
    assert (code, err) == (0, ""), (argv, err)
    assert "$ docker " in out
