"""Tasks: what the model's outputs mean. Loss, metrics, the eval report and predictions.

`config.task` names one (empty: the data set's own `Dataset.task`): `classification`,
`lm` (next-token prediction), `regression`, or `module:attribute` for a user's task (a
class, instantiated without arguments, or an instance). A task is the only place that
knows what a batch's `y` is; the training step calls `task.loss`, the periodic eval
`task.evaluate`, the end of a run `task.report`, and `python -m trainer.predict`
`task.predict_columns`.
"""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainer import parallel
from trainer import registry
from trainer import storage
from trainer.errors import UserError


class Task:
  """The interface. Subclass a built-in task to change one piece (e.g. add a metric)."""

  name = "task"
  history_metric = "accuracy"  # the metric plots/history.png draws beside the loss

  def num_outputs(self, dataset) -> int | None:
    """The model's output width (`num_outputs`), or None when the model sets it itself."""
    del dataset
    return None

  def loss(self, outputs, batch) -> tuple[jax.Array, dict]:
    """(mean loss, {metric: scalar}) of one batch. Pure: runs inside the jitted step."""
    raise NotImplementedError

  def check_outputs(self, outputs: jax.ShapeDtypeStruct, example: dict, dataset) -> None:
    """Raises UserError when the model's `outputs` for one training `example` (a batch of
    one, labels included) cannot be what `loss` takes. `build` calls it before anything
    runs or is written, so a model that does not fit the task or data ends there with
    one line, not in the step. The default accepts any outputs."""
    del outputs, example, dataset

  def _one_output_row_per_label(self, outputs, example, width: int | None) -> None:
    """The built-in tasks' rule: the labels' shape, then `width` outputs (any if None)."""
    labels = example.get("y")
    if labels is None:
      return
    expected = tuple(np.shape(labels)) + ((width,) if width else tuple(outputs.shape[-1:]))
    if tuple(outputs.shape) != expected:
      raise UserError(f"task {self.name}: the model's outputs for one example of shape"
                      f" {tuple(np.shape(example['x']))} have shape {tuple(outputs.shape)};"
                      f" expected {expected}: the labels' shape {tuple(np.shape(labels))},"
                      f" then {width or 'the'} output(s) per label")

  def evaluate(self, strategy, model, variables, dataset) -> dict:
    """Held-out metrics (a flat dict of floats, `loss` among them)."""
    raise NotImplementedError

  def compile_evaluation(self, strategy, model, variables, dataset) -> None:
    """Compiles what `evaluate` and `report` will run, before the first evaluation.

    `variables` has `jax.ShapeDtypeStruct` leaves: shapes, types and shardings, no values.
    A run calls this while it waits for its first dispatch to compile; an executable it
    leaves out is compiled at the first evaluation instead, as without it.
    """
    del strategy, model, variables, dataset

  def report(self, strategy, model, variables, dataset, reporter) -> dict:
    """The final evaluation: writes eval/report.*; returns the metrics for summary.json."""
    metrics = self.evaluate(strategy, model, variables, dataset)
    reporter.write_json("eval/report.json", metrics)
    reporter.write_text("eval/report.txt", "".join(f"{k}: {v}\n" for k, v in metrics.items()))
    return metrics

  def predict_columns(self, outputs: np.ndarray, stats: dict) -> dict[str, list[str]]:
    """Output columns of `python -m trainer.predict` for a batch of model outputs."""
    raise NotImplementedError

  def describe(self, metrics: dict) -> str:
    """The metrics in the final `done:` line."""
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def resolve(config, dataset) -> Task:
  """The task `config["task"]` names (a name, class or instance), or the data set's own."""
  name = config.get("task") or dataset.task
  obj = registry.resolve("task", name)
  task = obj() if isinstance(obj, type) else obj
  if not isinstance(task, Task):
    raise UserError(f"config.task={name!r}: {type(task).__name__} is not a trainer.tasks.Task;"
                    " expected a Task subclass or instance")
  return task


# Classification ----------------------------------------------------------------------


