"""Mesh and shardings: the only module that decides where arrays live.

The mesh is 2-D, `data` x `fsdp` (sizes from `config.parallel`, -1 = the rest of the
devices). Every batch is split over both axes (each device gets its own examples). The
train state (parameters and optimiser state) follows one rule, `state_spec` below: an
array with a dimension divisible by the `fsdp` size is split along its largest such
dimension over `fsdp`, anything else is replicated. With `fsdp=1` (the default) that is
plain data parallelism: a replicated state and one gradient all-reduce that XLA inserts.
With `fsdp>1` XLA gathers each layer's parameters where they are used and reduce-scatters
the gradients (ZeRO-3 style), so the state takes 1/fsdp of the memory per device.

Three strategies share this interface and give the same results (`create`'s `auto`,
the default, picks `shard_map` when `fsdp` is 1 and `sharding` otherwise):

* `sharding`: `jax.jit` with the shardings above; XLA's SPMD partitioner inserts the
  collectives. The only one that shards the state (`fsdp>1`).
* `shard_map`: `jax.jit` of `jax.shard_map` over the same mesh: each device runs the
  step on its rows and `train.train_step` averages gradients and metrics with one
  explicit `lax.pmean`; data parallel only (`fsdp=1`).
* `pmap`: `jax.pmap` over this process's devices with the same explicit `lax.pmean`;
  data parallel only. Kept for users who ask for it by name: JAX has it in maintenance
  mode and points to `shard_map`.

The "canonical" state is the `sharding` layout (global `jax.Array`s with the rule's
shardings). Checkpoints, evaluation and fingerprints use it, so every strategy shares
them, and a checkpoint restores onto any other mesh shape.

Several steps per dispatch (`compile_steps`): one compiled call runs up to `capacity`
optimiser steps in a `lax.fori_loop` over stacked inputs, either K host-fed batches or,
for a training split held on the devices (`put_split`, replicated on every device), K
rows of example indices that each step gathers on device. The step inside the loop is
the same `train_step`, so the parameters are bit-identical to one step per dispatch
(`tests/test_dispatch.py`); the trip count is an argument, so one executable serves
every chunk length up to its capacity.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from trainer.errors import UserError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """Resolves -1 in (data, fsdp) and checks the product. Raises UserError."""
  sizes = [int(data), int(fsdp)]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"config.parallel.data={data}, fsdp={fsdp}: expected positive sizes,"
                    " at most one of them -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise UserError(f"config.parallel.data x fsdp = {data} x {fsdp} does not divide the"
                    f" {num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise UserError(f"config.parallel.data x fsdp = {sizes[0]} x {sizes[1]} must equal the"
                    f" {num_devices} devices")
  return sizes[0], sizes[1]


def state_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """The sharding rule for every leaf of the train state (params and optimiser state)."""
  if fsdp == 1:
    return P()
  candidates = [d for d in range(len(shape)) if shape[d] % fsdp == 0 and shape[d] >= fsdp]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda d: (shape[d], -d))
  return P(*[FSDP_AXIS if d == dim else None for d in range(len(shape))])


def run_steps(step_fn, state, xs, n, data, constrain=lambda batch: batch):
  """Runs the first `n` of the stacked steps `xs` (leading axis: the capacity).

  `xs`: a batch dict with a leading step axis, or (when `data` holds the training split)
  an int32 [capacity, B] array of row indices into it. Returns the state and every
  metric stacked over the capacity (rows past `n` are zeros).
  """
  capacity = jax.tree.leaves(xs)[0].shape[0]

  def batch_at(i):
    x = jax.tree.map(lambda a: a[i], xs)
    return constrain(jax.tree.map(lambda a: a[x], data) if data else x)

  # Traced once: the loop body's call finds the trace that gave the metrics' shapes in
  # jit's cache (the same argument types), and XLA inlines the nested call.
  step_fn = jax.jit(step_fn)
  shapes = jax.eval_shape(step_fn, state, batch_at(0))[1]
  rows = jax.tree.map(lambda s: jnp.zeros((capacity,) + s.shape, s.dtype), shapes)

  def one(i, carry):
    state, rows = carry
    state, metrics = step_fn(state, batch_at(i))
    return state, jax.tree.map(lambda r, m: r.at[i].set(m), rows, metrics)

  return jax.lax.fori_loop(0, n, one, (state, rows))


class DataParallel:
  """jit + NamedSharding over the (`data`, `fsdp`) mesh."""

  name = "sharding"
  precompiles = True  # `loop.precompile` can predict the first dispatch's arguments

  def __init__(self, data: int = -1, fsdp: int = 1):
    data, fsdp = mesh_shape(data, fsdp, jax.device_count())
    # make_mesh orders TPU devices by their physical torus, so the inner (fsdp) axis
    # runs between neighbours; on CPU and GPU it keeps jax.devices()'s order. Auto axes
    # (the jit + NamedSharding semantics this module is written for), not the Explicit
    # default of recent JAX. Each process's batch rows go to its own devices wherever
    # the mesh puts them (`make_array_from_process_local_data`).
    self.mesh = jax.make_mesh((data, fsdp), BATCH_AXES,
                              axis_types=(AxisType.Auto,) * len(BATCH_AXES))
    self.fsdp = fsdp
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(BATCH_AXES))
    self.steps_sharding = NamedSharding(self.mesh, P(None, BATCH_AXES))  # [K, B, ...]
    self.state_shardings = None  # set by init_state

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def check_batch_size(self, batch_size: int, what: str = "config.train.batch_size") -> None:
    if batch_size <= 0 or batch_size % self.num_devices:
      raise UserError(f"{what}={batch_size} must be a positive multiple of the device count"
                      f" ({self.num_devices} = {jax.process_count()} process(es) x"
                      f" {jax.local_device_count()} device(s))")

  def shardings_for(self, abstract_tree):
    return jax.tree.map(lambda x: NamedSharding(self.mesh, state_spec(x.shape, self.fsdp)),
                        abstract_tree)

  def plan_state(self, init_fn, *args):
    """What `init_state(init_fn, *args)` will return, as ShapeDtypeStructs with their
    shardings (by the rule), without running it; `init_state` then uses these shardings."""
    abstract = jax.eval_shape(init_fn, *args)
    self.state_shardings = self.shardings_for(abstract)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                                          weak_type=a.weak_type),
                        abstract, self.state_shardings)

  def init_state(self, init_fn, *args, planned: bool = False):
    """Runs `init_fn(*args)` with its outputs created already sharded by the rule.

    `planned`: `plan_state(init_fn, *args)` ran last, so its shardings stand.
    """
    if not planned:
      self.plan_state(init_fn, *args)
    return jax.jit(init_fn, out_shardings=self.state_shardings)(*args)

  def batch(self, local: dict[str, np.ndarray], global_size: int) -> dict[str, jax.Array]:
    """Assembles per-process slices into global arrays split over every device."""
    if jax.process_count() == 1:
      # One transfer for the whole batch: a fraction of the per-array assembly cost.
      return jax.device_put(local, self.batch_sharding)
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, v, (global_size,) + v.shape[1:]) for k, v in local.items()}

  def steps_input(self, local: dict[str, np.ndarray], global_size: int) -> dict:
    """`batch` for arrays with a leading step axis: [K, B_local, ...] -> [K, B, ...]."""
    if jax.process_count() == 1:
      return jax.device_put(local, self.steps_sharding)
    return {k: jax.make_array_from_process_local_data(
        self.steps_sharding, v, (v.shape[0], global_size) + v.shape[2:])
            for k, v in local.items()}

  def steps_count(self, n: int):
    """The trip count `n` of `compile_steps` as a (replicated) device scalar."""
    return jax.make_array_from_process_local_data(self.replicated, np.int32(n), ())

  def put_split(self, arrays: dict[str, np.ndarray]) -> dict:
    """The whole training split on every device (each process passes all of it)."""
    return {k: jax.make_array_from_process_local_data(self.replicated, v, v.shape)
            for k, v in arrays.items()}

  def compile_step(self, step_fn):
    # Donating the state lets XLA update parameters in place.
    return jax.jit(step_fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def compile_steps(self, step_fn, on_device: bool):
    """(state, xs, n, data) -> (state, stacked metrics): `run_steps` compiled."""
    constrain = lambda b: jax.lax.with_sharding_constraint(b, self.batch_sharding)
    fn = functools.partial(run_steps, step_fn, constrain=constrain)
    data = self.replicated if on_device else None
    return jax.jit(fn, in_shardings=(self.state_shardings, self.steps_sharding,
                                     self.replicated, data),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def to_device(self, state):
    return state

  def to_canonical(self, state):
    return state

  def read_metrics(self, metrics) -> dict[str, float]:
    # np.asarray per scalar is several times cheaper than jax.device_get of the dict.
    return {k: float(np.asarray(v)) for k, v in metrics.items()}

  def read_metric_rows(self, metrics, n: int) -> list[dict[str, float]]:
    """The first `n` rows of `compile_steps`' stacked metrics."""
    columns = {k: np.asarray(v)[:n].tolist() for k, v in metrics.items()}
    return [{k: float(c[i]) for k, c in columns.items()} for i in range(n)]

  def predict(self, apply_fn, params, x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Logits for every row of `x` (the same on every process), sharded over devices.

    Every strategy evaluates the canonical state with jit, so `predict` always uses
    the global-array batch layout.
    """
    fn = self._compiled_apply(apply_fn)
    n, step = x.shape[0], self._predict_rows(x.shape[0], chunk)
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

  def compile_predict(self, apply_fn, params, x: np.ndarray,
                      chunk: int = 8192) -> jax.ShapeDtypeStruct:
    """Compiles what `predict(apply_fn, params, x, chunk)` runs, from the shapes, types and
    shardings of `params` (`jax.ShapeDtypeStruct` leaves will do); returns the type of
    `predict`'s result."""
    step = self._predict_rows(x.shape[0], chunk)
    batch = jax.ShapeDtypeStruct((step,) + x.shape[1:], x.dtype, sharding=self.batch_sharding)
    out = self._compiled_apply(apply_fn).lower(params, batch).compile().out_info
    return jax.ShapeDtypeStruct((x.shape[0],) + out.shape[1:], out.dtype)

  def _predict_rows(self, n: int, chunk: int) -> int:
    """The rows of each call of `predict`: a multiple of the device count."""
    return self.num_devices * math.ceil(min(max(n, 1), chunk) / self.num_devices)

  @functools.lru_cache(maxsize=4)
  def _compiled_apply(self, apply_fn):
    # Input shardings come from the (committed) arguments: the state's, whatever they are.
    return jax.jit(apply_fn, out_shardings=self.batch_sharding)


class ShardMap(DataParallel):
  """jit of jax.shard_map: manual data parallelism with the step's explicit lax.pmean.

  Batches, state layout, checkpoints and evaluation are `DataParallel`'s; only the step
  differs. The state is replicated (`fsdp=1`), each device computes the gradients of its
  rows, and `train.train_step(axis_name=...)` averages them with one `lax.pmean`, the
  code path `pmap` uses.
  """

  name = "shard_map"

  def __init__(self, data: int = -1, fsdp: int = 1):
    super().__init__(data, fsdp)
    if self.fsdp != 1:
      raise UserError("config.parallel.strategy=shard_map is data parallel only: expected"
                      f" config.parallel.fsdp=1, got {fsdp}")

  def compile_step(self, step_fn):
    # check_vma=False: with the default (True), autodiff already sums the gradients of the
    # replicated parameters over the mesh, and the step's pmean would then count every
    # device's gradient once per device (8x on 8 devices). Without it, gradients are
    # per-device as under pmap, and the pmean makes the outputs replicated (out_specs).
    fn = jax.shard_map(functools.partial(step_fn, axis_name=BATCH_AXES), mesh=self.mesh,
                       in_specs=(P(), P(BATCH_AXES)), out_specs=P(), check_vma=False)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.batch_sharding),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)

  def compile_steps(self, step_fn, on_device: bool):
    body = functools.partial(run_steps, functools.partial(step_fn, axis_name=BATCH_AXES))
    data = P() if on_device else None
    fn = jax.shard_map(body, mesh=self.mesh, in_specs=(P(), P(None, BATCH_AXES), P(), data),
                       out_specs=P(), check_vma=False)
    return jax.jit(fn, in_shardings=(self.state_shardings, self.steps_sharding,
                                     self.replicated, self.replicated if on_device else None),
                   out_shardings=(self.state_shardings, self.replicated), donate_argnums=0)


