"""CSV data through pandas, behind a schema check that names the file, line and column.

pandas lets several malformed inputs through silently (a header-only file, a missing
field, duplicate headers, an extra first-row field turned into an index). Everything is
read as text here and checked, so each of these ends as one `UserError` line; what the
cells mean (numbers, categories, labels, empty cells) is `trainer.data.tabular`'s job.
"""

from __future__ import annotations

import csv
import io

import pandas as pd

from trainer import storage
from trainer.errors import UserError


def read_table(url: str, label_column: str, feature_columns: list[str]):
  """Reads a labelled CSV as text.

  Returns:
    (frame, features): every cell as a stripped string ("" for an empty cell), indexed
    by data row (line = index + 2); and the feature columns, in file order unless
    `feature_columns` names them.

  Raises:
    UserError: an unreadable or malformed file, or a missing label or feature column.
  """
  if not url:
    raise UserError("config.data.path is empty: expected a CSV path or gs:// URL")
  if not label_column:
    raise UserError("config.data.label_column is empty: expected the name of the label column")
  text = _read_text(url)
  header = _read_header(url, text)
  if label_column not in header:
    hint = " (this looks like an unlabelled test split)" if "id" in header else ""
    raise UserError(f"{url}: no label column {label_column!r}{hint}; columns are"
                    f" {', '.join(header)}")
  features = feature_columns or [c for c in header if c != label_column]
  twice = sorted({c for c in features if features.count(c) > 1})
  if twice:
    raise UserError(f"config.data.feature_columns lists {', '.join(map(repr, twice))} more than"
                    " once; expected each column once")
  if not features:
    raise UserError(f"{url}: the label column {label_column!r} is its only column; expected"
                    " at least one feature column beside it")
  missing = [c for c in features if c not in header]
  if missing:
    raise UserError(f"{url}: feature column(s) {', '.join(map(repr, missing))} not found;"
                    f" columns are {', '.join(header)}")
  if label_column in features:
    raise UserError(f"{url}: the label column {label_column!r} is also listed as a feature")
  return _read_frame(url, text, len(header)), features


def read_features(url: str, feature_columns: list[str], passthrough: list[str]):
  """Reads an unlabelled CSV for prediction: exactly `feature_columns`, plus any of the
  `passthrough` columns (e.g. an id, or a label that is ignored).

  Returns:
    (frame, extra): the feature cells as stripped strings, in `feature_columns` order
    and indexed by data row; {passthrough name: values} for those present.

  Raises:
    UserError: a missing feature column, an unknown column, or a malformed file.
  """
  text = _read_text(url)
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
  extra = {c: frame[c].tolist() for c in passthrough if c in header}
  return frame[feature_columns], extra


def _read_text(url: str) -> str:
  raw = storage.read_input(url)  # UserError when missing or not readable
  try:
    return raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise UserError(f"{url}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_header(url: str, text: str) -> list[str]:
  first = text.split("\n", 1)[0]
  if not first.strip():
    raise UserError(f"{url}: file is empty: expected a header line and data rows")
  try:  # the first record, which may hold a quoted newline
    header = [h.strip() for h in next(csv.reader(io.StringIO(text), strict=True))]
  except csv.Error as e:
    raise UserError(f"{url}: line 1: {str(e).split(' - ')[0]}; expected a comma-separated"
                    " header line, lines ending in \\n or \\r\\n") from None
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
  return frame.apply(lambda column: column.str.strip())
