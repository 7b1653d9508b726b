"""A data source with random access by index: scikit-learn's 8x8 digits, 64 features.

`DigitsRows` follows Grain's `RandomAccessDataSource` protocol (`__len__`, and
`__getitem__` returning one row as a dict of numpy values), so the trainer reads each
batch's rows in its (seed, step)-pure order and every process reads only its own slice.
`digits(...)` is the loader `config.data.source` names: its keyword arguments are the
other keys of `config.data` (and `seed`, which the trainer passes).
"""

import numpy as np

from trainer import data

_SCALE = 16.0  # pixel values are 0..16


class DigitsRows:
  """Rows `indices` of the digits set: {"x": float32 [64] in [0, 1], "y": int32}."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    self._images, self._labels, self._indices = images, labels, indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int) -> dict:
    row = self._indices[i]
    return {"x": (self._images[row] / _SCALE).astype(np.float32),
            "y": np.int32(self._labels[row])}


def digits(test_fraction: float = 0.2, seed: int = 0) -> data.Dataset:
  """A seeded random split of the digits into a training and a held-out source."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  order = np.random.default_rng(seed).permutation(len(bunch.target))
  n_test = int(round(len(order) * float(test_fraction)))
  train = DigitsRows(bunch.data, bunch.target, order[n_test:])
  test = DigitsRows(bunch.data, bunch.target, order[:n_test])
  names = [str(n) for n in bunch.feature_names]
  # Prediction standardises raw rows with these: (x - 0) / 16, the source's own scaling.
  stats = {"mean": [0.0] * len(names), "std": [_SCALE] * len(names)}
  return data.from_sources(train, test, task="classification",
                           class_names=[str(c) for c in range(10)], feature_names=names,
                           stats=stats)