class Pmap(DataParallel):
  """jax.pmap over local devices; gradients averaged with an explicit lax.pmean."""

  name = "pmap"
  precompiles = False  # the first dispatch's state is `to_device`'s copies

  def __init__(self, data: int = -1, fsdp: int = 1):
    super().__init__(data, fsdp)
    if self.fsdp != 1:
      raise UserError("config.parallel.strategy=pmap is data parallel only: expected"
                      f" config.parallel.fsdp=1, got {fsdp}")

  def batch(self, local, global_size):
    n = jax.local_device_count()
    return {k: v.reshape((n, v.shape[0] // n) + v.shape[1:]) for k, v in local.items()}

  def steps_input(self, local, global_size):
    n = jax.local_device_count()  # [K, B_local, ...] -> [devices, K, B_local / devices, ...]
    return {k: v.reshape((v.shape[0], n, v.shape[1] // n) + v.shape[2:]).swapaxes(0, 1)
            for k, v in local.items()}

  def steps_count(self, n):
    return np.int32(n)  # pmap's inputs are host arrays (an unmapped argument)

  def put_split(self, arrays):
    n = jax.local_device_count()
    return jax.pmap(lambda tree: tree)({k: np.broadcast_to(v, (n,) + v.shape)
                                        for k, v in arrays.items()})

  def compile_step(self, step_fn):
    return jax.pmap(functools.partial(step_fn, axis_name=BATCH_AXES[0]),
                    axis_name=BATCH_AXES[0], donate_argnums=0)

  def compile_steps(self, step_fn, on_device: bool):
    del on_device  # the split, when given, is already one copy per device (put_split)
    body = functools.partial(run_steps, functools.partial(step_fn, axis_name=BATCH_AXES[0]))
    return jax.pmap(body, axis_name=BATCH_AXES[0], in_axes=(0, 0, None, 0),
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
    return {k: float(np.asarray(v)[0]) for k, v in metrics.items()}

  def read_metric_rows(self, metrics, n):
    return DataParallel.read_metric_rows(self, {k: v[0] for k, v in metrics.items()}, n)


def create(config) -> DataParallel:
  """The strategy `config.parallel` names, over every device of every process.

  `auto` (the default): `shard_map` for data parallelism (`fsdp` 1), `sharding` when the
  state is sharded. Both give the same parameters within 1e-5; on CPU the `shard_map`
  step measured 0.71-0.86x the `sharding` step (BENCHMARKS.md).
  """
  strategy, data, fsdp = config.parallel.strategy, config.parallel.data, config.parallel.fsdp
  if strategy == "auto":
    _, resolved_fsdp = mesh_shape(data, fsdp, jax.device_count())
    strategy = "shard_map" if resolved_fsdp == 1 else "sharding"
  if strategy == "sharding":
    return DataParallel(data, fsdp)
  if strategy == "shard_map":
    return ShardMap(data, fsdp)
  if strategy == "pmap":
    return Pmap(data, fsdp)
  raise UserError(f"config.parallel.strategy={strategy!r}: expected auto, sharding, shard_map"
                  " or pmap")
