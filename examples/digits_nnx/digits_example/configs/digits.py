"""The example project's run: its NNX model, data source and task, by import path.

    PYTHONPATH=examples/digits_nnx python -m trainer \
        --config=examples/digits_nnx/digits_example/configs/digits.py

About 30 s on 2 CPU cores with 8 virtual devices; held-out accuracy about 0.97.
"""

import ml_collections

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "digits_nnx"
  # The data section belongs to the source: its keys are the loader's arguments.
  config.data = ml_collections.ConfigDict({"source": "digits_example.data:digits",
                                           "test_fraction": 0.2})
  # Every key the model takes, with its default unless given here: each can be
  # overridden with --config.model.KEY=VALUE.
  config.model = models.config("digits_example.model:Classifier", hidden=128, dropout=0.1)
  config.task = "digits_example.task:DigitsTask"
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 20
  config.train.steps = 400
  config.train.batch_size = 64
  config.train.log_every = 50
  config.train.eval_every = 200
  config.train.checkpoint_every = 100
  return config
