"""The process contract of DESIGN.md section 4, and `jax.distributed.initialize`.

Three cases, decided from the environment only:

1. `JAX_COORDINATOR_ADDRESS` is set: explicit multi-process run (Kubernetes, the local
   rehearsal). `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are required, because JAX never
   reads them itself; they are passed to `initialize` explicitly.
2. A Cloud TPU VM (libtpu installed and TPU chips visible): `initialize()` with no
   arguments, and JAX finds the other workers through the VM metadata.
3. Anything else: one process, no initialisation.

`JAXJOB_DEVICES_PER_PROCESS` (CPU rehearsal only) sets the number of virtual CPU devices.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os

import jax

from trainer.errors import UserError

_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@dataclasses.dataclass(frozen=True)
class ProcessEnv:
  coordinator_address: str | None
  num_processes: int
  process_id: int
  devices_per_process: int | None


def read_env(environ=os.environ) -> ProcessEnv:
  """Parses and checks the process variables. Raises UserError on a bad value."""
  devices = _int_var(environ, "JAXJOB_DEVICES_PER_PROCESS", minimum=1)
  address = environ.get("JAX_COORDINATOR_ADDRESS") or None
  if address is None:
    return ProcessEnv(None, 1, 0, devices)
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
    raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r}: expected host:port, with a port"
                    " from 1 to 65535")
  num = _int_var(environ, "JAX_NUM_PROCESSES", minimum=1)
  rank = _int_var(environ, "JAX_PROCESS_ID", minimum=0)
  if num is None or rank is None:
    raise UserError("JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and"
                    " JAX_PROCESS_ID are required too")
  if rank >= num:
    raise UserError(f"JAX_PROCESS_ID={rank} must be below JAX_NUM_PROCESSES={num}")
  return ProcessEnv(address, num, rank, devices)


def _int_var(environ, name: str, minimum: int) -> int | None:
  value = environ.get(name)
  if value in (None, ""):
    return None
  try:
    number = int(value)
  except ValueError:
    number = minimum - 1
  if number < minimum:
    raise UserError(f"{name}={value!r}: expected an integer >= {minimum}")
  return number


def on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM: libtpu is installed and TPU chips are visible."""
  has_chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(has_chips) and importlib.util.find_spec("libtpu") is not None


def initialize(config) -> ProcessEnv:
  """Configures devices and joins the job. Call before anything touches a JAX backend."""
  env = read_env()
  if env.devices_per_process is not None:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", env.devices_per_process)
  timeouts = dict(
      initialization_timeout=int(config.distributed.initialization_timeout),
      heartbeat_timeout_seconds=int(config.distributed.heartbeat_timeout),
  )
  if env.coordinator_address is not None:
    kwargs = dict(
        coordinator_address=env.coordinator_address,
        num_processes=env.num_processes,
        process_id=env.process_id,
        **timeouts,
    )
    host = env.coordinator_address.rpartition(":")[0]
    if host in _LOOPBACK:
      # The coordinator binds to every interface by default; a local rehearsal
      # must stay on loopback.
      kwargs["coordinator_bind_address"] = env.coordinator_address
    jax.distributed.initialize(**kwargs)
  elif on_cloud_tpu_vm():
    jax.distributed.initialize(**timeouts)
  return env


def check_agreement(config_json: str) -> None:
  """Every process must run the same jax/jaxlib, device count and config.

  Compared once at start-up with one all-gather, so a mismatched process is an exit-2
  error naming it instead of a hang or a silent divergence later.

  Raises:
    UserError: naming each process that differs from process 0, and in what.
  """
  if jax.process_count() == 1:
    return
  import hashlib  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  items = {"jax version": jax.__version__, "jaxlib version": jaxlib.__version__,
           "local device count": str(jax.local_device_count()), "config": config_json}
  mine = np.array([int(hashlib.sha256(v.encode()).hexdigest()[:7], 16)
                   for v in items.values()], np.int32)
  table = np.asarray(multihost_utils.process_allgather(mine))
  odd = []
  for rank in range(1, table.shape[0]):
    fields = [name for name, a, b in zip(items, table[rank], table[0]) if a != b]
    if fields:
      odd.append(f"process {rank} ({', '.join(fields)})")
  if odd:
    raise UserError(f"processes disagree with process 0: {'; '.join(odd)}; every process"
                    " must run the same image and config")
