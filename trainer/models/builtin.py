"""The built-in models, each a factory whose keyword arguments are its `config.model` keys.

The registry (`trainer/registry.py`) names them `logreg`, `mlp`, `cnn` and `transformer`;
a user's model is resolved the same way, by `module:attribute`. `num_outputs` is not a
config key: the trainer passes the width the task asks for (1 for a binary classifier or
a regression, K for K classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from trainer.errors import UserError
from trainer.models import cnn as cnn_module
from trainer.models import transformer as transformer_module

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh}


class LogisticRegression(nn.Module):
  """Logistic (one output) or softmax (K outputs) regression: one dense layer."""

  num_outputs: int
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="linear")(x)


class MLP(nn.Module):
  """Fully connected network with the given hidden widths."""

  hidden: Sequence[int]
  num_outputs: int
  activation: str = "relu"
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x):
    act = _ACTIVATIONS[self.activation]
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, dtype=self.dtype, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x)


def _dtype(name: str):
  try:
    return transformer_module.compute_dtype(name)
  except KeyError:
    raise UserError(f"config.model.dtype={name!r}: expected float32 or bfloat16") from None


def logreg(*, num_outputs: int, dtype: str = "float32") -> nn.Module:
  """One dense layer: sigmoid (binary) or softmax logistic regression."""
  return LogisticRegression(num_outputs, _dtype(dtype))


def mlp(*, num_outputs: int, hidden: Sequence[int] = (128, 128), activation: str = "relu",
        dtype: str = "float32") -> nn.Module:
  """A fully connected network; `activation` is relu, gelu or tanh."""
  if activation not in _ACTIVATIONS:
    raise UserError(f"config.model.activation={activation!r}: expected one of"
                    f" {', '.join(_ACTIVATIONS)}")
  widths = tuple(hidden) if isinstance(hidden, (list, tuple)) else (hidden,)
  whole = lambda h: (isinstance(h, (int, float)) and not isinstance(h, bool)
                     and float(h).is_integer())
  if not all(whole(h) for h in widths):  # int(1.5) would quietly make it 1
    raise UserError(f"config.model.hidden={hidden!r}: expected whole layer widths, e.g."
                    " 128,128")
  return MLP(tuple(int(h) for h in widths), num_outputs, activation, _dtype(dtype))


def cnn(*, num_outputs: int, conv_features: Sequence[int] = (32, 64), dense: int = 128,
        dtype: str = "float32") -> nn.Module:
  """3x3 conv blocks, a dense layer and the head, for `[B, H, W, C]` images."""
  return cnn_module.CNN(num_outputs, tuple(int(f) for f in conv_features), int(dense),
                        _dtype(dtype))


def transformer(*, vocab_size: int = 256, seq_len: int = 128, d_model: int = 128,
                num_layers: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
                tie_embeddings: bool = True, dtype: str = "float32",
                attention: str = "xla") -> nn.Module:
  """The causal LM of `transformer.py`; its vocabulary comes from the config, not the data.

  `attention` is xla, cudnn (GPU, bf16) or auto.
  """
  compute = _dtype(dtype)
  try:
    impl = transformer_module.attention_implementation(attention)
  except KeyError:
    raise UserError(f"config.model.attention={attention!r}: expected xla, cudnn or"
                    " auto") from None
  sizes = dict(vocab_size=vocab_size, seq_len=seq_len, d_model=d_model, num_layers=num_layers,
               num_heads=num_heads)
  for key, value in sizes.items():
    if int(value) <= 0:
      raise UserError(f"config.model.{key}={value!r}: expected a positive integer")
  if d_model % num_heads:
    raise UserError(f"config.model.d_model={d_model} must be a multiple of"
                    f" config.model.num_heads={num_heads}")
  return transformer_module.TransformerLM(
      **{k: int(v) for k, v in sizes.items()}, mlp_ratio=int(mlp_ratio),
      tie_embeddings=bool(tie_embeddings), dtype=compute, attention=impl)
