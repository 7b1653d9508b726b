"""Any labelled CSV: predict one column from the others.

    python -m trainer --config=trainer/configs/csv.py \
        --config.data.path=train.csv --config.data.label_column=target

Every class by default (`--config.data.classes=a,b` keeps some). String, boolean and
integer labels; columns without numbers are one-hot encoded
(`--config.data.categorical_columns=zip,colour` for categories written as numbers);
an empty cell is an error unless `--config.data.missing=drop|mean|median|most_frequent`.
A numeric target: `--config.data.task=regression`. Softmax (logistic) regression on
standardised features; `--config.model.name=mlp` for a hidden-layer network. The rules
and the accuracy against scikit-learn: README, "Your own CSV". About 25 s on 2 CPU
cores for scikit-learn's wine table (178 rows).
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "csv"
  config.data.source = "csv"
  config.data.path = ""  # Required: a local path or gs:// URL.
  config.data.label_column = ""  # Required: the column to predict.
  config.data.classes = ""
  config.data.task = "classification"
  config.model = models.config("logreg")
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.05
  config.optimizer.schedule = "cosine"
  config.optimizer.weight_decay = 1e-3
  config.train.steps = 1000
  config.train.batch_size = 128
  config.train.eval_every = 500
  return config
