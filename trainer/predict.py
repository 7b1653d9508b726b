"""`python -m trainer.predict`: label new rows with a finished (or checkpointed) run.

    python -m trainer.predict --workdir=runs/mobile_price-... \
        --input=../shared/data/mobile-price/test.csv --output=predictions.csv

Loads the run's config (run.json), preprocessing and standardisation statistics
(data_stats.json) and newest committed checkpoint, and writes one row per input row: the
passthrough id column when present, then the task's columns (classification: the
predicted label, a class name as written in the training data, and one probability
column per class; regression: the predicted value in the target's units). Input cells
go through the run's preprocessing (trainer/data/tabular.py: categories, empty cells).
The model is written for one example; `jax.vmap` turns it into a batched function, the
tutorial's point about automatic vectorisation. Exit 2 with one line for a missing run,
a missing or unknown column, or a bad cell.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import types

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from trainer import errors
from trainer import storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://).", required=True)
_INPUT = flags.DEFINE_string("input", None, "CSV with the trained feature columns.",
                             required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Where to write predictions (CSV).", required=True)
_ID_COLUMN = flags.DEFINE_string("id_column", "id", "Column copied to the output unchanged.")


def load_run(workdir: str):
  """(config, data statistics, variables) of a run. Raises UserError when absent.

  `variables` is `{"params": ..., **model_state}` (e.g. BatchNorm's `batch_stats`).
  """
  from trainer import checkpoint  # pylint: disable=g-import-not-at-top
  run_path = storage.path(workdir) / "run.json"
  stats_path = storage.path(workdir) / "data_stats.json"
  if not run_path.exists() or not stats_path.exists():
    raise errors.UserError(f"--workdir={workdir}: no run.json/data_stats.json there; expected a"
                           " run directory written by python -m trainer")
  from trainer import runinfo  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(runinfo.read_record(workdir).get("config", {}))
  stats = storage.read_json_object(stats_path, "the data statistics a run writes")
  try:
    step, state = checkpoint.load_latest(storage.path(workdir) / "checkpoints")
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if storage.is_storage_error(e):
      raise
    raise errors.UserError(f"--workdir={workdir}: its newest committed checkpoint cannot be"
                           f" read ({type(e).__name__}: {storage.one_line(e)}); expected the"
                           " checkpoints a run writes") from e
  if step is None:
    raise errors.UserError(f"--workdir={workdir}: no committed checkpoint")
  params = state["params"] if state.get("ema_params") is None else state["ema_params"]
  return config, stats, {"params": params, **(state.get("model_state") or {})}


def task_of(config, stats):
  """The run's task, as the trainer resolved it (config.task, else the data's)."""
  from trainer import tasks  # pylint: disable=g-import-not-at-top
  dataset = types.SimpleNamespace(task=stats.get("task", "classification"),
                                  num_classes=len(stats.get("classes") or []))
  return tasks.resolve(config, dataset), dataset


def predict(config, stats: dict, variables, x: np.ndarray) -> np.ndarray:
  """Model outputs for raw features `x` (standardised on the fly with the run's statistics).

  The model is rebuilt from the run's `config.model` through the registry (a user's
  model must be importable here too) and applied in evaluation mode.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from trainer import models  # pylint: disable=g-import-not-at-top
  if stats.get("mean"):
    x = (x - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
  task, dataset = task_of(config, stats)
  model = models.create(config.model, task.num_outputs(dataset))
  params, model_state = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])
  variables = _conform({"params": params, **(model_state or {})}, variables)

  def one_example(features):  # [d] -> [outputs]
    return model.eval_apply(variables, features)

  return np.asarray(jax.jit(jax.vmap(one_example))(x))


def _conform(template, loaded):
  """`loaded` (a checkpoint read without a target: every key a string) shaped like
  `template`, whose keys may be integers (e.g. an NNX module's list of layers)."""
  if isinstance(template, dict):
    return {k: _conform(v, loaded[k] if k in loaded else loaded[str(k)])
            for k, v in template.items()}
  return loaded


def _bad_input(line: str) -> None:
  print(f"error: {' '.join(line.split())}", file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _bad_input(f"unexpected positional arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from trainer.data import csv_source  # pylint: disable=g-import-not-at-top
  from trainer.data import tabular  # pylint: disable=g-import-not-at-top
  output = _OUTPUT.value
  if not output.strip() or output.endswith(("/", os.sep)):
    _bad_input(f"--output={output!r}: expected the path of a CSV file to write")
  if "://" not in output and os.path.lexists(output) and not os.path.isfile(output):
    _bad_input(f"--output={output}: cannot write there: it exists and is not a regular file"
               " (a folder, a device or a pipe); expected the path of a CSV file to write")
  try:
    config, stats, variables = load_run(_WORKDIR.value)
    task, _ = task_of(config, stats)
    if not stats.get("features") and not stats.get("preprocess"):
      raise errors.UserError(f"--workdir={_WORKDIR.value}: a {task.name} run without feature"
                             " columns; prediction labels CSV rows of a tabular run")
    passthrough = [_ID_COLUMN.value] + ([config.data.label_column]
                                        if "label_column" in config.data else [])
    passthrough += [stats["target"]["name"]] if stats.get("target", {}).get("name") else []
    prep = tabular.Preprocessor.from_stats(stats)
    frame, extra = csv_source.read_features(_INPUT.value, prep.columns, passthrough)
    x = prep.read_rows(_INPUT.value, frame)
    outputs = predict(config, stats, variables, x)
    columns = task.predict_columns(outputs, stats)
  except errors.UserError as e:
    _bad_input(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if not storage.is_storage_error(e):
      raise
    print(f"error: storage failed: {storage.reason(e)}", file=sys.stderr)  # one line, exit 1
    sys.exit(1)
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")  # class names may hold commas or quotes
  id_values = extra.get(_ID_COLUMN.value)
  writer.writerow(([_ID_COLUMN.value] if id_values else []) + list(columns))
  for i in range(len(outputs)):
    writer.writerow(([id_values[i]] if id_values else []) + [columns[c][i] for c in columns])
  try:
    storage.write_text(_OUTPUT.value, out.getvalue())
  except errors.UserError as e:  # a URL of another scheme
    _bad_input(f"--output={_OUTPUT.value}: {e}")
  except OSError as e:
    _bad_input(f"--output={_OUTPUT.value}: cannot write there ({storage.reason(e)}); expected a"
               " file path in a writable folder")
  print(f"wrote {len(outputs)} predictions to {_OUTPUT.value}")


def run(argv: list[str]) -> None:
  """Parses the flags (a bad or missing one: exit 2, one line), then runs `main`."""
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    _bad_input(str(e))
  app.run(main, argv=argv)


if __name__ == "__main__":
  run(sys.argv)
