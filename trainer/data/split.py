"""The held-out split, row for row the one scikit-learn's `train_test_split` makes.

Earlier runs split their data with `train_test_split(x, y, test_size=fraction,
stratify=y or None, random_state=seed)`, and their checkpoints, reports and accuracies
depend on which rows were held out, so this module reproduces that split exactly (same
rows, same order) without importing scikit-learn, which costs 1-2 s of every start.

Both splits draw from one `np.random.RandomState(seed)` in a fixed order:

- plain (a regression target): one permutation of all rows; its first `n_test` rows are
  the test split, the rest the training split.
- stratified: each class's share of the training and then of the test split is
  apportioned from the class counts (`_apportion`); each class's rows, in their original
  order, are permuted and the first rows go to training, the next to test; finally both
  splits are permuted so the classes are interleaved.
"""

from __future__ import annotations

import math

import numpy as np


def test_count(n_rows: int, test_fraction: float) -> int:
  """Rows in the test split: the fraction of `n_rows` rounded up."""
  return math.ceil(test_fraction * n_rows)


def indices(n_rows: int, test_fraction: float, seed: int,
            stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(train, test) row indices of the held-out split.

  Args:
    n_rows: rows in the data set.
    test_fraction: in (0, 1); the test split has `test_count(n_rows, test_fraction)` rows.
    seed: seeds the `np.random.RandomState` every draw comes from.
    stratify: one label per row to keep class proportions in both splits, or None.

  Returns:
    int64 index arrays into the rows: (train, test).
  """
  n_test = test_count(n_rows, test_fraction)
  rng = np.random.RandomState(seed)
  if stratify is None:
    order = rng.permutation(n_rows)
    return order[n_test:], order[:n_test]
  return _stratified(np.asarray(stratify), n_rows - n_test, n_test, rng)


def train_test(x, y: np.ndarray, test_fraction: float, seed: int, stratified: bool):
  """Splits `x` (an array or a DataFrame) and `y` by `indices`.

  Returns:
    (train_x, test_x, train_y, test_y); a DataFrame keeps its index labels.
  """
  train, test = indices(len(y), test_fraction, seed, stratify=y if stratified else None)
  return _rows(x, train), _rows(x, test), y[train], y[test]


def _rows(x, where: np.ndarray):
  return x.iloc[where] if hasattr(x, "iloc") else x[where]


def _stratified(labels: np.ndarray, n_train: int, n_test: int, rng: np.random.RandomState):
  """(train, test) indices with each class apportioned to both splits."""
  _, class_of_row, counts = np.unique(labels, return_inverse=True, return_counts=True)
  # Each class's rows in their original order, classes in sorted label order.
  by_class = np.split(np.argsort(class_of_row, kind="stable"), np.cumsum(counts)[:-1])
  train_counts = _apportion(counts, n_train, rng)
  test_counts = _apportion(counts - train_counts, n_test, rng)
  train, test = [], []
  for rows, n_class_train, n_class_test in zip(by_class, train_counts, test_counts):
    shuffled = rows[rng.permutation(len(rows))]
    train.append(shuffled[:n_class_train])
    test.append(shuffled[n_class_train:n_class_train + n_class_test])
  return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _apportion(counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
  """How many of `n_draws` rows each class gets: its proportional share rounded down, then
  one more for the classes with the largest fractional parts until the total is reached.

  Classes whose fractional parts are equal are served in a random order (one `choice`
  per distinct fraction, largest first), so no class is favoured by its position.
  """
  share = counts / counts.sum() * n_draws  # this order of operations fixes the rounding
  whole = np.floor(share)
  missing = int(n_draws - whole.sum())
  fraction = share - whole
  for value in np.unique(fraction)[::-1]:
    if missing == 0:
      break
    tied = np.flatnonzero(fraction == value)
    take = min(len(tied), missing)
    whole[rng.choice(tied, size=take, replace=False)] += 1
    missing -= take
  return whole.astype(np.int64)
