"""The training loop: a pure, jitted `train_step` and the periodic side effects around it.

`train_and_evaluate(config, workdir)` runs the whole job:
init processes -> load and check data -> build mesh, model, optimiser -> restore the
newest committed checkpoint (if any) -> loop {dispatch step t; read step t-1's metrics;
log / eval / checkpoint on their cadence} -> final eval, report, plot, summary.

Reading step t-1's metrics right after dispatching step t keeps at most two steps in
flight: the device never waits for the host, and XLA:CPU's in-process collectives are
never flooded with queued steps (which deadlocks them on small machines).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer import checkpoint
from trainer import data
from trainer import distributed
from trainer import faults
from trainer import lease
from trainer import models
from trainer import parallel
from trainer import preemption
from trainer import profiling
from trainer import report
from trainer import runinfo
from trainer import storage
from trainer import watchdog
from trainer.errors import Diverged, Preempted, UserError

log = logging.getLogger(__name__)


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema_params: Any = None  # exponential moving average of params; None when off


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax optimiser and learning-rate schedule the config names."""
  opt, steps = config.optimizer, int(config.train.steps)
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, decay_steps=steps)
  elif opt.schedule == "warmup_cosine":
    warmup = int(opt.warmup_steps)
    if not 0 <= warmup < steps:
      raise UserError(f"config.optimizer.warmup_steps={warmup}: expected 0 <= warmup <"
                      f" config.train.steps={steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps=steps)
  else:
    raise UserError(f"config.optimizer.schedule={opt.schedule!r}: expected constant, cosine"
                    " or warmup_cosine")
  if opt.name == "sgd":
    tx = optax.sgd(schedule, momentum=float(opt.momentum) or None)
  elif opt.name == "adam":
    tx = optax.adam(schedule)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=float(opt.weight_decay))
  else:
    raise UserError(f"config.optimizer.name={opt.name!r}: expected sgd, adam or adamw")
  clip = float(opt.grad_clip_norm)
  if clip < 0:
    raise UserError(f"config.optimizer.grad_clip_norm={clip}: expected >= 0 (0 = off)")
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule


def create_train_state(rng, *, model, tx, example_x=None, num_features: int | None = None,
                       ema: bool = False) -> TrainState:
  """A fresh state, the model initialised on an example input (only its shape matters).

  Args:
    rng: the PRNG key; split into the init key and the state's key.
    model: the flax module; tx: the optax optimiser.
    example_x: a batch of inputs, e.g. `dataset.train_x[:1]` (float features, or int32
      tokens for a language model).
    num_features: instead of `example_x`: a float32 `[1, num_features]` zero input.
    ema: keep an exponential moving average of the parameters.
  """
  init_rng, state_rng = jax.random.split(rng)
  if example_x is None:
    example_x = jnp.zeros((1, num_features), jnp.float32)
  params = model.init(init_rng, jnp.asarray(example_x))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng, ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def train_step(state: TrainState, batch, *, apply_fn, tx, schedule, l2: float,
               accum_steps: int = 1, ema_decay: float = 0.0, axis_name: str | None = None):
  """One optimiser step. Pure: no logging, no host transfers, no value-dependent branches.

  With `accum_steps = k > 1` the batch is cut into k equal micro-batches whose gradients
  are averaged in a `lax.scan` (the same update as the whole batch at once, with 1/k of
  the activation memory). A non-finite loss or gradient leaves params, optimiser state
  and EMA unchanged (a select, not a multiply: 0 * NaN is NaN) and reports `finite = 0`;
  the host decides whether that stops the run. Under `pmap`, gradients and metrics are
  averaged with one `lax.pmean` over `axis_name`; under `jit` the sharding makes XLA do
  the same.
  """

  def loss_fn(params, micro):
    logits = apply_fn({"params": params}, micro["x"])
    loss = models.loss_per_example(logits, micro["y"]).mean()
    if l2:
      kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
                 if jax.tree_util.keystr(path).endswith("['kernel']")]
      loss = loss + 0.5 * l2 * sum(jnp.sum(k * k) for k in kernels)
    accuracy = jnp.mean(models.predictions(logits) == micro["y"])
    return loss, accuracy

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, accuracy), grads = grad_fn(state.params, batch)
  else:
    # Micro-batch j holds rows j, j + k, j + 2k, ...: every device keeps its own rows.
    micro = jax.tree.map(lambda a: a.reshape((-1, accum_steps) + a.shape[1:]).swapaxes(0, 1),
                         batch)

    def accumulate(carry, one):
      (l, acc), g = grad_fn(state.params, one)
      return jax.tree.map(jnp.add, carry, (l, acc, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state.params))
    totals, _ = jax.lax.scan(accumulate, zeros, micro)
    loss, accuracy, grads = jax.tree.map(lambda t: t / accum_steps, totals)
  if axis_name is not None:
    grads, loss, accuracy = jax.lax.pmean((grads, loss, accuracy), axis_name)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_ema = state.ema_params
  if new_ema is not None:
    new_ema = keep(optax.incremental_update(new_params, new_ema, 1.0 - ema_decay), new_ema)
  new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                            opt_state=keep(new_opt_state, state.opt_state), ema_params=new_ema)
  metrics = dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm,
                 learning_rate=schedule(state.step), finite=finite.astype(jnp.float32))
  return new_state, metrics


