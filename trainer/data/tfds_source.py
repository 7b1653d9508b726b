"""TFDS data: any prepared TFDS data set by name, split and `data_dir` (local or gs://).

Reads through `tfds.data_source` (ArrayRecord, random access, no TensorFlow needed). The
training split is never loaded whole: `Records[idx]` reads just the examples of this
process's slice of each global batch, so every process reads only its shard, in the
deterministic (seed, step) order of `trainer.data`. The held-out split is read into
memory once (evaluation covers all of it). Each batch's examples are read with one
`__getitems__` call and decoded once for both the feature and the label (the loop asks
for `train_x[idx]` and then `train_y[idx]`); decoding is still per example in Python,
so small data sets train faster from the csv or embedded sources. uint8 images are
scaled to [0, 1]; float features are standardised with statistics of the training split.

Preparing data once, e.g. onto GCS (`python -m trainer.data.prepare_tfds`), then
`--config.data.source=tfds --config.data.name=NAME --config.data.data_dir=gs://...`.
"""

from __future__ import annotations

import numpy as np

from trainer.errors import UserError

_STATS_SAMPLE = 10_000  # training examples used for the standardisation statistics


class Split:
  """A TFDS split read a batch of rows at a time, every wanted feature decoded once.

  The last batch read is kept: the features of the same rows asked for one after the
  other (`train_x[idx]`, then `train_y[idx]`) cost one read and one decode.
  """

  def __init__(self, source, keys: tuple[str, ...]):
    self._source, self._keys = source, keys
    self._last_rows: bytes | None = None
    self._last: dict[str, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._source)

  def read(self, index, key: str) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    rows = np.atleast_1d(np.asarray(index, np.int64))
    if rows.tobytes() != self._last_rows:
      examples = self._source.__getitems__([int(i) for i in rows])
      self._last = {k: np.stack([np.asarray(e[k]) for e in examples]) for k in self._keys}
      self._last_rows = rows.tobytes()
    return self._last[key]


class Records:
  """One feature of a `Split` as an indexable array: `records[idx] -> np.ndarray`."""

  def __init__(self, split: Split, key: str, transform):
    self._split, self._key, self._transform = split, key, transform
    first = self[np.arange(1)]
    self.shape = (len(split),) + first.shape[1:]
    self.dtype = first.dtype

  def __len__(self) -> int:
    return len(self._split)

  def __getitem__(self, index) -> np.ndarray:
    return self._transform(self._split.read(index, self._key))


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError("config.data.source=tfds needs tensorflow-datasets: pip install"
                    " 'jaxjob[tfds]'") from None
  return tfds


def load(config):
  """(train_x, train_y, test_x, test_y, class_names, feature_names, stats) of a TFDS set."""
  tfds = _tfds()
  d = config.data
  kwargs = {"data_dir": d.data_dir} if d.data_dir else {}
  try:
    builder = tfds.builder(d.name, **kwargs)
    # Prepared data only: a run never downloads (with no network it tried for minutes).
    train, test = (tfds.data_source(d.name, split=s, download=False, **kwargs)
                   for s in (d.train_split, d.test_split))
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"TFDS data set {d.name!r} (splits {d.train_split!r}, {d.test_split!r},"
                    f" data_dir {d.data_dir or 'default'!r}) cannot be read: {first}") from None
  features = builder.info.features
  for key in (d.feature_key, d.label_key):
    if key not in features:
      raise UserError(f"config.data: TFDS data set {d.name!r} has no feature {key!r};"
                      f" features are {', '.join(features)}")
  class_names = list(features[d.label_key].names)
  keys = (d.feature_key, d.label_key)
  train, test = Split(train, keys), Split(test, keys)
  raw = Records(train, d.feature_key, lambda a: a)
  if raw.dtype == np.uint8:
    transform, stats = (lambda a: a.astype(np.float32) / 255.0), {"scale": 1 / 255}
  elif d.standardize:
    sample = raw[np.arange(min(len(raw), _STATS_SAMPLE))].astype(np.float64)
    mean, std = sample.mean(axis=0), sample.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    transform = lambda a: ((a - mean) / std).astype(np.float32)
    stats = {"mean": mean.tolist(), "std": std.tolist()}
  else:
    transform, stats = (lambda a: a.astype(np.float32)), {}
  labels = lambda a: a.astype(np.int32)
  train_x, train_y = Records(train, d.feature_key, transform), Records(train, d.label_key, labels)
  # Both Records first (their shape probes read row 0), then the rows: one read of each.
  test_x, test_y = Records(test, d.feature_key, transform), Records(test, d.label_key, labels)
  every = np.arange(len(test))
  test_x, test_y = test_x[every], test_y[every]
  names = [f"{d.feature_key}[{i}]" for i in range(int(np.prod(raw.shape[1:])))]
  return train_x, train_y, test_x, test_y, class_names, names, stats
