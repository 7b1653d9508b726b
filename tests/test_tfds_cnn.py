"""TFDS source (a real data set prepared locally, and a catalogue set by name) and the CNN."""

import json
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tests.conftest import DATA_DIR, tiny_config
from trainer import data
from trainer import train
from trainer.data import prepare_tfds
from trainer.errors import UserError


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  builder = prepare_tfds.prepare("mobile_price", str(DATA_DIR), str(directory))
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {"train": 1600,
                                                                        "test": 400}
  return directory


def test_prepared_mobile_price_trains_like_the_csv_source(tfds_dir, tmp_path):
  config = tiny_config("mobile_price_tfds.py", data__data_dir=str(tfds_dir))
  ds = data.load(config)
  assert ds.train_x.shape == (1600, 20) and ds.test_x.shape == (400, 20)
  assert ds.class_names == ["0", "1", "2", "3"]
  batch = ds.train_x[data.process_batch_indices(0, 3, 64, 1600, 1, 2)]
  assert batch.shape == (32, 20) and batch.dtype == np.float32
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["eval"]["accuracy"] > 0.93 and summary["eval"]["num_examples"] == 400


class _CountingSource:
  """A real TFDS data source that counts the examples it reads and decodes.

  With `batched=False`, `__getitems__` reads row by row: `tfds.testing.mock_data`
  (tensorflow-datasets 4.9.10) installs its `__getitems__` without the `self` argument,
  so the mocked source's own batched read raises a TypeError.
  """

  def __init__(self, source, batched: bool = True):
    self._source, self._batched, self.examples = source, batched, 0

  def __len__(self):
    return len(self._source)

  def __getitem__(self, key):
    self.examples += 1
    return self._source[key]

  def __getitems__(self, keys):
    self.examples += len(keys)
    if not self._batched:
      return [self._source[k] for k in keys]
    return self._source.__getitems__(keys)


def test_a_batch_is_read_and_decoded_once(tfds_dir, monkeypatch):
  sources = {}
  real_data_source = tfds.data_source

  def counting_data_source(name, split, **kwargs):
    sources[split] = _CountingSource(real_data_source(name, split=split, **kwargs))
    return sources[split]

  monkeypatch.setattr(tfds, "data_source", counting_data_source)
  ds = data.load(tiny_config("mobile_price_tfds.py", data__data_dir=str(tfds_dir)))
  assert sources["test"].examples == 1 + 400  # the shape probe, then x and y of every row
  idx = data.process_batch_indices(0, 5, 64, 1600, 0, 1)
  train = sources["train"]
  before = train.examples
  x, y = ds.train_x[idx], ds.train_y[idx]
  assert train.examples - before == 64
  assert x.shape == (64, 20) and y.shape == (64,) and y.dtype == np.int32
  expected = real_data_source("mobile_price", split="train", data_dir=str(tfds_dir))
  assert [int(expected[int(i)]["label"]) for i in idx] == y.tolist()


def test_unknown_tfds_set_or_feature_is_a_user_error(tfds_dir):
  with pytest.raises(UserError, match="cannot be read"):
    data.load(tiny_config("mobile_price_tfds.py", data__data_dir=str(tfds_dir),
                          data__name="no_such_set"))
  with pytest.raises(UserError, match="has no feature 'pixels'"):
    data.load(tiny_config("mobile_price_tfds.py", data__data_dir=str(tfds_dir),
                          data__feature_key="pixels"))


def test_a_set_not_prepared_in_data_dir_is_refused_at_once_not_downloaded(tmp_path):
  # Without the prepared files, TFDS would download MNIST (minutes without a network,
  # a run reads prepared files only: trainer/configs/mnist_cnn.py says how to prepare).
  started = time.monotonic()
  with pytest.raises(UserError, match="TFDS data set 'mnist' .* cannot be read"):
    data.load(tiny_config("mnist_cnn.py", data__data_dir=str(tmp_path)))
  assert time.monotonic() - started < 30
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or half-prepared


def test_mnist_by_name_with_the_cnn(tmp_path, monkeypatch):
  # No download here: TFDS's own mock_data serves random examples with MNIST's real
  # feature spec through the same tfds.data_source path.
  config = tiny_config("mnist_cnn.py", train__steps=10, train__batch_size=16,
                       train__eval_every=10, train__checkpoint_every=10,
                       optimizer__warmup_steps=2)
  with tfds.testing.mock_data(num_examples=64):
    mocked = tfds.data_source
    monkeypatch.setattr(tfds, "data_source", lambda *args, **kwargs: _CountingSource(
        mocked(*args, **kwargs), batched=False))
    ds = data.load(config)
    assert ds.train_x.shape == (64, 28, 28, 1) and float(ds.train_x[np.arange(4)].max()) <= 1
    summary = train.train_and_evaluate(config, str(tmp_path / "mnist"))
  assert summary["final_step"] == 10 and summary["num_devices"] == 8


@pytest.mark.slow
def test_cnn_learns_the_embedded_digit_images(tmp_path):
  config = tiny_config("digits_cnn.py", train__steps=300, train__eval_every=300,
                       train__checkpoint_every=300)
  summary = train.train_and_evaluate(config, str(tmp_path / "cnn"))
  assert summary["eval"]["accuracy"] > 0.95
  stats = json.loads((tmp_path / "cnn" / "data_stats.json").read_text())
  assert len(stats["classes"]) == 10
