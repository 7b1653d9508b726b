"""A tiny causal transformer language model on synthetic tokens: the LM's smoke test.

    python -m trainer --config=trainer/configs/lm_tiny.py

No download: the tokens come from a random sparse Markov chain (4 successors per
token, seeded), whose entropy, about ln 4 = 1.39 nats, is the floor of the loss. About
30 s on 2 CPU cores (1 device); the training loss falls from ln 256 = 5.55 to about
1.5 and the held-out loss ends near 1.5 (perplexity about 4.5). For real text, point
it at a flat uint16 token file (e.g. GPT-2 BPE ids, nanoGPT's train.bin) with a
matching vocabulary:

    python -m trainer --config=trainer/configs/lm_tiny.py \\
        --config.data.token_path=train.bin --config.model.vocab_size=50304
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "lm_tiny"
  config.data.source = "tokens"
  config.data.num_tokens = 200_000
  config.data.test_fraction = 0.05
  config.data.standardize = False
  config.model = models.config("transformer", vocab_size=256, seq_len=64, d_model=64,
                               num_layers=2, num_heads=4, dtype="float32")
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 30
  config.optimizer.weight_decay = 0.01
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.log_every = 50
  config.train.eval_every = 150
  config.train.checkpoint_every = 150
  return config
