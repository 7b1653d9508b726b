"""GPT-2 small (124M parameters, context 1024, bf16 compute) for one GPU.

    python -m trainer --config=trainer/configs/gpt2_small.py

12 layers, 12 heads, width 768, GPT-2's vocabulary padded to 50304 (a multiple of 128),
tied head, AdamW with warmup and cosine decay, float32 parameters and bfloat16 compute.
Synthetic tokens by default (for throughput; the loss falls toward the chain's floor of
about 1.39 nats); real text from a flat uint16 file of GPT-2 BPE ids (nanoGPT's
`train.bin` format):

    python -m trainer --config=trainer/configs/gpt2_small.py --config.data.token_path=train.bin

On GPUs with cuDNN, `--config.model.attention=cudnn` uses its fused (flash) attention.
`bench/gpu.sh` benchmarks this config (tokens/s, MFU) against a bare loop; it is far too
slow for a CPU (several seconds per step).
"""

from trainer import models
from trainer.configs import base


def get_config():
  config = base.get_base_config()
  config.name = "gpt2_small"
  config.data.source = "tokens"
  config.data.num_tokens = 4_000_000
  config.data.test_fraction = 0.01
  config.data.standardize = False
  config.model = models.config(
      "transformer", vocab_size=50304, seq_len=1024, d_model=768, num_layers=12,
      num_heads=12, dtype="bfloat16", attention="xla")
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 6e-4
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.warmup_steps = 100
  config.optimizer.weight_decay = 0.1
  config.train.steps = 1000
  config.train.batch_size = 16
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  return config
