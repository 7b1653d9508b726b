"""Regression: scikit-learn's embedded diabetes set (10 features, a disease-progression score).

    python -m trainer --config=trainer/configs/diabetes.py

No download; about 15 s on 2 CPU cores; held-out R² about 0.33 (LinearRegression on the
same split: 0.33). The target is standardised on the training split; the loss is MSE, and the
report (eval/report.json, summary.json) gives MAE, RMSE and R² in the target's units,
with plots/predicted_vs_actual.png. A linear model (an MLP without hidden layers), like
scikit-learn's LinearRegression, which tests/test_extension.py compares it with.
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "diabetes"
  config.data.source = "embedded"
  config.data.name = "diabetes"
  config.model = models.config("mlp", hidden=())
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.03
  config.optimizer.schedule = "cosine"
  config.train.steps = 1000
  config.train.batch_size = 64
  config.train.eval_every = 500
  config.train.checkpoint_every = 500
  return config
