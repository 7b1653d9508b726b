"""`python -m launch tpu-vm create|run|logs|status|delete`: the trainer on Cloud TPU VMs.

Each verb validates its flags (names as RFC 1123 labels, zones, durations, ...) before
anything is built, builds `gcloud` argv lists and runs them without a shell; with
`--dry-run` it prints every argv (`$ ...`, shell-quoted for reading) and runs nothing.
`create` makes a TPU VM directly or, with `--queued` (recommended; capacity is waited
for), a queued resource whose node id is the same name, labelled `jaxjob_run=NAME` and
`jaxjob_owner=OWNER` so that orphans can be listed (`status` without `--name`). `run`
is one `tpu-vm ssh --worker=all --command=SCRIPT`: SCRIPT is built from a fixed template
in which every user value (image, pip spec, workdir, trainer flags) goes through
`shlex.quote`; it starts the trainer detached on every worker (`nohup`, output in
`/tmp/jaxjob-NAME.log`, exit code in `/tmp/jaxjob-NAME.exit`), either as
`sudo docker run IMAGE <trainer flags>` (`--image`) or as `python -m trainer` from a
Python 3.12 venv that `uv` creates and fills with `--pip-spec` (a PEP 508 spec such as
`jaxjob[tpu] @ git+https://...`, or a `gs://.../*.whl[extras]` copied with
`gcloud storage cp`). Both set `JAX_PLATFORMS=tpu` (and each `--env NAME=VALUE`), so a
worker whose TPU cannot be opened fails at start instead of training on its CPU. `logs` runs one
`tpu-vm ssh --worker=N` per worker in parallel and prefixes each line with `[worker N]`
here; the worker count comes from `--workers` or from `tpu-vm describe`. No other JAX_*
variables are set: on a TPU VM the trainer's
`jax.distributed.initialize()` finds its peers from the VM metadata. JAX's compilation
cache stays on each VM across runs: the container gets the VM's `/var/cache/jaxjob` (created
and handed to the image's user by the script) where the image keeps it, and a pip install
uses the default, `~/.cache/jaxjob/jax`.

Examples:
  python -m launch tpu-vm create --name=demo --zone=us-central2-b --project=my-project \
      --accelerator-type=v4-8 --queued --valid-until-duration=6h
  python -m launch tpu-vm run --name=demo --zone=us-central2-b --project=my-project \
      --image=us-docker.pkg.dev/my-project/jaxjob/jaxjob:tpu \
      --workdir=gs://my-bucket/runs/demo -- --config=trainer/configs/breast_cancer.py

Common issues: a queued resource is usable only once `status` shows it ACTIVE; a spot VM
that was preempted must be deleted (`delete`) before it is created again, or it keeps
its quota; `--max-runtime` exists only with `--queued --flex-start` (alpha
`--max-run-duration`, which gcloud documents for flex-start only).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch import common
from launch import image as image_lib

# Cloud TPU "TPU software versions" for JAX, by accelerator generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(r"^(v[0-9][a-z0-9]*)-[0-9]{1,5}$")
_ZONE = re.compile(r"^[a-z]{2,20}-[a-z]{2,20}[0-9]{1,2}-[a-z]$")
_PROJECT = re.compile(r"^([a-z][-a-z0-9.]{0,61}[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
_VERSION = re.compile(r"^[a-z0-9][-a-z0-9._]{0,127}$")
_DURATION = re.compile(r"^([0-9]{1,6}[dhms]){1,4}$")
_DURATION_PART = re.compile(r"([0-9]+)([dhms])")
_LABEL_VALUE = re.compile(r"^[a-z0-9_-]{1,63}$")
_GS_PACKAGE = re.compile(r"^(gs://[^\[\]]+/([^/\[\]]+)\.(whl|tar\.gz))(\[[a-z0-9_,-]+\])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FLEX_START_MAX_SECONDS = 7 * 86400

TPUS = ["gcloud", "compute", "tpus"]
_VENV = "$HOME/jaxjob-venv"
_PYTHON = "3.12"  # pyproject's requires-python; the TPU images ship 3.10, so uv fetches it.
# No TPU: fail at start instead of training on the CPU. `run --env=JAX_PLATFORMS=...` replaces it.
_DEFAULT_ENV = {"JAX_PLATFORMS": "tpu"}
# JAX's compilation cache in the image (JAXJOB_COMPILATION_CACHE_DIR=/var/cache/jaxjob/jax, the
# Dockerfile); the script mounts the same path of the VM there.
CACHE_DIR = "/var/cache/jaxjob"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_METADATA = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
             "agent-worker-number")
_WORKER_ENDPOINTS = ["--flatten=networkEndpoints[]",
                     "--format=csv[no-heading](networkEndpoints.ipAddress)"]


def _check(value: str | None, pattern: re.Pattern, flag: str, expected: str) -> str:
  # fullmatch: with match(), `$` would let a trailing newline through.
  if value is None or not pattern.fullmatch(value):
    raise common.UsageError(f"{flag}={value!r} is not valid: expected {expected}")
  return value


def _name(value: str) -> str:
  """Validates --name as an RFC 1123 label."""
  return common.validate_name(value, "--name")


def _owner(args) -> str:
  owner = args.owner if args.owner is not None else owner_label(os.environ.get("USER"))
  return _check(owner, _LABEL_VALUE, "--owner", "lower-case letters, digits, '_' or '-'")


def _where(args) -> list[str]:
  """Validates --zone and --project and returns them as gcloud flags."""
  _check(args.zone, _ZONE, "--zone", "a zone such as us-central2-b")
  _check(args.project, _PROJECT, "--project", "a project id such as my-project")
  return [f"--zone={args.zone}", f"--project={args.project}"]


def owner_label(user: str | None) -> str:
  """Turns a user name into a label value: lower-case letters, digits, '_' and '-'."""
  value = re.sub(r"[^a-z0-9_-]", "-", (user or "").lower())[:63]
  return value if value.strip("-_") else "unknown"


def runtime_version(accelerator_type: str) -> str:
  """Returns the JAX runtime version for `accelerator_type` (e.g. v5litepod-16).

  Raises:
    UsageError: for a generation without a known runtime (pass --version then).
  """
  match = _ACCELERATOR.fullmatch(accelerator_type)
  generation = match.group(1) if match else accelerator_type
  if generation not in RUNTIME_VERSIONS:
    raise common.UsageError(
        f"--accelerator-type={accelerator_type}: no known runtime version for"
        f" {generation} (known: {', '.join(RUNTIME_VERSIONS)}); pass --version")
  return RUNTIME_VERSIONS[generation]


def create_argvs(args) -> tuple[list[str], list[list[str]]]:
  """Returns (notes, argvs) for `create`; validates every flag first."""
  name = _name(args.name)
  where = _where(args)
  expected = "a type such as v4-8, v5litepod-16, v5p-8 or v6e-8"
  accelerator = _check(args.accelerator_type, _ACCELERATOR, "--accelerator-type", expected)
  size = int(accelerator.rsplit("-", 1)[1])
  if size < 1 or size & (size - 1):  # every TPU slice is a power of two of chips or cores
    raise common.UsageError(f"--accelerator-type={accelerator}: a slice of {size} is not"
                            f" valid; expected a power of two, {expected}")
  if args.version is not None:
    version = _check(args.version, _VERSION, "--version", "a runtime version")
    notes = [f"runtime version {version} (from --version)"]
  else:
    version = runtime_version(accelerator)
    notes = [f"runtime version {version} (chosen for {accelerator}; override with --version)"]
  labels = f"--labels=jaxjob_run={name},jaxjob_owner={_owner(args)}"
  for flag in ("valid_until_duration", "max_runtime"):
    if getattr(args, flag) is not None:
      value = _check(getattr(args, flag), _DURATION, "--" + flag.replace("_", "-"),
                     "a duration such as 30m, 6h or 1d12h")
      if not any(int(n) for n, _ in _DURATION_PART.findall(value)):
        raise common.UsageError(f"--{flag.replace('_', '-')}={value}: expected a duration"
                                " longer than 0, such as 30m, 6h or 1d12h")
  if not args.queued:
    for flag, value in (("valid-until-duration", args.valid_until_duration),
                        ("max-runtime", args.max_runtime), ("flex-start", args.flex_start)):
      if value:
        raise common.UsageError(
            f"--{flag} needs --queued: gcloud offers it only for queued resources")
    argv = [*TPUS, "tpu-vm", "create", name, *where, f"--accelerator-type={accelerator}",
            f"--version={version}", *(["--spot"] if args.spot else []), labels]
    return notes, [argv]
  return notes + _queued_notes(args), [_queued_create_argv(args, name, where, version, labels)]


def _queued_create_argv(args, name, where, version, labels) -> list[str]:
  if args.spot and args.flex_start:
    raise common.UsageError("--spot and --flex-start exclude each other")
  if bool(args.max_runtime) != bool(args.flex_start):
    raise common.UsageError(
        "--max-runtime and --flex-start go together: gcloud documents --max-run-duration for"
        " flex-start only, and a flex-start request needs its run duration")
  if args.max_runtime and seconds(args.max_runtime) > _FLEX_START_MAX_SECONDS:
    raise common.UsageError(f"--max-runtime={args.max_runtime}: flex-start runs at most 7 days")
  alpha = args.max_runtime or args.flex_start  # Both exist only in the alpha track.
  track = ["gcloud", "alpha", "compute", "tpus"] if alpha else TPUS
  argv = [*track, "queued-resources", "create", name, *where, f"--node-id={name}",
          f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}"]
  argv += ["--spot"] if args.spot else []
  argv += ["--provisioning-model=flex-start"] if args.flex_start else []
  if args.valid_until_duration:
    argv.append(f"--valid-until-duration={args.valid_until_duration}")
  if args.max_runtime:
    argv.append(f"--max-run-duration={args.max_runtime}")
  return argv + [labels]


def check_duration(value: str, flag: str) -> str:
  return _check(value, _DURATION, flag, "a duration such as 30m, 6h or 1d12h")


def seconds(duration: str) -> int:
  """A checked duration (`1d12h`, `30m`) in seconds."""
  units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
  return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)([dhms])", duration))


def _queued_notes(args) -> list[str]:
  notes = []
  if args.max_runtime:
    notes.append("--max-runtime is alpha --max-run-duration: flex-start deletes the TPU after it")
  return notes + ["the TPU VM exists once `status --queued` shows the queued resource ACTIVE"]


def _remote_files(name: str, remote_dir: str) -> dict[str, str]:
  return {k: shlex.quote(f"{remote_dir}/jaxjob-{name}.{k}") for k in ("log", "pid", "exit", "sh")}


def _pip_lines(name: str, pip_spec: str, remote_dir: str) -> list[str]:
  """Shell lines that install `pip_spec` into the jaxjob venv on one worker."""
  venv_python = f'"{_VENV}/bin/python"'
  lines = [
      "PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --user --quiet --upgrade uv",
      f'python3 -m uv venv --allow-existing --python {_PYTHON} "{_VENV}"',
  ]
  package = _GS_PACKAGE.match(pip_spec)
  if package:
    url, filename, suffix, extras = package.groups()
    local_dir = f"{remote_dir}/jaxjob-{name}-pkg"
    filename += "." + suffix
    dist = filename.split("-")[0] if suffix == "whl" else filename[:-7].rsplit("-", 1)[0]
    lines.append(f"mkdir -p {shlex.quote(local_dir)}")
    lines.append(f"gcloud storage cp {shlex.quote(url)} {shlex.quote(local_dir + '/')}")
    pip_spec = f"{dist}{extras or ''} @ file://{local_dir}/{filename}"
  lines.append(f"python3 -m uv pip install --python {venv_python} {shlex.quote(pip_spec)}")
  return lines


def _docker_lines(name: str, image: str, cache_dir: str) -> list[str]:
  """Shell lines that log in to a Google registry (if any), pull `image` and make `cache_dir`."""
  registry = image.split("/")[0]
  lines = []
  if registry == "gcr.io" or registry.endswith((".gcr.io", "-docker.pkg.dev")):
    # The VM's service account token; `sudo docker` keeps its own credentials.
    lines.append("gcloud auth print-access-token | sudo docker login -u oauth2accesstoken"
                 f" --password-stdin {shlex.quote('https://' + registry)}")
  lines.append(f"sudo docker rm -f {shlex.quote('jaxjob-' + name)} > /dev/null 2>&1 || true")
  lines.append(f"sudo docker pull {shlex.quote(image)}")
  lines.append(f"sudo mkdir -p {shlex.quote(cache_dir)} && sudo chown {image_lib.TRAINER_USER}"
               f" {shlex.quote(cache_dir)}")
  return lines


def run_script(name: str, workdir: str, trainer_args: Sequence[str], *,
               image: str | None = None, pip_spec: str | None = None,
               env: dict[str, str] | None = None, remote_dir: str = "/tmp",
               cache_dir: str = CACHE_DIR) -> str:
  """Returns the shell script `run` executes on every worker (fixed template).

  Every user value is passed through `shlex.quote`. The trainer command is written to
  `jaxjob-NAME.sh` through a quoted here-document (no expansion inside) and started
  with `nohup`, so each trainer flag arrives as exactly one argument. User values hold
  no newline (checked before), so none can end the here-document early. With `image`, the
  worker's `cache_dir` holds the container's compilation cache.
  """
  files = _remote_files(name, remote_dir)
  trainer = [*trainer_args, f"--workdir={workdir}"]
  env = {**_DEFAULT_ENV, **(env or {})}
  lines = [
      "set -eu",
      f'if [ -f {files["pid"]} ] && kill -0 "$(cat {files["pid"]})" 2>/dev/null; then'
      f' echo "jaxjob: {name} is already running on $(hostname)" >&2; exit 3; fi',
      f'rm -f {files["exit"]}',
  ]
  if image is not None:
    lines += _docker_lines(name, image, cache_dir)
    command = shlex.join(["sudo", "docker", "run", f"--name=jaxjob-{name}", "--privileged",
                          "--net=host", "--init", f"--volume={cache_dir}:{CACHE_DIR}",
                          *(f"--env={k}={v}" for k, v in env.items()), image, *trainer])
  else:
    lines += _pip_lines(name, pip_spec, remote_dir)
    # Run from the directory holding the installed package, so that
    # --config=trainer/configs/X.py means the same file as in a checkout.
    python = f'"{_VENV}/bin/python"'
    assignments = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())  # Names checked.
    command = (f'cd "$({python} -c "import os, trainer; print(os.path.dirname('
               f'os.path.dirname(trainer.__file__)))")" && {assignments} {python} -m trainer '
               + shlex.join(trainer))
  lines += [
      f'cat > {files["sh"]} << "JAXJOB_EOF"',
      command,
      f'echo $? > {files["exit"]}',
      "JAXJOB_EOF",
      f'nohup sh {files["sh"]} > {files["log"]} 2>&1 < /dev/null &',
      f'echo $! > {files["pid"]}',
      f'echo "jaxjob: started {name} on $(hostname), log {files["log"]}"',
  ]
  return "\n".join(lines) + "\n"


def logs_script(name: str, *, follow: bool = True, remote_dir: str = "/tmp") -> str:
  """Returns the script `logs` runs on one worker: the log, then the exit code."""
  files = _remote_files(name, remote_dir)
  show = [
      f'pid=$(cat {files["pid"]} 2>/dev/null || true)',
      f'if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then'
      f' tail -n +1 -F --pid="$pid" {files["log"]}; else cat {files["log"]}; fi',
  ] if follow else [f'cat {files["log"]}']
  return "\n".join([
      f'if [ ! -f {files["log"]} ]; then echo "jaxjob: no log yet on $(hostname)"; exit 1; fi',
      *show,
      f'if [ -f {files["exit"]} ]; then echo "jaxjob: trainer exited with code'
      f' $(cat {files["exit"]})"; fi',
  ]) + "\n"


def status_script(name: str, *, remote_dir: str = "/tmp") -> str:
  """Returns the script `status` runs on every worker: one `[worker N] state` line."""
  files = _remote_files(name, remote_dir)
  return "\n".join([
      f"w=$(curl -sf -H Metadata-Flavor:Google {_METADATA} 2>/dev/null || hostname)",
      f'if [ -f {files["pid"]} ] && kill -0 "$(cat {files["pid"]})" 2>/dev/null; then'
      " s=running",
      f'elif [ -f {files["exit"]} ]; then s="exited with code $(cat {files["exit"]})"',
      'else s="not started"; fi',
      'echo "[worker $w] $s"',
  ]) + "\n"


def _env(pairs: Sequence[str] | None) -> dict[str, str]:
  """`--env NAME=VALUE` flags as a dict; raises UsageError on a bad name or value."""
  env = {}
  for pair in pairs or ():
    key, sep, value = pair.partition("=")
    if not sep or not _ENV_NAME.fullmatch(key) or _CONTROL.search(value):
      raise common.UsageError(f"--env={pair!r}: expected NAME=VALUE, NAME of letters, digits"
                              " and '_', VALUE without control characters")
    env[key] = value
  return env


def run_argvs(args) -> tuple[list[str], list[list[str]]]:
  name = _name(args.name)
  where = _where(args)
  workdir = common.validate_gcs_url(args.workdir)
  trainer_args = common.trainer_args(args.trainer_args)
  if args.image is not None:
    common.validate_image(args.image)
  elif _CONTROL.search(args.pip_spec) or not args.pip_spec.strip():
    raise common.UsageError(f"--pip-spec={args.pip_spec!r}: expected one requirement line")
  elif args.pip_spec.startswith("gs://") and not _GS_PACKAGE.fullmatch(args.pip_spec):
    raise common.UsageError(f"--pip-spec={args.pip_spec}: a gs:// spec must name a wheel or"
                            " sdist, e.g. gs://BUCKET/jaxjob-0.1.0-py3-none-any.whl[tfds]")
  env = _env(args.env)
  script = run_script(name, workdir, trainer_args, image=args.image, pip_spec=args.pip_spec,
                      env=env)
  argv = [*TPUS, "tpu-vm", "ssh", name, *where, "--worker=all", f"--command={script}"]
  return [f"starts the trainer detached on every worker; follow it with `logs`"], [argv]


def _status_argvs(args) -> tuple[list[str], list[list[str]]]:
  where = _where(args)
  if args.name is None:
    owner = _owner(args)
    return ([f"TPU VMs labelled jaxjob_owner={owner}, then every queued resource in the zone"],
            [[*TPUS, "tpu-vm", "list", *where, f"--filter=labels.jaxjob_owner={owner}",
              "--format=table(name.basename(),state,acceleratorType.basename(),"
              "labels.jaxjob_run,createTime)"],
             [*TPUS, "queued-resources", "list", *where,
              "--format=table(name.basename(),state.state,createTime)"]])
  name = _name(args.name)
  argvs = [[*TPUS, "queued-resources", "describe", name, *where,
            "--format=value(state.state)"]] if args.queued else []
  argvs.append([*TPUS, "tpu-vm", "describe", name, *where,
                "--format=value(state,health,acceleratorType.basename())"])
  argvs.append([*TPUS, "tpu-vm", "ssh", name, *where, "--worker=all",
                f"--command={status_script(name)}"])
  return ["stops at the first command that fails (e.g. no TPU VM yet)"], argvs


def delete_argvs(args) -> tuple[list[str], list[list[str]]]:
  name = _name(args.name)
  where = _where(args)
  if args.queued:
    return (["--force also deletes the TPU VM, in any state (SUSPENDED, FAILED, PREEMPTED)"],
            [[*TPUS, "queued-resources", "delete", name, *where, "--force", "--quiet"]])
  return (["deletes the TPU VM in any state, PREEMPTED included"],
          [[*TPUS, "tpu-vm", "delete", name, *where, "--quiet"]])


def run_shown(argv: list[str], dry_run: bool) -> int:
  """common.run, but a dry run first shows an ssh --command script verbatim."""
  script = next((a[len("--command="):] for a in argv if a.startswith("--command=")), None)
  if dry_run and script is not None:
    worker = next((a for a in argv if a.startswith("--worker=")), "--worker=0")
    print(f"# remote script for {worker} (the --command of the ssh below, verbatim):")
    print("".join(f"#| {line}\n" for line in script.splitlines()), end="", flush=True)
  return common.run(argv, dry_run=dry_run)


def _execute(notes: list[str], argvs: list[list[str]], dry_run: bool) -> int:
  for note in notes:
    print(f"# {note}", flush=True)
  for argv in argvs:
    rc = run_shown(argv, dry_run)
    if rc:
      return rc
  return 0


def stream_workers(argvs: Sequence[Sequence[str]], out=None) -> int:
  """Runs one command per worker at once; prefixes each output line with `[worker N]`.

  Returns:
    0 when every command exited 0, else the first non-zero exit code (130 on Ctrl-C).
  """
  labels = [f"[worker {i}]" for i in range(len(argvs))]
  return common.stream_prefixed(argvs, labels, out=out)


def logs(args, out=None) -> int:
  """The `logs` verb; `out` receives the `[worker N]` lines (default: stdout)."""
  name = _name(args.name)
  where = _where(args)
  if args.workers is not None and not 1 <= args.workers <= 4096:
    raise common.UsageError(f"--workers={args.workers}: expected 1 to 4096")
  script = logs_script(name, follow=args.follow)
  ssh = [*TPUS, "tpu-vm", "ssh", name, *where]
  command = f"--command={script}"
  describe = [*TPUS, "tpu-vm", "describe", name, *where, *_WORKER_ENDPOINTS]
  workers = args.workers
  if workers is None and args.dry_run:
    print("# one ssh per worker, as many as the describe lists; lines get [worker N]")
    common.run(describe, dry_run=True)
    run_shown([*ssh, "--worker=0", command], dry_run=True)
    return 0
  if workers is None:
    common.echo(describe, dry_run=False)
    proc = subprocess.run(describe, capture_output=True, text=True, check=False)
    workers = len([line for line in proc.stdout.splitlines() if line.strip()])
    if proc.returncode or not workers:
      sys.stderr.write(proc.stderr or f"no workers found for {name}\n")
      return proc.returncode or 1
  argvs = [[*ssh, f"--worker={i}", command] for i in range(workers)]
  print(f"# {workers} worker(s), in parallel; each line gets [worker N]", flush=True)
  for argv in argvs:
    if args.dry_run:
      run_shown(argv, dry_run=True)
    else:
      common.echo(argv, dry_run=False)
  return 0 if args.dry_run else stream_workers(argvs, out=out)


def _verb(builder):
  return lambda args: _execute(*builder(args), dry_run=args.dry_run)


def _add_common(parser: argparse.ArgumentParser, name_required: bool = True) -> None:
  parser.add_argument("--name", required=name_required,
                      help="TPU VM name (and queued resource id): an RFC 1123 label")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
  parser.add_argument("--project", required=True, help="Google Cloud project id")
  parser.add_argument("--dry-run", action="store_true",
                      help="print every command (and script) and run nothing")


def add_create_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of `create` (and `launch`) but --max-runtime, whose meaning differs."""
  parser.add_argument("--accelerator-type", required=True, help="e.g. v4-8, v5litepod-16")
  parser.add_argument("--version", help="runtime version (default: from the accelerator)")
  parser.add_argument("--spot", action="store_true", help="Spot VM: cheaper, preemptible")
  parser.add_argument("--queued", action="store_true",
                      help="create a queued resource (recommended): waits for capacity")
  parser.add_argument("--valid-until-duration", help="queued: give up waiting after this")
  parser.add_argument("--flex-start", action="store_true",
                      help="queued: flex-start, up to 7 days (alpha; needs --max-runtime)")
  parser.add_argument("--owner", help="owner label (default: $USER, sanitised)")


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """The flags of `run` (and `launch`)."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--image", help="container image whose entrypoint is the trainer")
  source.add_argument("--pip-spec", help="pip requirement for jaxjob, or gs://...whl[extras]")
  parser.add_argument("--workdir", required=True, help="gs://BUCKET/PATH for the run")
  parser.add_argument("--env", action="append", metavar="NAME=VALUE",
                      help="a variable for the trainer, repeatable (default: JAX_PLATFORMS=tpu)")
  parser.add_argument("trainer_args", nargs=argparse.REMAINDER, help="-- then trainer flags")


def add_parser(subparsers) -> None:
  """Adds `tpu-vm` and its verbs to the `python -m launch` subparsers."""
  parser = subparsers.add_parser("tpu-vm", help="run the trainer on Cloud TPU VMs",
                                 description=__doc__.split("\n\n")[0])
  verbs = parser.add_subparsers(dest="verb", required=True)

  create = verbs.add_parser("create", allow_abbrev=False, help="create a TPU VM")
  _add_common(create)
  add_create_flags(create)
  create.add_argument("--max-runtime", help="with --flex-start: delete the TPU after this (alpha)")
  create.set_defaults(func=_verb(create_argvs))

  run = verbs.add_parser("run", allow_abbrev=False, help="start the trainer on all workers")
  _add_common(run)
  add_run_flags(run)
  run.set_defaults(func=_verb(run_argvs))

  logs_parser = verbs.add_parser("logs", allow_abbrev=False, help="every worker's output")
  _add_common(logs_parser)
  logs_parser.add_argument("--workers", type=int, help="worker count (default: tpu-vm describe)")
  logs_parser.add_argument("--no-follow", dest="follow", action="store_false",
                           help="print what is there and stop")
  logs_parser.set_defaults(func=logs)

  status = verbs.add_parser("status", allow_abbrev=False,
                            help="state of one run, or (without --name) the owner's TPUs")
  _add_common(status, name_required=False)
  status.add_argument("--queued", action="store_true", help="also the queued resource")
  status.add_argument("--owner", help="without --name: owner label to list")
  status.set_defaults(func=_verb(_status_argvs))

  delete = verbs.add_parser("delete", allow_abbrev=False, help="delete the TPU VM")
  _add_common(delete)
  delete.add_argument("--queued", action="store_true",
                      help="delete the queued resource and its VM (--force)")
  delete.set_defaults(func=_verb(delete_argvs))

  from launch import tpu_vm_oneshot  # pylint: disable=g-import-not-at-top  (imports this module)
  tpu_vm_oneshot.add_parser(verbs, _add_common)