def eval_params(state: TrainState):
  """The parameters evaluation and prediction use: the EMA when it is kept."""
  return state.params if state.ema_params is None else state.ema_params


def evaluate(strategy, apply_fn, params, x: np.ndarray, y: np.ndarray):
  """Held-out loss and accuracy, and the predicted class of every example."""
  logits = strategy.predict(apply_fn, {"params": params}, x)
  loss = float(np.mean(np.asarray(models.loss_per_example(jnp.asarray(logits), jnp.asarray(y)))))
  preds = np.asarray(models.predictions(jnp.asarray(logits)))
  return {"loss": loss, "accuracy": float(np.mean(preds == y))}, preds


def _validate(config) -> None:
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
              "grad_accum_steps"):
    value = config.train[key]
    if not isinstance(value, int) or value <= 0:
      raise UserError(f"config.train.{key}={value!r}: expected a positive integer")
  if config.train.nonfinite_policy not in ("stop", "skip"):
    raise UserError(f"config.train.nonfinite_policy={config.train.nonfinite_policy!r}:"
                    " expected stop or skip")
  profiling.parse_steps(config.profile.steps)
  if not 0.0 <= config.train.ema_decay < 1.0:
    raise UserError(f"config.train.ema_decay={config.train.ema_decay}: expected 0 (off) or a"
                    " value in (0, 1)")


def train_and_evaluate(config, workdir: str | None, allow_config_change: bool = False) -> dict:
  """Trains and evaluates the model the config describes; returns summary.json's dict.

  Args:
    config: the run's ml_collections config (schema: `trainer/configs/base.py`).
    workdir: local path or gs:// URL; None picks runs/<config.name>-<UTC time>.
    allow_config_change: resume a workdir whose recorded config differs in fields that
      change the computed parameters (e.g. more steps).

  Raises:
    UserError: bad config or data (nothing written); Preempted: SIGTERM, checkpoint
    committed; Diverged: non-finite loss or gradient under the `stop` policy.
  """
  start_time = time.time()
  distributed.initialize(config)
  if jax.process_count() > 1 and preemption.requested_before_start():
    raise Preempted("preempted during start-up, before any step: nothing new to save")
  watcher = preemption.Watcher()
  writer = lease.Lease()
  try:
    return _train_and_evaluate(config, workdir, allow_config_change, watcher, start_time,
                               writer)
  finally:
    writer.release()
    watcher.close()


