"""`python -m trainer.predict`: label new rows with a finished (or checkpointed) run.

    python -m trainer.predict --workdir=runs/mobile_price-... \
        --input=../shared/data/mobile-price/test.csv --output=predictions.csv

Loads the run's config (run.json), preprocessing and standardisation statistics
(data_stats.json) and newest committed checkpoint, and writes one row per input row: the
passthrough id column when present, the predicted label (a class name as written in the
training data) and one probability column per class, or a regression's `value`. Input
cells go through the run's preprocessing (trainer/data/tabular.py: categories, empty
cells). The model is written for one example; `jax.vmap` turns it into a batched
function, the tutorial's point about automatic vectorisation. Exit 2 with one line for a
missing run, a missing or unknown column, or a bad cell.
"""

from __future__ import annotations

import sys

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
  """(config, data statistics, params) of a run. Raises UserError when absent."""
  from trainer import checkpoint  # pylint: disable=g-import-not-at-top
  run_path = storage.path(workdir) / "run.json"
  stats_path = storage.path(workdir) / "data_stats.json"
  if not run_path.exists() or not stats_path.exists():
    raise errors.UserError(f"--workdir={workdir}: no run.json/data_stats.json there; expected a"
                           " run directory written by python -m trainer")
  config = ml_collections.ConfigDict(storage.read_json(run_path)["config"])
  step, state = checkpoint.load_latest(storage.path(workdir) / "checkpoints")
  if step is None:
    raise errors.UserError(f"--workdir={workdir}: no committed checkpoint")
  return config, storage.read_json(stats_path), state["params"]


def predict(config, stats: dict, params, x: np.ndarray) -> np.ndarray:
  """Class probabilities [n, classes] (regression: values [n]) for encoded features `x`.

  `x` is standardised here, on the fly; categorical and empty cells are already encoded
  (`tabular.Preprocessor.read_rows`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from trainer import models  # pylint: disable=g-import-not-at-top
  from trainer.data import tabular  # pylint: disable=g-import-not-at-top
  if stats.get("mean"):
    x = (x - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
  regression = "target" in stats
  model = models.create(config, 2 if regression else len(stats["classes"]))  # 2: one output

  def one_example(features):  # [d] -> [classes]
    outputs = model.apply({"params": params}, features)
    return outputs if regression else models.probabilities(outputs)

  outputs = np.asarray(jax.jit(jax.vmap(one_example))(x))
  return tabular.target_values(stats, outputs) if regression else outputs


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  from trainer.data import csv_source  # pylint: disable=g-import-not-at-top
  from trainer.data import tabular  # pylint: disable=g-import-not-at-top
  try:
    config, stats, params = load_run(_WORKDIR.value)
    passthrough = [_ID_COLUMN.value, config.data.label_column]
    prep = tabular.Preprocessor.from_stats(stats)
    frame, extra = csv_source.read_features(_INPUT.value, prep.columns, passthrough)
    x = prep.read_rows(_INPUT.value, frame)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  outputs = predict(config, stats, params, x)
  text = tabular.prediction_csv(stats, outputs, _ID_COLUMN.value, extra.get(_ID_COLUMN.value))
  storage.write_text(_OUTPUT.value, text)
  print(f"wrote {len(outputs)} predictions to {_OUTPUT.value}")


if __name__ == "__main__":
  app.run(main)