def loss_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy in float32 (also for bf16 logits): sigmoid for one output, else softmax."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities [..., num_classes], also for the one-output binary model."""
  if logits.shape[-1] == 1:
    p1 = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p1, p1], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def predictions(logits: jax.Array) -> jax.Array:
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _losses_and_predictions(logits: np.ndarray, labels: np.ndarray):
  """Per-example loss and predicted class of held-out logits, which `predict` returns
  in host memory: `loss_per_example` and `predictions` in NumPy, in float32.

  On the host, with no executable to compile: a jitted version cost each run one more
  compilation (0.07-0.13 s on 2 CPU cores), and eager JAX ops one per operation.
  """
  logits = np.asarray(logits, np.float32)
  labels = np.asarray(labels)
  if logits.shape[-1] == 1:
    z, y = logits[..., 0], labels.astype(np.float32)
    # -y log(sigmoid(z)) - (1 - y) log(1 - sigmoid(z)), stable for any z.
    losses = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    return losses, (z > 0).astype(np.int32)
  top = logits.max(axis=-1, keepdims=True)
  log_norm = top[..., 0] + np.log(np.exp(logits - top).sum(axis=-1))
  picked = np.take_along_axis(logits, labels[..., None].astype(np.intp), axis=-1)[..., 0]
  return log_norm - picked, logits.argmax(axis=-1).astype(np.int32)


class Classification(Task):
  """K classes: one sigmoid output for K = 2, a softmax over K outputs otherwise."""

  name = "classification"

  def num_outputs(self, dataset) -> int:
    if dataset.num_classes < 2:
      raise UserError(f"task classification: the data set has {dataset.num_classes} class(es);"
                      " expected at least 2 (a numeric target is config.task=regression)")
    return 1 if dataset.num_classes == 2 else dataset.num_classes

  def check_outputs(self, outputs, example, dataset):
    self._one_output_row_per_label(outputs, example, self.num_outputs(dataset))

  def loss(self, outputs, batch):
    loss = loss_per_example(outputs, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(predictions(outputs) == batch["y"])}

  def held_out_logits(self, strategy, model, variables, dataset) -> np.ndarray:
    return strategy.predict(model.eval_apply, variables, dataset.test_x)

  def compile_evaluation(self, strategy, model, variables, dataset):
    strategy.compile_predict(model.eval_apply, variables, dataset.test_x)

  def metrics(self, logits: np.ndarray, labels: np.ndarray) -> dict:
    """Held-out metrics from every test example's logits; extend this to add one."""
    labels = np.asarray(labels)  # (a language model's `TokenWindows` as well)
    losses, preds = _losses_and_predictions(logits, labels)
    return {"loss": float(np.mean(losses)), "accuracy": float(np.mean(preds == labels))}

  def evaluate(self, strategy, model, variables, dataset):
    logits = self.held_out_logits(strategy, model, variables, dataset)
    return self.metrics(logits, dataset.test_y)

  def report(self, strategy, model, variables, dataset, reporter):
    from trainer import report  # pylint: disable=g-import-not-at-top
    logits = self.held_out_logits(strategy, model, variables, dataset)
    preds = _losses_and_predictions(logits, dataset.test_y)[1]
    text, as_dict = report.classification_report(dataset.test_y, preds, dataset.class_names)
    reporter.write_text("eval/report.txt", text)
    reporter.write_json("eval/report.json", as_dict)
    return self.metrics(logits, dataset.test_y)

  def predict_columns(self, outputs, stats):
    probs = np.asarray(probabilities(jnp.asarray(outputs)))
    classes = stats["classes"]
    columns = {"label": [classes[int(i)] for i in probs.argmax(axis=1)]}
    for j, name in enumerate(classes):
      columns[f"p_{name}"] = [f"{p:.6f}" for p in probs[:, j]]
    return columns

  def describe(self, metrics):
    return f"held-out accuracy {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}"


# Language model ----------------------------------------------------------------------


class LanguageModel(Task):
  """Next-token prediction: y is x shifted by one; `[B, T, vocab]` logits."""

  name = "lm"

  def check_outputs(self, outputs, example, dataset):
    self._one_output_row_per_label(outputs, example, None)  # the vocabulary: the model's

  def predict_columns(self, outputs, stats):
    raise UserError("python -m trainer.predict labels CSV rows; a language model run (task lm)"
                    " has no such output: expected a classification or regression run")

  def loss(self, outputs, batch):
    loss = loss_per_example(outputs, batch["y"]).mean()
    return loss, {"accuracy": jnp.mean(predictions(outputs) == batch["y"])}

  def evaluate(self, strategy, model, variables, dataset, chunk: int = 16):
    """Held-out loss, perplexity and token accuracy, never holding all `[n, T, vocab]`
    logits: each chunk of windows is reduced on the devices to sums."""
    x, y = dataset.test_x, dataset.test_y

    def sums(variables, batch):
      logits = model.eval_apply(variables, batch["x"])
      w = batch["w"][:, None]
      loss = jnp.sum(loss_per_example(logits, batch["y"]) * w)
      correct = jnp.sum((predictions(logits) == batch["y"]) * w)
      return loss, correct

    # The variables are canonical under both strategies (input shardings come from the
    # committed arguments), so batches use the global-array layout even under pmap.
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
      total += np.asarray(jax.device_get(fn(variables, batch)), np.float64)
    tokens = n * x.shape[1]
    loss = float(total[0] / tokens)
    return {"loss": loss, "accuracy": float(total[1] / tokens),
            "perplexity": float(np.exp(min(loss, 50.0))), "num_tokens": int(tokens)}

  def describe(self, metrics):
    return (f"held-out accuracy {metrics['accuracy']:.4f} loss {metrics['loss']:.4f}"
            f" perplexity {metrics['perplexity']:.3f}")


