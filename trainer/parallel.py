"""Mesh and shardings: the only module that decides where arrays live.

Two data-parallel strategies with the same interface and the same results:

* `sharding` (default): `jax.jit` over a 1-D `data` mesh of every device of every
  process; parameters and optimiser state are replicated (`P()`), batches are split
  along `data` (`P('data')`), and XLA inserts the gradient all-reduce.
* `pmap`: `jax.pmap` over this process's devices with an explicit `lax.pmean` of the
  gradients (in `train.train_step`), kept for comparison and for older code.

The "canonical" state is the `sharding` layout: a replicated global `jax.Array` per leaf.
Checkpoints, evaluation and fingerprints always use it, so both strategies share them.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from trainer.errors import UserError

DATA_AXIS = "data"


class DataParallel:
  """jit + NamedSharding over a `data` axis spanning all devices."""

  name = "sharding"

  def __init__(self):
    # jax.devices() is ordered by process, so process p's devices hold the p-th
    # contiguous block of every batch: the block its data loader reads.
    self.mesh = Mesh(np.asarray(jax.devices()), (DATA_AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def check_batch_size(self, batch_size: int, what: str = "config.train.batch_size") -> None:
    if batch_size <= 0 or batch_size % self.num_devices:
      raise UserError(f"{what}={batch_size} must be a positive multiple of the device count"
                      f" ({self.num_devices} = {jax.process_count()} process(es) x"
                      f" {jax.local_device_count()} device(s))")

  def init_state(self, init_fn, *args):
    """Runs `init_fn(*args)` with its outputs created replicated on the mesh."""
    return jax.jit(init_fn, out_shardings=self.replicated)(*args)

  def batch(self, local: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
    """Assembles per-process slices into global arrays split along `data`."""
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, v, (global_size,) + v.shape[1:]) for k, v in local.items()}

  def compile_step(self, step_fn):
    # Donating the state lets XLA update parameters in place.
    return jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=(self.replicated, self.replicated), donate_argnums=0)

  def to_device(self, state):
    return state

  def to_canonical(self, state):
    return state

  def read_metrics(self, metrics) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def predict(self, apply_fn, params, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Logits for every row of `x` (the same on every process), sharded over devices.

    Both strategies evaluate the canonical state with jit, so `predict` always uses
    the global-array batch layout.
    """
    fn = self._compiled_apply(apply_fn)
    n = x.shape[0]
    step = self.num_devices * math.ceil(min(max(n, 1), chunk) / self.num_devices)
    outputs = []
    for start in range(0, n, step):
      rows = x[start:start + step]
      padded = np.zeros((step,) + x.shape[1:], x.dtype)
      padded[:len(rows)] = rows
      per_process = step // jax.process_count()
      local = padded[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
      logits = fn(params, DataParallel.batch(self, {"x": local}, step)["x"])
      full = multihost_utils.process_allgather(logits, tiled=True)
      outputs.append(np.asarray(full)[:len(rows)])
    return np.concatenate(outputs, axis=0)

  @functools.lru_cache(maxsize=4)
  def _compiled_apply(self, apply_fn):
    return jax.jit(apply_fn, in_shardings=(self.replicated, self.batch_sharding),
                   out_shardings=self.batch_sharding)


class Pmap(DataParallel):
  """jax.pmap over local devices; gradients averaged with an explicit lax.pmean."""

  name = "pmap"

  def batch(self, local, global_size):
    n = jax.local_device_count()
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in local.items()}

  def compile_step(self, step_fn):
    return jax.pmap(functools.partial(step_fn, axis_name=DATA_AXIS), axis_name=DATA_AXIS,
                    donate_argnums=0)

  def to_device(self, state):
    n = jax.local_device_count()
    stacked = jax.tree.map(
        lambda leaf: np.broadcast_to(np.asarray(leaf.addressable_data(0)),
                                     (n,) + leaf.shape), state)
    # An identity pmap lays the copies out the way the step function expects them.
    return jax.pmap(lambda tree: tree)(stacked)

  def to_canonical(self, state):
    def first_replica(leaf):
      host = np.asarray(leaf.addressable_data(0)).reshape(leaf.shape[1:])
      return jax.make_array_from_process_local_data(self.replicated, host, host.shape)

    return jax.tree.map(first_replica, state)

  def read_metrics(self, metrics):
    return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}


def create(strategy: str) -> DataParallel:
  if strategy == "sharding":
    return DataParallel()
  if strategy == "pmap":
    return Pmap()
  raise UserError(f"config.parallel.strategy={strategy!r}: expected sharding or pmap")
