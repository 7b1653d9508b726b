"""The CNN on MNIST from TFDS (28x28x1 images, 10 classes).

    python -m trainer --config=trainer/configs/mnist_cnn.py --config.data.data_dir=DIR

DIR (local or gs://) must hold MNIST prepared in the ArrayRecord format, e.g. made once
on a machine with network access by
`python -c "import tensorflow_datasets as tfds; tfds.builder('mnist', data_dir='DIR', file_format='array_record').download_and_prepare()"`.
`cifar10` works the same way (`--config.data.name=cifar10`). Not run on this machine
(no download here); the same code path is tested with TFDS's `mock_data`.
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "mnist_cnn"
  config.data.source = "tfds"
  config.data.name = "mnist"
  config.data.feature_key = "image"
  config.data.label_key = "label"
  config.model = models.config("cnn")
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100
  config.train.steps = 2000
  config.train.batch_size = 256
  config.train.eval_every = 1000
  config.train.checkpoint_every = 500
  return config