def _train_and_evaluate(config, workdir, allow_config_change, watcher, start_time,
                        writer) -> dict:
  _validate(config)
  dataset = data.load(config)
  strategy = parallel.create(config)
  strategy.check_batch_size(config.train.batch_size)
  accum = config.train.grad_accum_steps
  if accum > 1:
    if config.train.batch_size % accum:
      raise UserError(f"config.train.batch_size={config.train.batch_size} must be a multiple of"
                      f" config.train.grad_accum_steps={accum}")
    strategy.check_batch_size(config.train.batch_size // accum,
                              "config.train.batch_size / grad_accum_steps")
  model = models.create(config, dataset.num_classes)
  tx, schedule = make_optimizer(config)
  workdir = storage.absolute(workdir or runinfo.default_workdir(config.name))
  distributed.check_agreement(config.to_json_best_effort())
  # Writability first: on a bucket without access, reading run.json would fail less clearly.
  storage.check_writable(workdir)
  writer.acquire(workdir)  # One writer per workdir: exit 2 while another run holds it.
  runinfo.check_resume_config(workdir, config, allow_config_change)
  l2 = float(config.optimizer.weight_decay) if config.optimizer.name != "adamw" else 0.0

  # Nothing has been written so far: every bad-input error above leaves no trace.
  init = functools.partial(create_train_state, model=model, tx=tx,
                           example_x=dataset.train_x[:1], ema=config.train.ema_decay > 0)
  state = strategy.init_state(init, jax.random.PRNGKey(config.seed))
  ckpt = checkpoint.Checkpointer(storage.path(workdir) / "checkpoints",
                                 save_every=config.train.checkpoint_every,
                                 keep=config.train.keep_checkpoints)
  restored, start_step = ckpt.restore_latest(checkpoint.abstract(state))
  state = restored if restored is not None else state
  is_main = jax.process_index() == 0
  reporter = report.Reporter(workdir if is_main else None, start_step)
  run = runinfo.RunRecord(workdir if is_main else None, config, strategy, start_step)
  run.note(lease_taken_over=writer.takeover, checkpoint_events=ckpt.events)
  # What prediction needs besides the parameters (trainer/predict.py).
  reporter.write_json("data_stats.json", {**dataset.stats, "features": dataset.feature_names,
                                          "classes": dataset.class_names})

  loop = _Loop(config, dataset, strategy, ckpt, reporter, model.apply)
  try:
    step_fn = strategy.compile_step(functools.partial(
        train_step, apply_fn=model.apply, tx=tx, schedule=schedule, l2=l2,
        accum_steps=config.train.grad_accum_steps, ema_decay=config.train.ema_decay))
    state = loop.run(step_fn, strategy.to_device(state), start_step, watcher)
    ckpt.close()  # A failed last save is recorded in run.json like any other failure.
  except BaseException as e:
    run.finish(getattr(e, "exit_code", 1), f"{type(e).__name__}: {e}")
    raise
  finally:
    loop.watchdog.close()
    ckpt.close()
    reporter.close()

  summary = _finish(config, dataset, strategy, model, state, reporter, loop,
                    time.time() - start_time)
  run.finish(0, "completed")
  return summary


