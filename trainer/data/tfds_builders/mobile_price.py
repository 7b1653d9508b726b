"""TFDS builder for the Kaggle Mobile Price training CSV (the tutorial's data).

The CSV is read from the manual directory (`train.csv` there) through the trainer's own
checked CSV reader, and split 80/20 stratified by price range (seed 0), the same split
the `csv` source makes. Features: 20 float32 columns; label: price range 0..3.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from sklearn import model_selection

from trainer.data import csv_source

_NUM_FEATURES = 20


class MobilePrice(tfds.core.GeneratorBasedBuilder):
  """Mobile Price Classification (Kaggle, MIT licence): 2000 phones, 4 price ranges."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the Kaggle Mobile Price train.csv in the manual dir."

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(_NUM_FEATURES,), dtype=np.float32),
            "label": tfds.features.ClassLabel(names=["0", "1", "2", "3"]),
        }),
        supervised_keys=("features", "label"),
    )

  def _split_generators(self, dl_manager):
    path = dl_manager.manual_dir / "train.csv"
    frame, features = csv_source.read_table(str(path), "price_range", [])  # cells as text
    x = frame[features].astype(np.float32).to_numpy()
    y = frame["price_range"].astype(np.int64).to_numpy()
    train_x, test_x, train_y, test_y = model_selection.train_test_split(
        x, y, test_size=0.2, stratify=y, random_state=0)
    return {"train": self._generate_examples(train_x, train_y),
            "test": self._generate_examples(test_x, test_y)}

  def _generate_examples(self, x, y):
    for i, (features, label) in enumerate(zip(x, y)):
      yield i, {"features": features.astype(np.float32), "label": int(label)}
