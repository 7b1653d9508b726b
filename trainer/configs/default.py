"""Default workload: an MLP on scikit-learn's embedded 8x8 digits (10 classes).

    python -m trainer

Needs no download (the data ships with scikit-learn). About 20 s on 2 CPU cores
with 8 virtual devices; held-out accuracy about 0.97.
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "default"
  config.data.source = "embedded"
  config.data.name = "digits"
  config.model = models.config("mlp", hidden=(128, 128))
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 50
  config.train.steps = 1000
  config.train.batch_size = 128
  return config
