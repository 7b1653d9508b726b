"""The trainer's config schema, and the place each component's own section goes.

Workload files (`default.py`, `mobile_price.py`, ...) call `get_base_config()` and change
values. The trainer's sections (`train`, `optimizer`, `parallel`, `profile`,
`distributed`) are fixed: workload files never add keys there, and the config is locked
by `config_flags`, so a misspelt `--config.train.stpes=10` is an error instead of a
silent no-op. `config.model` belongs to the model it names (`models.config(name, ...)`
fills it in), and `config.data` to the data source: the built-in sources share the keys
below; a user's source (`module:attribute`) takes the section's keys as its arguments.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "default"  # Used in the default workdir name: runs/<name>-<timestamp>.
  config.seed = 0  # Data order, split and initialisation are pure functions of it.

  config.data = ml_collections.ConfigDict()
  config.data.source = "embedded"  # embedded | csv | synthetic | tfds | tokens (language models)
  config.data.name = "digits"  # embedded: digits | breast_cancer | wine | iris; tfds: a TFDS name
  config.data.path = ""  # csv: local path or gs:// URL
  config.data.label_column = "price_range"  # csv: the label column
  config.data.feature_columns = ""  # csv: comma-separated; empty = every other column
  config.data.task = "classification"  # csv: classification | regression (a numeric label)
  config.data.categorical_columns = ""  # csv: comma-separated; also any column with no number
  config.data.missing = ""  # csv: empty cells: "" = error | drop | mean | median | most_frequent
  config.data.classes = ""  # comma-separated label values to keep; empty = all
  config.data.test_fraction = 0.2  # held-out share, stratified by label
  config.data.standardize = True  # fit mean/std on the training split only
  config.data.num_examples = 4096  # synthetic: examples in the data set
  config.data.num_features = 32  # synthetic: input width
  config.data.num_classes = 4  # synthetic: label count
  config.data.images = False  # embedded digits: 8x8x1 images (for the cnn) instead of 64 features
  config.data.data_dir = ""  # tfds: data_dir with the prepared set (local or gs://); "" = default
  config.data.train_split = "train"  # tfds: training split
  config.data.test_split = "test"  # tfds: held-out split
  config.data.feature_key = "image"  # tfds: input feature
  config.data.label_key = "label"  # tfds: ClassLabel feature
  config.data.token_path = ""  # tokens: local uint16/int32 token file (memmap); empty = synthetic
  config.data.token_dtype = "uint16"  # tokens: dtype of token_path (uint16 | int32)
  config.data.num_tokens = 1_000_000  # tokens, synthetic: length of the generated stream

  # The model's own section: `name` (a built-in or module:attribute, trainer/registry.py)
  # plus its keyword arguments. Workload files set it with `models.config(name, ...)`,
  # which fills in every key the model accepts (so each is overridable from the command
  # line); a key the model does not take is an error naming the model and its keys.
  config.model = ml_collections.ConfigDict({"name": "mlp"})
  config.task = ""  # classification | lm | regression | module:attribute; "" = the data's

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd | adam | adamw | module:attribute (trainer/optimizers.py)
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
  config.optimizer.warmup_steps = 0  # warmup_cosine: linear warmup length
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
  config.optimizer.weight_decay = 0.0  # adamw: decoupled decay; others: L2 penalty in the loss
  config.optimizer.weight_decay_mask = "matrices"  # matrices | all | kernels | module:attribute

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # total optimiser steps
  config.train.batch_size = 128  # global batch over all devices of all processes
  config.train.log_every = 50  # metrics.jsonl cadence (steps)
  config.train.eval_every = 500  # held-out eval cadence (steps); always at the end
  config.train.checkpoint_every = 500  # Orbax save interval (steps); always at the end
  config.train.keep_checkpoints = 2  # committed steps kept on disk
  config.train.nonfinite_policy = "stop"  # stop: exit 3 | skip: drop the update, go on
  config.train.max_consecutive_skips = 10  # skip policy: exit 3 after this many in a row
  config.train.grad_accum_steps = 1  # micro-batches per step (gradients averaged)
  config.train.ema_decay = 0.0  # >0 keeps an EMA of params (e.g. 0.999), used for eval
  # Several optimiser steps per compiled call (one dispatch): K, or 0 = auto (picked from
  # the measured step time). Results are bit-identical for every K.
  config.train.steps_per_dispatch = 0
  # The training split on the devices, each step gathering its rows there: auto (when
  # the split is in host memory and within data_on_device_max_mb) | on | off.
  config.train.data_on_device = "auto"
  config.train.data_on_device_max_mb = 1024  # auto's bound (also <= 1/4 of device memory)
  # Host-fed data (token files, user sources, splits kept off the devices): dispatches
  # whose batches one background thread builds and transfers ahead; 0 = off.
  config.train.prefetch = 0
  config.train.watchdog_timeout = 600  # abort (exit 134) when no step ends for this long; 0 = off

  config.parallel = ml_collections.ConfigDict()
  # auto (shard_map when fsdp is 1, else sharding) | sharding (jit + NamedSharding) |
  # shard_map (jit of shard_map + an explicit pmean) | pmap
  config.parallel.strategy = "auto"
  config.parallel.data = -1  # mesh axis sizes; -1 = the rest of the devices
  config.parallel.fsdp = 1  # >1 shards params and optimiser state over this many devices

  config.profile = ml_collections.ConfigDict()
  config.profile.steps = ""  # "START,STOP": a jax.profiler trace of those steps -> <workdir>/profile
  # Observability (trainer/writers.py, trainer/profiling.py).
  config.profile.server_port = 0  # >0: jax.profiler server, process i on port + i; 0 = off
  config.report = ml_collections.ConfigDict()
  config.report.wandb_project = ""  # Weights & Biases project; "" = off (key: WANDB_API_KEY)
  config.report.wandb_entity = ""  # W&B user or team; "" = the key's default entity

  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialization_timeout = 300  # seconds to wait for every process
  config.distributed.heartbeat_timeout = 45  # seconds before a silent peer counts as dead

  return config
