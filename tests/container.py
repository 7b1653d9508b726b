"""The container test harness: a Docker engine, a local base image, the trainer image.

No image registry is reachable from the machines this project is tested on, so the
production base (`python:3.12-slim-bookworm` pinned by digest, see the Dockerfile) cannot be
pulled. The harness makes a stand-in base instead and builds the real Dockerfile on it:

1. `engine()` finds a running Docker engine or starts one: `dockerd --bridge=none
   --iptables=false --ip-masq=false` (installing Debian's `docker.io` first when root and
   apt-get can). No bridge and no private address is ever created; containers use the
   host network (loopback) only.
2. `base_image()` makes `jaxjob-test-base:<key>` once per machine: a Debian `trixie`
   root (`debootstrap --variant=minbase`, Python 3.13: bookworm's 3.11 is below
   requires-python) with a `python` link and this machine's CA bundle, so that pip inside
   `docker build --network=host` can reach the package registry. The key hashes the
   recipe, the mirror and the CA bundle, so a changed recipe makes a new base.
3. `trainer_image()` builds the Dockerfile of the working tree on that base
   (`--build-arg BASE_IMAGE=...`); Docker's layer cache makes a rebuild of an unchanged
   tree take seconds.

`pod_run_flags()` turns the pod that `python -m launch k8s render` prints into `docker run`
flags, so the containers run as Kubernetes would run them (docs/container.md lists the
mapping). `JAXJOB_SKIP_CONTAINER_TESTS=1` turns "no engine can start" from a failure into
a skip, for developer machines without Docker.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_VARIABLE = "JAXJOB_SKIP_CONTAINER_TESTS"
SUITE = "trixie"  # Debian 13: python3 is 3.13 (>= requires-python 3.12).
PACKAGES = "python3,python3-venv,ca-certificates"
HOST_CA = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
ENGINE_ARGS = ["dockerd", "--bridge=none", "--iptables=false", "--ip-masq=false"]
# What the base recipe does inside the root after debootstrap (part of the content key).
_BASE_FIXUP = """\
ln -sf python3 "$ROOT/usr/bin/python"
cp "$CA" "$ROOT/etc/ssl/certs/ca-certificates.crt"
rm -rf "$ROOT/var/cache/apt/archives"/*.deb "$ROOT/var/lib/apt/lists"/*
"""


class Unavailable(Exception):
  """No Docker engine can be found or started here (one line, for the test report)."""


def docker(*args: str, timeout: float = 600, check: bool = True,
           **kwargs) -> subprocess.CompletedProcess:
  """Runs `docker ARGS` and returns the CompletedProcess (text, captured output)."""
  # The classic builder: BuildKit would fetch the Dockerfile's `# syntax=` frontend from
  # Docker Hub, which is not reachable here.
  env = {**os.environ, "DOCKER_BUILDKIT": "0", **kwargs.pop("env", {})}
  proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout,
                        env=env, check=False, **kwargs)
  if check and proc.returncode:
    raise AssertionError(f"docker {' '.join(args[:3])} ... exited {proc.returncode}:\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
  return proc


def _engine_answers() -> bool:
  try:
    return docker("info", "--format", "{{.ServerVersion}}", timeout=30,
                  check=False).returncode == 0
  except (FileNotFoundError, subprocess.TimeoutExpired):
    return False


def _install(*packages: str) -> None:
  """apt-get installs `packages` when root and apt-get exist; else does nothing."""
  if os.geteuid() != 0 or shutil.which("apt-get") is None:
    return
  subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *packages],
                 env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                 capture_output=True, check=False, timeout=900)


def tool(binary: str, package: str, purpose: str) -> str:
  """The path of `binary`, installing Debian's `package` first if it is missing.

  Raises:
    Unavailable: it is still missing (not root, or no apt-get).
  """
  if shutil.which(binary) is None:
    _install(package)
  path = shutil.which(binary)
  if path is None:
    raise Unavailable(f"{binary} is missing (apt-get install {package}): {purpose}")
  return path


def engine() -> None:
  """Makes sure a Docker engine answers. Raises Unavailable with one line if none can."""
  if _engine_answers():
    return
  if shutil.which("dockerd") is None:
    _install("docker.io")
  if shutil.which("dockerd") is None or shutil.which("docker") is None:
    raise Unavailable("no Docker engine: `docker info` fails and dockerd is not installed"
                      f" (apt-get install docker.io, or set {SKIP_VARIABLE}=1)")
  if os.geteuid() != 0:
    raise Unavailable("no Docker engine answers and starting dockerd needs root"
                      f" (start it, or set {SKIP_VARIABLE}=1)")
  descriptor, log = tempfile.mkstemp(prefix="dockerd-", suffix=".log")
  # The engine outlives the tests on purpose: the next run finds it and its image cache.
  # pylint: disable-next=consider-using-with
  subprocess.Popen(ENGINE_ARGS, stdout=descriptor, stderr=subprocess.STDOUT,
                   stdin=subprocess.DEVNULL, start_new_session=True)
  os.close(descriptor)
  deadline = time.monotonic() + 90
  while time.monotonic() < deadline:
    if _engine_answers():
      return
    time.sleep(1)
  raise Unavailable(f"dockerd did not answer within 90 s (log: {log};"
                    f" set {SKIP_VARIABLE}=1 to skip)")


def mirror() -> str:
  """The Debian mirror of this machine's apt sources (deb822 or one-line format)."""
  sources = sorted(pathlib.Path("/etc/apt/sources.list.d").glob("*.sources"))
  for path in sources + [pathlib.Path("/etc/apt/sources.list")]:
    text = path.read_text() if path.exists() else ""
    for url in re.findall(r"^(?:URIs:|deb)\s+(\S+)", text, re.MULTILINE):
      if url.rstrip("/").endswith("/debian"):
        return url.rstrip("/")
  return DEFAULT_MIRROR


def base_key() -> str:
  """Content key of the base image: recipe, suite, packages, mirror and CA bundle."""
  digest = hashlib.sha256()
  for part in (SUITE, PACKAGES, mirror(), _BASE_FIXUP):
    digest.update(part.encode() + b"\0")
  digest.update(HOST_CA.read_bytes() if HOST_CA.exists() else b"")
  return digest.hexdigest()[:16]


def base_image() -> str:
  """Returns the tag of the local base image, making it first if this machine lacks it."""
  tag = f"jaxjob-test-base:{base_key()}"
  if docker("image", "inspect", tag, check=False).returncode == 0:
    return tag
  tool("debootstrap", "debootstrap", "it makes the local base image")
  with tempfile.TemporaryDirectory(prefix="jaxjob-base-", dir="/var/tmp") as work:
    root = pathlib.Path(work) / "root"
    proc = subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}",
                           SUITE, str(root), mirror()], capture_output=True, text=True,
                          timeout=1200, check=False)
    if proc.returncode:
      raise AssertionError(f"debootstrap {SUITE} failed:\n{proc.stdout[-3000:]}")
    subprocess.run(["sh", "-ec", _BASE_FIXUP], env={"ROOT": str(root), "CA": str(HOST_CA)},
                   check=True)
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    docker("import", "--change", f"LABEL jaxjob.test-base-key={base_key()}",
           "--change", "ENV LANG=C.UTF-8", "-", tag, stdin=tar.stdout)
    tar.wait()
  return tag


def trainer_image(base: str, accelerator: str = "cpu",
                  tag: str = "jaxjob-test:cpu") -> tuple[str, float]:
  """Builds the working tree's Dockerfile on `base`; returns (tag, seconds it took)."""
  started = time.monotonic()
  build = ["build", "--network=host", f"--build-arg=BASE_IMAGE={base}",
           f"--build-arg=ACCELERATOR={accelerator}"]
  # The deps stage gets a tag too: an untagged stage is "dangling", and `docker image
  # prune` would throw away the dependency layer that makes rebuilds take seconds.
  docker(*build, "--target=deps", "--tag", f"{tag}-deps", str(ROOT), timeout=1800)
  docker(*build, "--tag", tag, str(ROOT), timeout=1800)
  return tag, time.monotonic() - started


def image_user(image: str) -> str:
  return docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip()


def _size(quantity: str) -> str:
  """A Kubernetes quantity (16Gi, 512Mi) as a Docker size (16g, 512m)."""
  match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", quantity)
  if not match:
    raise ValueError(f"unsupported quantity {quantity!r}")
  return match.group(1) + {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t", None: ""}[match.group(2)]


_POD_SECURITY = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
_CONTAINER_SECURITY = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsNonRoot",
                       "capabilities"}
_INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def pod_run_flags(pod: dict, *, index: int, coordinator: str) -> list[str]:
  """`docker run` flags (up to and including the image) for completion index `index`.

  Every field of the pod that changes how the trainer runs is translated; one this
  function does not know raises ValueError, so a manifest change cannot silently bypass
  these tests. The one deliberate difference: the coordinator's Service DNS name
  becomes `coordinator` (127.0.0.1:PORT on the host network).
  """
  (container,) = pod["containers"]
  security = pod.get("securityContext", {})
  own = container.get("securityContext", {})
  unknown = (set(security) - _POD_SECURITY) | (set(own) - _CONTAINER_SECURITY)
  if unknown:
    raise ValueError(f"securityContext fields without a docker translation: {sorted(unknown)}")
  if security.get("seccompProfile", {}).get("type", "RuntimeDefault") != "RuntimeDefault":
    raise ValueError("only the RuntimeDefault seccomp profile (docker's default) is mapped")
  flags = ["--network=host", f"--user={security['runAsUser']}:{security['runAsGroup']}"]
  if "fsGroup" in security:
    flags.append(f"--group-add={security['fsGroup']}")
  if own.get("readOnlyRootFilesystem"):
    flags.append("--read-only")
  if own.get("allowPrivilegeEscalation") is False:
    flags.append("--security-opt=no-new-privileges")
  flags += [f"--cap-drop={cap}" for cap in own.get("capabilities", {}).get("drop", [])]
  if own.get("capabilities", {}).get("add"):
    raise ValueError("added capabilities are not mapped")
  limits = container.get("resources", {}).get("limits", {})
  if "memory" in limits:
    flags.append(f"--memory={_size(limits['memory'])}")
  flags.append(f"--stop-timeout={pod.get('terminationGracePeriodSeconds', 30)}")
  flags += _volume_flags(pod, container)
  for variable in container.get("env", []):
    flags.append(f"--env={variable['name']}={_env_value(variable, index, coordinator)}")
  if container.get("workingDir"):
    flags.append(f"--workdir={container['workingDir']}")
  command = container.get("command", [])
  if command:
    flags.append(f"--entrypoint={command[0]}")
  return flags


def pod_command(pod: dict) -> list[str]:
  """What follows the image on the `docker run` line: command[1:] then args."""
  (container,) = pod["containers"]
  return list(container.get("command", [])[1:]) + list(container.get("args", []))


def _volume_flags(pod: dict, container: dict) -> list[str]:
  volumes = {v["name"]: v for v in pod.get("volumes", [])}
  flags = []
  for mount in container.get("volumeMounts", []):
    volume = volumes[mount["name"]]
    if set(volume) != {"name", "emptyDir"} or volume["emptyDir"].get("medium"):
      raise ValueError(f"volume {mount['name']}: only disk-backed emptyDir is mapped")
    # An emptyDir is a fresh, empty, world-writable directory on the node's disk. Docker's
    # --tmpfs comes out root-owned 0755 here whatever its mode= says, so a fresh host
    # directory stands in (its sizeLimit is not enforced).
    path = tempfile.mkdtemp(prefix="jaxjob-emptydir-")
    os.chmod(path, 0o1777)
    _EMPTY_DIRS.append(path)
    flags.append(f"--volume={path}:{mount['mountPath']}:rw")
  return flags


_EMPTY_DIRS: list[str] = []  # removed when the test session ends
atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _EMPTY_DIRS])


def _env_value(variable: dict, index: int, coordinator: str) -> str:
  if variable["name"] == "JAX_COORDINATOR_ADDRESS":
    return coordinator
  if "value" in variable:
    return str(variable["value"])
  field = variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
  if field == _INDEX_FIELD:
    return str(index)
  raise ValueError(f"env {variable['name']}: no docker translation for {variable}")


class Registry:
  """Debian's docker-registry (distribution 2.8) on 127.0.0.1:<free port>, storage in a temp dir.

  Docker treats registries on 127.0.0.0/8 as insecure (plain HTTP) by default, so images
  are pushed to and pulled from it as from any registry.
  """

  def __init__(self, port: int):
    self.port = port
    self._dir = tempfile.TemporaryDirectory(prefix="jaxjob-registry-")
    self._process: subprocess.Popen | None = None

  @property
  def host(self) -> str:
    return f"127.0.0.1:{self.port}"

  def start(self) -> "Registry":
    binary = tool("docker-registry", "docker-registry", "the registry the TPU VM script pulls from")
    config = pathlib.Path(self._dir.name) / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {self._dir.name}/data\nhttp:\n  addr: {self.host}\n")
    self._process = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      try:
        with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2):
          return self
      except OSError:
        pass
      time.sleep(0.2)
    self.close()
    raise AssertionError(f"docker-registry did not answer on {self.host}")

  def close(self) -> None:
    if self._process is not None and self._process.poll() is None:
      self._process.terminate()
      self._process.wait(timeout=10)
    self._dir.cleanup()
