"""The tutorial workload: logistic regression on the Kaggle Mobile Price data.

    python -m trainer --config=trainer/configs/mobile_price.py \
        --config.data.path=../shared/data/mobile-price/train.csv

Binary by default (price_range 0 vs 1, sigmoid logistic regression); all four price
ranges with softmax regression:

    python -m trainer --config=trainer/configs/mobile_price.py \
        --config.data.path=../shared/data/mobile-price/train.csv --config.data.classes=

Features are standardised with statistics fitted on the training split only; the
split is stratified (80/20). About 15 s on 2 CPU cores; held-out accuracy 0.985
(binary) and 0.96 (4 classes); see README for the scikit-learn comparison.
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "mobile_price"
  config.data.source = "csv"
  config.data.path = ""  # Required: e.g. ../shared/data/mobile-price/train.csv
  config.data.label_column = "price_range"
  config.data.classes = "0,1"
  config.model = models.config("logreg")
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.05
  config.optimizer.schedule = "cosine"
  # L2 of 1 / (C * n_train) with C = 1 matches scikit-learn's default penalty.
  config.optimizer.weight_decay = 1e-3
  config.train.steps = 1000
  config.train.batch_size = 256
  config.train.eval_every = 250
  return config