# Regression --------------------------------------------------------------------------


class Regression(Task):
  """One real target, trained with MSE on its standardised value.

  The data contract: `Dataset.task == "regression"`, `train_y`/`test_y` float32 `[n]`
  holding the standardised target, and `dataset.stats["target"] = {"mean": m, "std": s}`.
  Reports (MAE, RMSE, R²) and predictions are in the target's original units.
  """

  name = "regression"
  history_metric = "mae"

  def num_outputs(self, dataset) -> int:
    if dataset.num_classes:
      raise UserError(f"task regression: the data set's labels are {dataset.num_classes} classes;"
                      " expected a numeric target (a CSV's: config.data.task=regression)")
    return 1

  def check_outputs(self, outputs, example, dataset):
    self._one_output_row_per_label(outputs, example, 1)

  def loss(self, outputs, batch):
    error = outputs[..., 0].astype(jnp.float32) - batch["y"]
    # `mae` here is in standardised units (the held-out report uses original ones).
    return jnp.mean(error * error), {"mae": jnp.mean(jnp.abs(error))}

  @staticmethod
  def _target(stats) -> tuple[float, float]:
    target = stats.get("target", {})
    return float(target.get("mean", 0.0)), float(target.get("std", 1.0))

  def held_out(self, strategy, model, variables, dataset):
    """(predicted, actual), both in original units, for every test example."""
    outputs = strategy.predict(model.eval_apply, variables, dataset.test_x)
    mean, std = self._target(dataset.stats)
    return (np.asarray(outputs, np.float64)[:, 0] * std + mean,
            np.asarray(dataset.test_y, np.float64) * std + mean)

  def compile_evaluation(self, strategy, model, variables, dataset):
    strategy.compile_predict(model.eval_apply, variables, dataset.test_x)

  def metrics(self, predicted: np.ndarray, actual: np.ndarray, std: float) -> dict:
    error = predicted - actual
    residual = float(np.sum(error ** 2))
    spread = float(np.sum((actual - actual.mean()) ** 2))
    return {"loss": float(np.mean((error / std) ** 2)), "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error ** 2))),
            "r2": 1.0 - residual / spread if spread > 0 else 0.0}

  def evaluate(self, strategy, model, variables, dataset):
    predicted, actual = self.held_out(strategy, model, variables, dataset)
    return self.metrics(predicted, actual, self._target(dataset.stats)[1])

  def report(self, strategy, model, variables, dataset, reporter):
    predicted, actual = self.held_out(strategy, model, variables, dataset)
    metrics = self.metrics(predicted, actual, self._target(dataset.stats)[1])
    reporter.write_json("eval/report.json", metrics)
    reporter.write_text("eval/report.txt", "".join(f"{k}: {v:.6g}\n"
                                                   for k, v in metrics.items()))
    if reporter.active:
      _plot_predicted_vs_actual(reporter.workdir, predicted, actual, metrics["r2"])
    return metrics

  def predict_columns(self, outputs, stats):
    mean, std = self._target(stats)
    return {"prediction": [f"{v:.6g}" for v in np.asarray(outputs)[:, 0] * std + mean]}

  def describe(self, metrics):
    return (f"held-out MAE {metrics['mae']:.4g} RMSE {metrics['rmse']:.4g}"
            f" R2 {metrics['r2']:.4f}")


def _plot_predicted_vs_actual(workdir, predicted, actual, r2: float) -> None:
  """plots/predicted_vs_actual.png: one point per test example and the y = x line."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.scatter(actual, predicted, s=10, alpha=0.6)
  lo, hi = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
  ax.plot([lo, hi], [lo, hi], "k--", linewidth=1)
  ax.set(xlabel="actual", ylabel="predicted", title=f"Held-out predictions (R² {r2:.3f})")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(storage.path(workdir) / "plots" / "predicted_vs_actual.png",
                      buffer.getvalue())