def evaluate_lm(strategy, apply_fn, params, x, y, chunk: int = 16) -> dict:
  """Held-out next-token loss, perplexity and token accuracy of a language model.

  Unlike `evaluate`, it never holds all `[n, T, vocab]` logits: each chunk of windows
  is reduced on the devices to sums. Every process passes the same `x`, `y`.
  """
  def sums(params, batch):
    logits = apply_fn({"params": params}, batch["x"])
    w = batch["w"][:, None]
    loss = jnp.sum(models.loss_per_example(logits, batch["y"]) * w)
    correct = jnp.sum((models.predictions(logits) == batch["y"]) * w)
    return loss, correct

  # `params` is canonical under both strategies (input shardings come from the committed
  # arguments), so batches use the global-array layout even under pmap, as
  # `DataParallel.predict` does.
  fn = jax.jit(sums, out_shardings=strategy.replicated)
  n, total = len(x), np.zeros(2)
  step = strategy.num_devices * -(-min(max(n, 1), chunk) // strategy.num_devices)
  per_process = step // jax.process_count()
  lo, hi = jax.process_index() * per_process, (jax.process_index() + 1) * per_process
  for start in range(0, n, step):
    rows = np.arange(start, start + step)[lo:hi]
    real = rows < n
    rows = np.where(real, rows, 0)
    local = {"x": x[rows], "y": y[rows], "w": real.astype(np.float32)}
    batch = parallel.DataParallel.batch(strategy, local, step)
    total += np.asarray(jax.device_get(fn(params, batch)), np.float64)
  tokens = n * x.shape[1]
  loss = float(total[0] / tokens)
  return {"loss": loss, "accuracy": float(total[1] / tokens),
          "perplexity": float(np.exp(min(loss, 50.0))), "num_tokens": int(tokens)}


def _write_eval_report(dataset, strategy, model, state, reporter) -> dict:
  """eval/report.*: the classification report, or a language model's held-out metrics."""
  if dataset.task == "lm":
    metrics = evaluate_lm(strategy, model.apply, eval_params(state), dataset.test_x,
                          dataset.test_y)
    reporter.write_json("eval/report.json", metrics)
    reporter.write_text("eval/report.txt", "".join(f"{k}: {v}\n" for k, v in metrics.items()))
    return metrics
  metrics, preds = evaluate(strategy, model.apply, eval_params(state), dataset.test_x,
                            dataset.test_y)
  text, as_dict = report.classification_report(dataset.test_y, preds, dataset.class_names)
  reporter.write_text("eval/report.txt", text)
  reporter.write_json("eval/report.json", as_dict)
  return metrics


def _finish(config, dataset, strategy, model, state, reporter, loop, wall_time):
  metrics = _write_eval_report(dataset, strategy, model, state, reporter)
  loop.eval_rows.append({"step": int(config.train.steps), **metrics})
  reporter.write_json("eval/history.json", loop.eval_rows)
  reporter.plot_history(loop.eval_rows)
  summary = {
      "config": config.name,
      "final_step": int(config.train.steps),
      "eval": {**metrics, "num_examples": int(len(dataset.test_y))},
      "train_loss": loop.last_metrics.get("loss"),
      "train_accuracy": loop.last_metrics.get("accuracy"),
      "params_sha256": report.fingerprint(state.params),
      "num_devices": jax.device_count(),
      "num_processes": jax.process_count(),
      "strategy": strategy.name,
      "wall_time_s": round(wall_time, 3),
      "examples_per_second": loop.examples_per_second(),
      "skipped_steps": loop.skipped_steps,
      "resumed_from_step": loop.start_step,
  }
  reporter.write_json("summary.json", summary)
  if reporter.active:
    perplexity = f" perplexity {metrics['perplexity']:.3f}" if "perplexity" in metrics else ""
    print(f"done: step {summary['final_step']} held-out accuracy"
          f" {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}{perplexity}"
          f" -> {reporter.workdir}", flush=True)
  return summary


class _Loop:
  """The step loop and its periodic hooks (log, eval, checkpoint, preemption)."""

  def __init__(self, config, dataset, strategy, ckpt, reporter, apply_fn):
    self.config, self.dataset, self.strategy = config, dataset, strategy
    self.ckpt, self.reporter, self._apply_fn = ckpt, reporter, apply_fn
    self.eval_rows: list[dict] = []
    self.last_metrics: dict = {}
    self.skipped_steps = 0
    self.start_step = 0
    self._consecutive_skips = 0
    self._timed_steps = 0
    self._timed_seconds = 0.0
    self._last_time = None
    self._window = (0, 0.0)  # (steps, seconds) since the last logged row
    self.watchdog = watchdog.Watchdog(config.train.watchdog_timeout)
    self.faults = faults.Faults()

  def _batch(self, step: int):
    cfg, ds = self.config, self.dataset
    idx = data.process_batch_indices(cfg.seed, step, cfg.train.batch_size, len(ds.train_y),
                                     jax.process_index(), jax.process_count())
    local = {"x": self.faults.corrupt(step, ds.train_x[idx]), "y": ds.train_y[idx]}
    return self.strategy.batch(local, cfg.train.batch_size)

  def run(self, step_fn, state, start_step: int, watcher: preemption.Watcher):
    cfg = self.config.train
    self.start_step = start_step
    progress = runinfo.progress_bar(cfg.steps, start_step, enabled=self.reporter.active)
    profiler = profiling.Profiler(profiling.parse_steps(self.config.profile.steps),
                                  self.reporter.workdir)
    pending = None
    for step in range(start_step, cfg.steps):
      self.faults.maybe_hang(jax.process_index(), step)
      profiler.before_step(step, state)
      state, metrics = step_fn(state, self._batch(step))
      if pending is not None:
        self._after_step(*pending)
      pending = (step + 1, metrics)
      done = step + 1
      progress.update(1)
      preempted = watcher.reached(done)
      if not (preempted or done == cfg.steps or done % cfg.eval_every == 0
              or done % cfg.checkpoint_every == 0):
        continue
      self._after_step(*pending)  # Never checkpoint a step whose metrics are unchecked.
      pending = None
      canonical = self.strategy.to_canonical(state)
      self.ckpt.save(done, canonical, force=preempted or done == cfg.steps)
      if preempted:
        self.ckpt.close()
        raise Preempted(f"preempted: checkpoint committed at step {done}")
      if done % cfg.eval_every == 0 and done != cfg.steps:
        self._eval(canonical, done)
      self.watchdog.beat(done)  # Saves and evals are progress too.
    progress.close()
    profiler.close()
    return self.strategy.to_canonical(state)

  def _after_step(self, done: int, metrics) -> None:
    """Reads one step's metrics (one step late), applies the non-finite policy, logs."""
    values = self.strategy.read_metrics(metrics)
    self.watchdog.beat(done)
    now = time.perf_counter()
    if self._last_time is not None:  # The first step's time is mostly compilation.
      self._timed_steps += 1
      self._timed_seconds += now - self._last_time
      steps, seconds = self._window
      self._window = (steps + 1, seconds + now - self._last_time)
    self._last_time = now
    if values.pop("finite") < 1.0:
      self._on_nonfinite(done)
    else:
      self._consecutive_skips = 0
      self.last_metrics = values
    cfg = self.config.train
    if done % cfg.log_every == 0 or done == cfg.steps:
      steps, seconds = self._window
      rate = steps * cfg.batch_size / seconds if seconds > 0 else None
      row = {"step": done, **values, "examples_per_s": rate, "time": time.time()}
      self.reporter.log(row)
      self.reporter.flush()
      self._window = (0, 0.0)
      if self.reporter.active and not runinfo.is_tty():
        print(runinfo.format_row(row, cfg.steps), flush=True)

  def _on_nonfinite(self, done: int) -> None:
    cfg = self.config.train
    self.skipped_steps += 1
    self._consecutive_skips += 1
    if cfg.nonfinite_policy == "stop":
      raise Diverged(f"diverged: non-finite loss or gradient at step {done}")
    log.warning("step %d: non-finite loss or gradient, update skipped", done)
    if self._consecutive_skips >= cfg.max_consecutive_skips:
      raise Diverged(f"diverged: {self._consecutive_skips} consecutive non-finite steps,"
                     f" the last at step {done}")

  def _eval(self, state, done: int) -> None:
    self.faults.maybe_slow_eval()
    ds = self.dataset
    if ds.task == "lm":  # never holds every [n, T, vocab] logit on the host
      metrics = evaluate_lm(self.strategy, self._apply_fn, eval_params(state), ds.test_x,
                            ds.test_y)
    else:
      metrics, _ = evaluate(self.strategy, self._apply_fn, eval_params(state), ds.test_x,
                            ds.test_y)
    self.eval_rows.append({"step": done, **metrics})
    self.reporter.write_json("eval/history.json", self.eval_rows)

  def examples_per_second(self) -> float | None:
    if self._timed_seconds <= 0:
      return None
    return round(self._timed_steps * self.config.train.batch_size / self._timed_seconds, 1)
