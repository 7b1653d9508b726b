"""Tabular preprocessing for CSV data: cell types, labels, categories and empty cells.

The rules, said once (README, "Your own CSV"):

- A feature column is categorical when `config.data.categorical_columns` lists it, or
  when none of its non-empty cells is a number; every other column is numeric, and a
  cell that is not a finite number there is an error naming its line and column.
- Classification labels are integers when every label is a number (class order: by
  value; names "0", "1", "10"), and otherwise strings kept as written (order: sorted as
  strings by code point, so "False" < "True" and "Barolo" < "barbera"). A regression
  target is a finite number on every row.
- An empty cell is an error unless `config.data.missing` says what to do: `drop` the
  row, or fill it with the training split's `mean`, `median` or `most_frequent` value of
  its column (a categorical column is always filled with its most frequent category).
  Under any of these a row without a label is dropped; there is no label to fill.
- The one-hot vocabulary of each categorical column (sorted; more than `MAX_CATEGORIES`
  values is an error), the filling values and a regression target's mean and standard
  deviation are fitted on the training split only and saved in `data_stats.json`
  (`preprocess`, `target`). A category that the training split never had is encoded as
  all zeros in the test split and at prediction (with a warning there); a model cannot
  say anything better about it.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import numpy as np
import pandas as pd

from trainer.data import csv_source
from trainer.errors import UserError

TASKS = ("classification", "regression")
MISSING = ("", "mean", "median", "most_frequent", "drop")
_FILLS = ("mean", "median", "most_frequent")
# One-hot columns per categorical column: more is an id or free text, and would fill memory
# (a million distinct values x a million rows).
MAX_CATEGORIES = 1000
_MISSING_HINT = "config.data.missing=drop|mean|median|most_frequent handles empty cells"


def split_list(value) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def check_config(config) -> None:
  """Raises UserError for a task, missing policy or CSV-only field that cannot apply."""
  data = config.data
  if data.task not in TASKS:
    raise UserError(f"config.data.task={data.task!r}: expected classification or regression")
  if data.missing not in MISSING:
    raise UserError(f"config.data.missing={data.missing!r}: expected mean, median,"
                    " most_frequent or drop (empty: an empty cell is an error)")
  if data.source != "csv":
    for field, default in (("task", "classification"), ("missing", ""),
                           ("categorical_columns", "")):
      if data[field] != default:
        raise UserError(f"config.data.{field}={data[field]!r}: only config.data.source=csv"
                        f" has it (source is {data.source!r})")
  if data.task == "regression" and split_list(data.classes):
    raise UserError(f"config.data.classes={data.classes!r}: a regression has no classes;"
                    " expected it empty")


def read_csv(config):
  """Reads and checks the CSV the config names.

  Returns:
    (frame, labels, columns): the feature columns typed (numeric: float64 with NaN for an
    empty cell; categorical: object with None), indexed by data row (line = index + 2);
    labels (int64 or str for classification, float64 for regression); feature names.

  Raises:
    UserError: naming the file, line and column of the first bad cell, or the field.
  """
  data = config.data
  url = data.path
  for field in ("feature_columns", "categorical_columns"):
    if str(data[field]).strip() and not split_list(data[field]):
      raise UserError(f"config.data.{field}={data[field]!r} names no column; expected"
                      " comma-separated column names, or empty")
  frame, columns = csv_source.read_table(url, data.label_column,
                                         split_list(data.feature_columns))
  declared = split_list(data.categorical_columns)
  unknown = [c for c in declared if c not in columns]
  if unknown:
    raise UserError(f"config.data.categorical_columns lists {', '.join(map(repr, unknown))},"
                    f" not a feature column of {url}; features are {', '.join(columns)}")
  frame = _drop_empty(url, frame, columns, data.label_column, data.missing)
  labels = _labels(url, frame[data.label_column], data.label_column, data.task)
  return parse(url, frame[columns], declared, detect=True), labels, columns


def _numbers(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
  """(float64 values, written as a number) of text cells; an empty cell is NaN, False."""
  empty = (cells == "").to_numpy()
  try:  # the fast path, for a column without words
    return cells.where(~empty, "nan").astype(np.float64).to_numpy(), ~empty
  except ValueError:
    values = pd.to_numeric(cells, errors="coerce").to_numpy(np.float64)
    nan_spelling = cells.str.lower().isin(["nan", "+nan", "-nan"]).to_numpy()
    return values, (~np.isnan(values) | nan_spelling) & ~empty


def _first_empty(url: str, frame: pd.DataFrame, columns: list[str], hint: str):
  empty = frame[columns] == ""
  rows = empty.any(axis=1).to_numpy()
  if rows.any():
    row = int(np.flatnonzero(rows)[0])
    column = columns[int(np.flatnonzero(empty.iloc[row].to_numpy())[0])]
    raise UserError(f"{url}: line {frame.index[row] + 2}, column {column!r}: empty cell"
                    f" ({hint})")


def _drop_empty(url, frame, columns, label_column, missing) -> pd.DataFrame:
  """Applies the policy for empty cells that needs no statistics: error, or drop rows."""
  if not missing:
    _first_empty(url, frame, columns + [label_column], _MISSING_HINT)
  dropped = frame[label_column] == ""
  if missing == "drop":
    dropped |= (frame[columns] == "").any(axis=1)
  if dropped.all():
    raise UserError(f"{url}: every row has an empty cell; config.data.missing={missing}"
                    " leaves no data")
  if dropped.any():  # INFO: a bad-input error may still follow, and it gets one line
    logging.info("%s: dropped %d of %d rows with an empty %s (config.data.missing=%s)",
                 url, int(dropped.sum()), len(frame),
                 "cell" if missing == "drop" else "label", missing)
  return frame[~dropped.to_numpy()]


def _finite(url, cells: pd.Series, column: str, hint: str, numbers=None) -> np.ndarray:
  """float64 values of a numeric column (NaN = empty); any other non-finite cell is an error
  naming its line, with `hint` when the cell is a word rather than nan or inf."""
  values, written = numbers or _numbers(cells)
  # The model reads float32: a number past its range (e.g. 1e300) would be infinite there.
  too_large = np.isfinite(values) & (np.abs(values) > np.finfo(np.float32).max)
  bad = np.flatnonzero((~np.isfinite(values) | too_large) & (cells != "").to_numpy())
  if bad.size:
    row = int(bad[0])
    if too_large[row]:
      what = f"is past float32's range (+-{np.finfo(np.float32).max:.4g})"
    else:
      what = "is not a finite number" + ("" if written[row] else f" ({hint})")
    raise UserError(f"{url}: line {cells.index[row] + 2}, column {column!r}:"
                    f" {cells.iloc[row]!r} {what}")
  return values


def _labels(url, cells: pd.Series, column: str, task: str) -> np.ndarray:
  if task == "classification" and not _numbers(cells)[1].all():
    return cells.to_numpy(dtype=str)  # string labels, kept as written
  values = _finite(url, cells, column, "a regression target is a number per row")
  if task == "regression":
    return values
  bad = np.flatnonzero(values != np.round(values))
  if bad.size:
    raise UserError(f"{url}: line {cells.index[bad[0]] + 2}, column {column!r}: label"
                    f" {cells.iloc[bad[0]]!r} is not an integer; a numeric target to predict"
                    " is config.data.task=regression")
  if values.size and np.abs(values).max() > 2**53:  # past float64's exact integers
    return cells.to_numpy(dtype=str)  # as written, so that no two labels merge
  return values.astype(np.int64)


def parse(url: str, frame: pd.DataFrame, categorical: list[str],
          detect: bool = False) -> pd.DataFrame:
  """Types the text cells: numeric columns float64 (NaN = empty), categorical object.

  `detect`: a column with no number in it is categorical too (training; at prediction
  the run's columns keep their kinds).
  """
  typed = {}
  for column in frame.columns:
    cells = frame[column]
    numbers = None if column in categorical else _numbers(cells)
    if numbers is not None and (numbers[1].any() or not detect):
      typed[column] = _finite(url, cells, column, "list the column in"
                              " config.data.categorical_columns if it holds categories", numbers)
    else:
      typed[column] = cells.astype(object).where(cells != "", None)
  return pd.DataFrame(typed, index=frame.index)


@dataclasses.dataclass
class Preprocessor:
  """Turns typed feature columns into the model's float32 inputs; fitted on train only."""
  columns: list[str]  # raw feature columns, in input order
  categories: dict[str, list[str]]  # categorical column -> one-hot vocabulary
  fill: dict[str, float | str]  # column -> the value of an empty cell
  missing: str  # config.data.missing of the run

  @classmethod
  def fit(cls, frame: pd.DataFrame, missing: str) -> Preprocessor:
    """Fits vocabularies and filling values on the (typed) training split `frame`."""
    categories, fill = {}, {}
    for column in frame.columns:
      values = frame[column].dropna()
      numeric = pd.api.types.is_numeric_dtype(frame[column])
      if not numeric:
        categories[column] = sorted(values.unique().tolist())
        if len(categories[column]) > MAX_CATEGORIES:
          raise UserError(f"categorical column {column!r} has {len(categories[column])}"
                          f" distinct values in the training split, more than {MAX_CATEGORIES}"
                          " for one-hot encoding: leave it out with config.data.feature_columns")
      if missing not in _FILLS:
        continue
      if values.empty:
        raise UserError(f"column {column!r} has no value in the training split:"
                        f" config.data.missing={missing} has nothing to fill it from")
      if numeric and missing == "mean":
        fill[column] = float(values.mean())
      elif numeric and missing == "median":
        fill[column] = float(values.median())
      else:  # the most frequent value; ties go to the smallest
        mode = values.mode().iloc[0]
        fill[column] = float(mode) if numeric else str(mode)
    return cls(list(frame.columns), categories, fill, missing)

  @property
  def feature_names(self) -> list[str]:
    """One name per model input: a numeric column, or `column=category`."""
    names = []
    for column in self.columns:
      vocab = self.categories.get(column)
      names += [f"{column}={v}" for v in vocab] if vocab is not None else [column]
    return names

  def transform(self, frame: pd.DataFrame, log=logging.info) -> np.ndarray:
    """float32 [n, len(feature_names)] for typed columns; empty cells filled.

    Unseen categories are reported through `log`: INFO in training, where a bad-input
    error may still follow and must stay one line; a warning at prediction.
    """
    blocks = []
    for column in self.columns:
      cells = frame[column]
      if column in self.fill:
        cells = cells.where(cells.notna(), self.fill[column])
      if column not in self.categories:
        blocks.append(cells.to_numpy(np.float32)[:, None])
        continue
      vocab = self.categories[column]
      unseen = cells.notna() & ~cells.isin(vocab)
      if unseen.any():
        log("column %r: %d row(s) with a category the training split never had (%r first),"
            " encoded as all zeros", column, int(unseen.sum()), cells[unseen].iloc[0])
      values = cells.to_numpy(object)[:, None]
      blocks.append((values == np.asarray(vocab, object)[None, :]).astype(np.float32))
    return np.concatenate(blocks, axis=1)

  def read_rows(self, url: str, frame: pd.DataFrame) -> np.ndarray:
    """Prediction: text cells (csv_source.read_features) -> model inputs, as in training."""
    if self.missing not in _FILLS:
      trained = f"config.data.missing={self.missing}" if self.missing else "no empty cells"
      _first_empty(url, frame, self.columns, f"the model was trained with {trained}")
    return self.transform(parse(url, frame, list(self.categories)), log=logging.warning)

  def to_json(self) -> dict:
    return {"columns": self.columns, "categories": self.categories, "fill": self.fill,
            "missing": self.missing}

  @classmethod
  def from_stats(cls, stats: dict) -> Preprocessor:
    """From a run's data_stats.json; a run without `preprocess` had numeric columns only."""
    saved = stats.get("preprocess")
    if saved is None:
      return cls(list(stats["features"]), {}, {}, "")
    return cls(list(saved["columns"]), dict(saved["categories"]), dict(saved["fill"]),
               saved["missing"])


def standardize_target(train_y: np.ndarray, test_y: np.ndarray):
  """(train, test) as float32 standardised with the training split's mean and std."""
  mean, std = float(train_y.mean()), float(train_y.std())
  if not std > 0:
    raise UserError(f"the regression target is constant ({mean}) on the training split")
  target = {"mean": mean, "std": std}
  return ((train_y - mean) / std).astype(np.float32), ((test_y - mean) / std).astype(
      np.float32), target
