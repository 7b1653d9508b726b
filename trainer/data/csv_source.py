"""CSV data through pandas, behind a schema check that names the file, line and column.

pandas lets several malformed inputs through silently (a header-only file, a missing
field, `inf`, a word in a numeric column, duplicate headers). Everything is read as
text first and checked here, so each of these ends as one `UserError` line instead of
NaN in the training data.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd

from trainer import storage
from trainer.errors import UserError


def read_table(url: str, label_column: str, feature_columns: list[str]):
  """Reads a labelled CSV. Returns (features float32 [n, d], labels int64 [n], names)."""
  if not url:
    raise UserError("config.data.path is empty: expected a CSV path or gs:// URL")
  raw = storage.read_input(url)  # UserError when missing or not readable
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  header = _read_header(url, text)
  if label_column not in header:
    hint = " (this looks like an unlabelled test split)" if "id" in header else ""
    raise UserError(f"{url}: no label column {label_column!r}{hint}; columns are"
                    f" {', '.join(header)}")
  features = feature_columns or [c for c in header if c != label_column]
  missing = [c for c in features if c not in header]
  if missing:
    raise UserError(f"{url}: feature column(s) {', '.join(map(repr, missing))} not found;"
                    f" columns are {', '.join(header)}")
  frame = _read_frame(url, text, len(header))
  x = np.stack([_numeric_column(url, frame, c) for c in features], axis=1)
  y_float = _numeric_column(url, frame, label_column)
  bad = np.flatnonzero(y_float != np.round(y_float))
  if bad.size:
    raise UserError(f"{url}: line {bad[0] + 2}, column {label_column!r}: label"
                    f" {frame[label_column].iloc[bad[0]]!r} is not an integer")
  return x.astype(np.float32), y_float.astype(np.int64), features


def _read_header(url: str, text: str) -> list[str]:
  first = text.split("\n", 1)[0]
  if not first.strip():
    raise UserError(f"{url}: file is empty: expected a header line and data rows")
  header = [h.strip() for h in next(csv.reader([first]))]
  seen = set()
  for name in header:
    if not name:
      raise UserError(f"{url}: line 1: empty column name in the header")
    if name in seen:
      raise UserError(f"{url}: line 1: duplicate column {name!r} in the header")
    seen.add(name)
  return header


def _read_frame(url: str, text: str, num_columns: int) -> pd.DataFrame:
  # pandas pads short rows with empty values and turns an extra first-row field into
  # an index; count the fields of every row first.
  reader = csv.reader(io.StringIO(text), strict=True)
  try:
    for row in reader:
      if row and len(row) != num_columns:
        relation = "fewer" if len(row) < num_columns else "more"
        raise UserError(f"{url}: line {reader.line_num}: {len(row)} fields, {relation} than"
                        f" the {num_columns} in the header")
  except csv.Error as e:
    raise UserError(f"{url}: line {reader.line_num}: malformed CSV ({e})") from None
  try:
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False,
                        index_col=False, skipinitialspace=True)
  except pd.errors.ParserError as e:
    raise UserError(f"{url}: malformed CSV: {str(e).strip().splitlines()[-1]}") from None
  if len(frame) == 0:
    raise UserError(f"{url}: header only, no data rows")
  frame.columns = [c.strip() for c in frame.columns]
  return frame


def _numeric_column(url: str, frame: pd.DataFrame, column: str) -> np.ndarray:
  raw = frame[column].str.strip()
  values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
  bad = ~np.isfinite(values)
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    cell = raw.iloc[row]
    what = "empty cell" if cell == "" else f"{cell!r} is not a finite number"
    raise UserError(f"{url}: line {row + 2}, column {column!r}: {what}")
  return values


def read_features(url: str, feature_columns: list[str], passthrough: list[str]):
  """Reads an unlabelled CSV for prediction: exactly `feature_columns`, plus any of the
  `passthrough` columns (e.g. an id, or a label that is ignored).

  Returns (features float32 [n, d] in `feature_columns` order, {passthrough name: values}).

  Raises:
    UserError: a missing feature column, an unknown column, or a bad cell (file, line,
    column).
  """
  raw = storage.read_input(url)
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  header = _read_header(url, text)
  missing = [c for c in feature_columns if c not in header]
  if missing:
    raise UserError(f"{url}: missing feature column(s) {', '.join(map(repr, missing))};"
                    f" the model was trained on {', '.join(feature_columns)}")
  unknown = [c for c in header if c not in feature_columns and c not in passthrough]
  if unknown:
    raise UserError(f"{url}: unknown column(s) {', '.join(map(repr, unknown))}; expected the"
                    f" trained features and optionally {', '.join(passthrough)}")
  frame = _read_frame(url, text, len(header))
  x = np.stack([_numeric_column(url, frame, c) for c in feature_columns], axis=1)
  extra = {c: frame[c].str.strip().tolist() for c in passthrough if c in header}
  return x.astype(np.float32), extra
