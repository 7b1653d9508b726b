"""Training as a library: `build` a job from a config (and objects), `run` it in a workdir.

`train_and_evaluate(config, workdir, model=..., dataset=..., task=..., hooks=...)` runs
the whole job: init processes -> load and check data -> build mesh, model, task,
optimiser and state (`build`) -> restore the newest committed checkpoint (if any) ->
the step loop with its hooks (`loop.py`) -> final eval report, plot, summary (`run`).
Every component comes from the registry (`registry.py`): the config names it, or the
caller passes the object itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer import checkpoint
from trainer import compile_cache
from trainer import data
from trainer import distributed
from trainer import lease
from trainer import loop as loop_lib
from trainer import models
from trainer import optimizers
from trainer import parallel
from trainer import plotting
from trainer import preemption
from trainer import profiling
from trainer import report
from trainer import runinfo
from trainer import storage
from trainer import tasks
from trainer import writers
from trainer.errors import Preempted, StorageError, UserError
from trainer.loop import Loop

make_optimizer = optimizers.make


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # dropout keys are fold_in(rng, step): resume draws the same ones
  ema_params: Any = None  # exponential moving average of params; None when off
  model_state: Any = None  # mutable collections, e.g. BatchNorm's batch_stats; None if none


def create_train_state(rng, *, model: models.Model, tx, example_x,
                       ema: bool = False) -> TrainState:
  """A fresh state, the model initialised on an example input (only its shape matters)."""
  init_rng, state_rng = jax.random.split(rng)
  params, model_state = model.init(init_rng, jnp.asarray(example_x))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                    model_state=model_state)


def _seeded(init, seed):
  """(fn, arg) with `fn(arg) == init(jax.random.PRNGKey(seed))`.

  A seed below 2**31 (any config's, in practice) becomes its key inside the
  compiled init: made eagerly, the key costs two compilations of its own.
  """
  if seed < 2**31:
    def create_train_state_from_seed(s):
      return init(jax.random.PRNGKey(s))
    return create_train_state_from_seed, np.int32(seed)
  return init, jax.random.PRNGKey(seed)


def _l2(params, mask) -> jax.Array:
  leaves = jax.tree.leaves(params)
  keep = jax.tree.leaves(mask(params))
  return sum((jnp.sum(p * p) for p, m in zip(leaves, keep) if m), jnp.zeros(()))


def train_step(state: TrainState, batch, *, model, task, tx, schedule, l2: float = 0.0,
               mask=optimizers.matrices, accum_steps: int = 1, ema_decay: float = 0.0,
               axis_name=None):
  """One optimiser step. Pure: no logging, no host transfers, no value-dependent branches.

  The task gives the loss and metrics; `l2 * 0.5 * sum(w**2)` over the leaves `mask`
  selects is added when the optimiser does not decay weights itself. Dropout keys are
  `fold_in(state.rng, step)` (and the micro-batch), so a resumed run draws the same
  ones. With `accum_steps = k > 1` the batch is cut into k equal micro-batches whose
  gradients are averaged in a `lax.scan` (mutable model state, e.g. batch statistics,
  is threaded through them). A non-finite loss or gradient leaves params, optimiser
  state, model state and EMA unchanged (a select, not a multiply: 0 * NaN is NaN) and
  reports `finite = 0`. Under `pmap` and `shard_map` (`axis_name` set), gradients,
  metrics and model state are averaged with one `lax.pmean` over `axis_name`; under
  `jit` the sharding makes XLA do the same.
  """
  step_rng = jax.random.fold_in(state.rng, state.step)
  if axis_name is not None:  # pmap, shard_map: each device's examples get their own masks
    step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))

  def loss_fn(params, model_state, micro, rng):
    outputs, new_model_state = model.apply(params, model_state, micro["x"], train=True,
                                           rng=rng)
    loss, metrics = task.loss(outputs, micro)
    if l2:
      loss = loss + 0.5 * l2 * _l2(params, mask)
    return loss, (metrics, new_model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, (metrics, model_state)), grads = grad_fn(state.params, state.model_state, batch,
                                                    step_rng)
  else:
    # Micro-batch j holds rows j, j + k, j + 2k, ...: every device keeps its own rows.
    micro = jax.tree.map(lambda a: a.reshape((-1, accum_steps) + a.shape[1:]).swapaxes(0, 1),
                         batch)
    rngs = jax.random.split(step_rng, accum_steps)

    def accumulate(carry, one):
      totals, model_state = carry
      (l, (m, model_state)), g = grad_fn(state.params, model_state, *one)
      return (jax.tree.map(jnp.add, totals, (l, m, g)), model_state), None

    first = jax.tree.map(lambda a: a[0], micro)
    shapes = jax.eval_shape(grad_fn, state.params, state.model_state, first, rngs[0])
    (l_shape, (m_shape, _)), g_shape = shapes
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (l_shape, m_shape, g_shape))
    (totals, model_state), _ = jax.lax.scan(accumulate, (zeros, state.model_state),
                                            (micro, rngs))
    loss, metrics, grads = jax.tree.map(lambda t: t / accum_steps, totals)
  if axis_name is not None:
    grads, loss, metrics, model_state = jax.lax.pmean((grads, loss, metrics, model_state),
                                                      axis_name)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_ema = state.ema_params
  if new_ema is not None:
    new_ema = keep(optax.incremental_update(new_params, new_ema, 1.0 - ema_decay), new_ema)
  new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                            opt_state=keep(new_opt_state, state.opt_state), ema_params=new_ema,
                            model_state=keep(model_state, state.model_state))
  metrics = dict(loss=loss, **metrics, grad_norm=grad_norm, learning_rate=schedule(state.step),
                 finite=finite.astype(jnp.float32))
  return new_state, metrics


def eval_params(state: TrainState):
  """The parameters evaluation and prediction use: the EMA when it is kept."""
  return state.params if state.ema_params is None else state.ema_params


def _validate(config) -> None:
  seed = config.seed
  if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
    raise UserError(f"config.seed={seed!r}: expected an integer in [0, 2**32)")
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "grad_accum_steps"):
    value = config.train[key]
    if not isinstance(value, int) or value <= 0:
      raise UserError(f"config.train.{key}={value!r}: expected a positive integer")
  for key, zero in (("steps_per_dispatch", "auto"), ("prefetch", "off")):
    value = config.train[key]
    if not isinstance(value, int) or value < 0:
      raise UserError(f"config.train.{key}={value!r}: expected 0 ({zero}) or a positive"
                      " integer")
  if config.train.data_on_device not in ("auto", "on", "off"):
    raise UserError(f"config.train.data_on_device={config.train.data_on_device!r}: expected"
                    " auto, on or off")
  if not config.train.data_on_device_max_mb > 0:
    raise UserError(f"config.train.data_on_device_max_mb={config.train.data_on_device_max_mb}:"
                    " expected a positive number of MiB")
  if config.train.nonfinite_policy not in ("stop", "skip"):
    raise UserError(f"config.train.nonfinite_policy={config.train.nonfinite_policy!r}:"
                    " expected stop or skip")
  window = profiling.parse_steps(config.profile.steps)
  if window and window[0] >= config.train.steps:
    raise UserError(f"config.profile.steps={config.profile.steps!r} starts past the run's last"
                    f" step (config.train.steps={config.train.steps}); expected START below it")
  for section, key, lowest in (("optimizer", "learning_rate", 0),
                               ("optimizer", "weight_decay", 0),
                               ("optimizer", "momentum", 0),
                               ("train", "watchdog_timeout", 0),
                               ("train", "max_consecutive_skips", 1),
                               ("distributed", "initialization_timeout", 1),
                               ("distributed", "heartbeat_timeout", 1)):
    value = config[section].get(key, lowest)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        lowest <= value < float("inf")):
      raise UserError(f"config.{section}.{key}={value!r}: expected a finite number >= {lowest}")
  if config.optimizer.get("momentum", 0) >= 1:
    raise UserError(f"config.optimizer.momentum={config.optimizer.momentum}: expected a"
                    " value in [0, 1)")
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise UserError(f"config.train.ema_decay={config.train.ema_decay}: expected 0 (off) or a"
                    " value in (0, 1)")


def _check_memory(abstract_state) -> None:
  """Refuses a state that cannot fit: its shards on one device (on CPU: on every local
  device together, in this host's memory) against the memory there. Training needs more
  (gradients, activations); this only stops what would fail at the first allocation."""
  def shard_bytes(leaf) -> int:
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    return math.prod(shape) * getattr(leaf.dtype, "itemsize", 8)

  need = sum(shard_bytes(leaf) for leaf in jax.tree.leaves(abstract_state))
  limit, where = loop_lib.device_memory_bytes(), "one device's memory"
  if limit is None and jax.local_devices()[0].platform == "cpu":
    need *= jax.local_device_count()
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    where = "this host's memory"
  if limit and need > limit:
    raise UserError(f"the train state (parameters and optimiser state) needs"
                    f" {need / 2**30:.1f} GiB, more than {where} ({limit / 2**30:.1f} GiB);"
                    " expected a smaller config.model, or more devices with"
                    " config.parallel.fsdp")


def _check_sizes(params) -> None:
  """Refuses a model with an empty parameter (a layer of width 0): it would train, and
  then fail at its first checkpoint."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if 0 in leaf.shape:
      name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
      raise UserError(f"the model's parameter {name} has shape {tuple(leaf.shape)}, with no"
                      " elements; expected positive layer sizes in config.model (or the"
                      " data's feature count)")


@dataclasses.dataclass
class Job:
  """Everything a run needs besides its workdir: what `build` returns and `run` runs."""
  config: Any
  dataset: data.Dataset
  task: tasks.Task
  model: models.Model
  strategy: parallel.DataParallel
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: Any  # train_step with every keyword bound: (state, batch) -> (state, metrics)
  step_fn: Any  # train_step compiled by the strategy (donates the state)
  hooks: list = dataclasses.field(default_factory=list)
  # The initial state's shapes, dtypes and shardings, and the function that makes it.
  abstract_state: Any = None
  make_state: Any = dataclasses.field(default=None, repr=False)
  # Compiled multi-step functions and the split on the devices, made on first use.
  cache: dict = dataclasses.field(default_factory=dict, repr=False)
  _state: Any = dataclasses.field(default=None, init=False, repr=False)

  @property
  def state(self) -> TrainState:
    """The initial state, canonical (sharded by the strategy's rule), made on first use.

    `run` restores a checkpoint into `abstract_state` when there is one, so a resumed
    run never compiles or runs the initialiser.
    """
    if self._state is None and self.make_state is not None:
      traced = self.cache.pop("step_traced", None)  # set by `loop.precompile`'s thread
      if traced is not None:
        traced.wait()  # tracing the initialiser meanwhile would slow both traces down
      self._state = self.make_state()
    return self._state

  @state.setter
  def state(self, value: TrainState) -> None:
    self._state = value

  def steps_fn(self, on_device: bool):
    """`train_step` compiled to run several steps per call (`parallel.run_steps`)."""
    key = ("steps", on_device)
    if key not in self.cache:
      self.cache[key] = self.strategy.compile_steps(self.train_step, on_device)
    return self.cache[key]

  def device_split(self) -> dict:
    """The training split on every device (`strategy.put_split`), put there once."""
    if "split" not in self.cache:
      self.cache["split"] = self.strategy.put_split(self.dataset.in_memory_split())
    return self.cache["split"]

  def eval_variables(self, state) -> dict:
    """{"params": eval params, **model_state}: what `Model.eval_apply` takes."""
    return {"params": eval_params(state), **(state.model_state or {})}


def _as_model(model, config, num_outputs) -> models.Model:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if model is None:
    return models.create(config.model, num_outputs)
  if isinstance(model, models.Model):
    return model
  if isinstance(model, nn.Module):
    return models.Model(model)
  return models.create({**config.model, "name": model}, num_outputs)


def build(config, *, model=None, dataset=None, task=None, hooks=()) -> Job:
  """Data, task, model, strategy, optimiser, initial state and compiled step of a config.

  The initial state is made at the first use of `job.state` (a resumed `run` never
  makes it); its shapes and shardings are `job.abstract_state` at once.

  Args:
    config: the run's ml_collections config (schema: `trainer/configs/base.py`).
    model: instead of `config.model.name`: a `models.Model`, a flax Linen module, or a
      Linen/NNX class or factory (built with `config.model`'s other keys).
    dataset: instead of `config.data`: a `data.Dataset` (e.g. `data.from_sources(...)`).
    task: instead of `config.task`: a `tasks.Task` instance or class, or a name.
    hooks: extra `hooks.Hook`s, run after the built-in ones.

  Raises:
    UserError: bad config or data; nothing is written.

  In a multi-process program call `distributed.initialize(config)` first (as
  `train_and_evaluate` does).
  """
  _validate(config)
  compile_cache.enable()
  dataset = dataset if dataset is not None else data.load(config)
  if config.train.data_on_device == "on" and dataset.in_memory_split() is None:
    raise UserError("config.train.data_on_device=on: this data set's training split is not"
                    " in host memory (a random-access source or a token file); expected auto"
                    " or off")
  task = tasks.resolve(config if task is None else {"task": task}, dataset)
  strategy = parallel.create(config)
  strategy.check_batch_size(config.train.batch_size)
  accum = config.train.grad_accum_steps
  if accum > 1:
    if config.train.batch_size % accum:
      raise UserError(f"config.train.batch_size={config.train.batch_size} must be a multiple of"
                      f" config.train.grad_accum_steps={accum}")
    strategy.check_batch_size(config.train.batch_size // accum,
                              "config.train.batch_size / grad_accum_steps")
  what = (f"config.model.name={config.model.name!r}" if model is None
          else f"the model {getattr(model, '__name__', type(model).__name__)}")
  model = _as_model(model, config, task.num_outputs(dataset))
  tx, schedule = optimizers.make(config)
  l2 = 0.0 if optimizers.decoupled(config) else float(config.optimizer.weight_decay)
  example = dataset.train_batch(np.arange(1))  # one training example, labels included
  init = functools.partial(create_train_state, model=model, tx=tx,
                           example_x=example["x"], ema=config.train.ema_decay > 0)
  init, seed = _seeded(init, config.seed)
  try:
    abstract_state = strategy.plan_state(init, seed)
    _check_sizes(abstract_state.params)
    _check_memory(abstract_state)
    outputs = jax.eval_shape(model.eval_apply, {"params": eval_params(abstract_state),
                                                **(abstract_state.model_state or {})},
                             example["x"])
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Most often a model that does not fit the data (a CNN on table rows, a negative
    # width); `--verbosity=1` prints the traceback.
    raise UserError(f"{what} could not be initialised and applied on examples of shape"
                    f" {tuple(example['x'].shape)} {example['x'].dtype}:"
                    f" {type(e).__name__}: {storage.one_line(e)}") from e
  task.check_outputs(outputs, example, dataset)
  step = functools.partial(train_step, model=model, task=task, tx=tx, schedule=schedule, l2=l2,
                           mask=optimizers.weight_decay_mask(config),
                           accum_steps=accum, ema_decay=config.train.ema_decay)
  job = Job(config, dataset, task, model, strategy, tx, schedule, step,
            strategy.compile_step(step), list(hooks), abstract_state,
            functools.partial(strategy.init_state, init, seed, planned=True))
  # The first dispatch's function compiles on another thread meanwhile.
  loop_lib.precompile(job, abstract_state)
  return job


def train_and_evaluate(config, workdir: str | None = None, allow_config_change: bool = False,
                       *, model=None, dataset=None, task=None, hooks=()) -> dict:
  """Trains and evaluates what the config (and the objects passed) describe.

  Args:
    config: the run's ml_collections config (schema: `trainer/configs/base.py`).
    workdir: local path or gs:// URL; None picks runs/<config.name>-<UTC time>.
    allow_config_change: resume a workdir whose recorded config differs in fields that
      change the computed parameters (e.g. more steps).
    model, dataset, task, hooks: objects instead of config names; see `build`.

  Returns:
    summary.json's dict.

  Raises:
    UserError: bad config or data (nothing written); Preempted: SIGTERM, checkpoint
    committed; Diverged: non-finite loss or gradient under the `stop` policy.
  """
  start_time = time.time()
  _validate(config)  # (`build` validates too; the processes have not met yet here)
  if workdir:
    storage.absolute(workdir)  # a URL of another scheme is refused before any compilation
    if not storage.is_remote(workdir):
      # So is a local workdir's corrupt run.json or changed config. `run` checks again
      # under the workdir's lease, and a bucket only after its access check.
      runinfo.check_resume_config(workdir, config, allow_config_change)
  distributed.initialize(config)
  if jax.process_count() > 1 and preemption.requested_before_start():
    raise Preempted("preempted during start-up, before any step: nothing new to save")
  watcher = preemption.Watcher()
  # Modules the run needs later load in the background while data loads and compiles,
  # in the order they are needed; matplotlib in a process of its own (`trainer.plotting`).
  main = jax.process_index() == 0  # the process that logs and plots
  if main:
    plotting.start()
  report.preload(checkpoint.import_orbax, *([writers.preload_tensorboard] if main else []))
  try:
    job = build(config, model=model, dataset=dataset, task=task, hooks=hooks)
    return run(job, workdir, allow_config_change, watcher=watcher, start_time=start_time)
  finally:
    watcher.close()


def run(job: Job, workdir: str | None, allow_config_change: bool = False, *,
        watcher: preemption.Watcher | None = None, start_time: float | None = None) -> dict:
  """Runs a built job in `workdir` (resuming its newest committed checkpoint).

  The run holds the workdir's lease (`trainer/lease.py`) from before its first write to
  its end, whatever the end: a second run of the same workdir meanwhile is refused. A job
  runs once: its first step donates `job.state` to the compiled step; `build` another.
  """
  if jax.process_index() == 0:
    plotting.start()  # matplotlib loads in its own process while the run trains
  workdir = storage.absolute(workdir or runinfo.default_workdir(job.config.name))
  # A local workdir this run creates is removed again when bad input ends the run before
  # anything is written into it (e.g. W&B without its key): only an empty folder goes.
  new = not storage.is_remote(workdir) and not os.path.lexists(workdir)
  writer = lease.Lease()
  try:
    try:
      return _run(job, workdir, allow_config_change, writer, watcher, start_time)
    finally:
      writer.release()
  except UserError:
    if new and jax.process_index() == 0:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)
    raise


def _run(job, workdir, allow_config_change, writer, watcher, start_time) -> dict:
  start_time = time.time() if start_time is None else start_time
  config, dataset, strategy = job.config, job.dataset, job.strategy
  profiling.start_server(config.profile.server_port)
  distributed.check_agreement(config.to_json_best_effort())
  # Writability first: on a bucket without access, reading run.json would fail less clearly.
  storage.check_writable(workdir)
  writer.acquire(workdir)  # One writer per workdir: exit 2 while another run holds it.
  runinfo.check_resume_config(workdir, config, allow_config_change)

  # Nothing has been written so far: every bad-input error above leaves no trace.
  ckpt = checkpoint.Checkpointer(storage.path(workdir) / "checkpoints",
                                 save_every=config.train.checkpoint_every,
                                 keep=config.train.keep_checkpoints)
  target = (job.abstract_state if job.abstract_state is not None
            else checkpoint.abstract(job.state))
  restored, start_step = ckpt.restore_latest(target)
  state = restored if restored is not None else job.state
  is_main = jax.process_index() == 0
  reporter = report.Reporter(workdir if is_main else None, start_step, config)
  record = runinfo.RunRecord(workdir if is_main else None, config, strategy, start_step)
  record.note(lease_taken_over=writer.takeover, checkpoint_events=ckpt.events)
  # What prediction needs besides the parameters (trainer/predict.py).
  reporter.write_json("data_stats.json", {**dataset.stats, "features": dataset.feature_names,
                                          "classes": dataset.class_names,
                                          "task": job.task.name})
  own_watcher = watcher is None
  watcher = preemption.Watcher() if own_watcher else watcher
  loop = Loop(job, ckpt, reporter, hooks=job.hooks)
  failed = None  # the run's error, if it fails
  try:
    state = loop.run(job.step_fn, strategy.to_device(state), start_step, watcher)
    # The final evaluation, report and plot run while the last save commits.
    metrics = _final_report(job, state, reporter, loop)
    ckpt.close()  # A failed last save is recorded in run.json like any other failure.
    reporter.write_plot()  # drawn meanwhile by the plotter process
    summary = _summary(job, state, reporter, loop, metrics, time.time() - start_time)
  except BaseException as e:
    failed = e
    error = _save_failure_behind(e, ckpt)
    _record_failure(record, error)
    if error is not e:
      raise error from e
    raise
  finally:
    closers = [loop.watchdog.close, ckpt.close, reporter.close]
    _close_all(closers + ([watcher.close] if own_watcher else []), reraise=failed is None,
               failure=failed)
  record.finish(0, "completed")
  return summary


def _record_failure(record, error: BaseException) -> None:
  """Writes the failed run's exit code and reason into run.json. On a full disk or a lost
  bucket even that write may fail: then the run's own error still is the one reported."""
  _close_all([functools.partial(record.finish, getattr(error, "exit_code", 1),
                                f"{type(error).__name__}: {error}")],
             reraise=False, failure=error)


def _save_failure_behind(error: BaseException, ckpt) -> BaseException:
  """The failure of the checkpoint save in flight, when `error` is a storage failure too.

  A save that fills the disk (or loses the bucket) in the background makes the next
  write of anything else fail as well, often before the save reports. The save's
  failure is the one the user needs: it names the step lost and the last committed one.
  """
  if isinstance(error, StorageError) or not storage.is_storage_error(error):
    return error
  try:
    ckpt.close()  # waits for the save in flight
  except StorageError as save_error:
    return save_error
  except Exception:  # pylint: disable=broad-except
    pass  # not a storage failure of the save: the run's own error stands
  return error


def _close_all(closers, *, reraise: bool, failure: BaseException | None = None) -> None:
  """Calls every closer. Their first error is raised after all ran, unless the run already
  failed (`failure`): then the run's own error (its exit code and run.json reason) is the
  one that counts, and a closer's is a warning, or only logged at debug level when both
  are storage failures (the same full disk or lost bucket, already on stderr)."""
  first = None
  for close in closers:
    try:
      close()
    except Exception as e:  # pylint: disable=broad-except
      first = first or e
  if first is not None and reraise:
    raise first
  if first is not None:
    same = all(isinstance(x, StorageError) or storage.is_storage_error(x)
               for x in (first, failure))
    logging.getLogger(__name__).log(logging.DEBUG if same else logging.WARNING,
                                    "after the failed run, closing also failed: %s", first)


def _final_report(job, state, reporter, loop) -> dict:
  """The final evaluation: eval/report.*, eval/history.json and plots/history.png."""
  config = job.config
  metrics = job.task.report(job.strategy, job.model, job.eval_variables(state), job.dataset,
                            reporter)
  loop.eval_rows.append({"step": int(config.train.steps), **metrics})
  reporter.write_json("eval/history.json", loop.eval_rows)
  reporter.plot_history(loop.eval_rows, metric=job.task.history_metric)
  return metrics


def _summary(job, state, reporter, loop, metrics, wall_time) -> dict:
  """summary.json and the `done:` line, once everything else is written and committed."""
  config = job.config
  summary = {
      "config": config.name,
      "final_step": int(config.train.steps),
      "eval": {**metrics, "num_examples": int(len(job.dataset.test_y))},
      "train_loss": loop.last_metrics.get("loss"),
      "train_accuracy": loop.last_metrics.get("accuracy"),
      "train_metrics": loop.last_metrics,
      "params_sha256": report.fingerprint(state.params),
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "strategy": job.strategy.name,
      "wall_time_s": round(wall_time, 3),
      "examples_per_second": loop.examples_per_second(),
      "skipped_steps": loop.skipped_steps,
      "steps_per_dispatch": loop.steps_per_dispatch or 1,  # (auto still probing: 1)
      "data_on_device": loop.data_on_device,
      "resumed_from_step": loop.start_step,
  }
  if state.model_state is not None:
    summary["model_state_sha256"] = report.fingerprint(state.model_state)
  reporter.write_json("summary.json", summary)
  if reporter.active:
    print(f"done: step {summary['final_step']} {job.task.describe(metrics)}"
          f" -> {reporter.workdir}", flush=True)
  return summary
