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
  config.data.source = "embedded"  # embedded | csv | synthetic | tfds | tokens (language models)
  config.data.name = "digits"  # embedded: digits | breast_cancer | wine | iris; tfds: a TFDS name
  config.data.path = ""  # csv: local path or gs:// URL
  config.data.label_column = "price_range"  # csv: the label column
  config.data.feature_columns = ""  # csv: comma-separated; empty = every other column
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

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"  # logreg | mlp | transformer
  config.model.hidden = (128, 128)  # mlp: hidden layer widths
  config.model.activation = "relu"  # mlp: relu | gelu | tanh
  config.model.conv_features = (32, 64)  # cnn: channels of the 3x3 conv blocks
  config.model.dense = 128  # cnn: width of the dense layer before the head
  config.model.vocab_size = 256  # transformer: token ids are in [0, vocab_size)
  config.model.seq_len = 128  # transformer: context length T (data windows hold T + 1 tokens)
  config.model.d_model = 128  # transformer: residual stream width
  config.model.num_layers = 2  # transformer: blocks
  config.model.num_heads = 4  # transformer: attention heads (divides d_model)
  config.model.mlp_ratio = 4  # transformer: MLP hidden width / d_model
  config.model.tie_embeddings = True  # transformer: head shares the token embedding
  config.model.dtype = "float32"  # compute dtype of every model: float32 | bfloat16 (params f32)
  config.model.attention = "xla"  # transformer: xla | cudnn (GPU, bf16) | auto

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # sgd | adam | adamw
  config.optimizer.learning_rate = 1e-3  # peak learning rate
  config.optimizer.schedule = "constant"  # constant | cosine | warmup_cosine
  config.optimizer.warmup_steps = 0  # warmup_cosine: linear warmup length
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.grad_clip_norm = 0.0  # clip gradients to this global norm; 0 = off
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
  config.train.grad_accum_steps = 1  # micro-batches per step (gradients averaged)
  config.train.ema_decay = 0.0  # >0 keeps an EMA of params (e.g. 0.999), used for eval
  config.train.watchdog_timeout = 600  # abort (exit 134) when no step ends for this long; 0 = off

  config.parallel = ml_collections.ConfigDict()
  config.parallel.strategy = "sharding"  # sharding (jit + NamedSharding) | pmap (lax.pmean)
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
