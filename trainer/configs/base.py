"""The one config schema every workload shares.

Workload files (`default.py`, `mobile_price.py`, ...) call `get_base_config()` and change
values; they never add keys. The returned config is locked by `config_flags`, so a
misspelt `--config.train.stpes=10` is an error instead of a silent no-op.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "default"  # Used in the default workdir name: runs/<name>-<timestamp>.
  config.seed = 0  # Data order, split and initialisation are pure functions of it.

  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"  # embedded | csv | synthetic
  config.data.name = "digits"  # embedded: digits | breast_cancer | wine | iris
  config.data.path = ""  # csv: local path or gs:// URL
  config.data.label_column = "price_range"  # csv: the label column
  config.data.feature_columns = ""  # csv: comma-separated; empty = every other column
  config.data.classes = ""  # comma-separated label values to keep; empty = all
  config.data.test_fraction = 0.2  # held-out share, stratified by label
  config.data.standardize = True  # fit mean/std on the training split only
  config.data.num_examples = 4096  # synthetic: examples in the data set
  config.data.num_features = 32  # synthetic: input width
  config.data.num_classes = 4  # synthetic: label count

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"  # logreg | mlp
  config.model.hidden = (128, 128)  # mlp: hidden layer widths
  config.model.activation = "relu"  # mlp: relu | gelu | tanh

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd | adam | adamw
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
  config.optimizer.warmup_steps = 0  # warmup_cosine: linear warmup length
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.weight_decay = 0.0  # adamw: decoupled decay; others: L2 penalty in the loss

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # total optimiser steps
  config.train.batch_size = 128  # global batch over all devices of all processes
  config.train.log_every = 50  # metrics.jsonl cadence (steps)
  config.train.eval_every = 500  # held-out eval cadence (steps); always at the end
  config.train.checkpoint_every = 500  # Orbax save interval (steps); always at the end
  config.train.keep_checkpoints = 2  # committed steps kept on disk
  config.train.nonfinite_policy = "stop"  # stop: exit 3 | skip: drop the update, go on
  config.train.max_consecutive_skips = 10  # skip policy: exit 3 after this many in a row
  config.train.watchdog_timeout = 600  # abort (exit 134) when no step ends for this long; 0 = off

  config.parallel = ml_collections.ConfigDict()
  config.parallel.strategy = "sharding"  # sharding (jit + NamedSharding) | pmap (lax.pmean)

  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialization_timeout = 300  # seconds to wait for every process
  config.distributed.heartbeat_timeout = 45  # seconds before a silent peer counts as dead

  return config
