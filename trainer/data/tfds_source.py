"""TFDS data: any prepared TFDS data set by name, split and `data_dir` (local or gs://).

Reads through `tfds.data_source` (ArrayRecord, random access, no TensorFlow needed). The
training split is never loaded whole: `Records[idx]` reads just the examples of this
process's slice of each global batch, so every process reads only its shard, in the
deterministic (seed, step) order of `trainer.data`. The held-out split is read into
memory once (evaluation covers all of it). Examples are decoded one by one in Python
(~0.2 ms each on this 2-core machine), so small data sets train faster from the csv or
embedded sources; uint8 images are scaled to [0, 1]; float
features are standardised with statistics of the training split.

Preparing data once, e.g. onto GCS (`python -m trainer.data.prepare_tfds`), then
`--config.data.source=tfds --config.data.name=NAME --config.data.data_dir=gs://...`.
"""

from __future__ import annotations

import numpy as np

from trainer.errors import UserError

_STATS_SAMPLE = 10_000  # training examples used for the standardisation statistics


class Records:
  """A TFDS split as an indexable array of one feature: `records[idx] -> np.ndarray`."""

  def __init__(self, source, key: str, transform):
    self._source, self._key, self._transform = source, key, transform
    first = self[np.arange(1)]
    self.shape = (len(source),) + first.shape[1:]
    self.dtype = first.dtype

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, slice):
      index = np.arange(len(self))[index]
    rows = [self._source[int(i)] for i in np.atleast_1d(index)]
    return self._transform(np.stack([np.asarray(r[self._key]) for r in rows]))


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
    train, test = (tfds.data_source(d.name, split=s, **kwargs)
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
  every = np.arange(len(test))
  test_x = Records(test, d.feature_key, transform)[every]
  test_y = Records(test, d.label_key, labels)[every]
  names = [f"{d.feature_key}[{i}]" for i in range(int(np.prod(raw.shape[1:])))]
  return train_x, train_y, test_x, test_y, class_names, names, stats
