"""Models: flax modules whose `apply(params, x)` is pure; one registry keyed by name.

A binary problem gets one output and a sigmoid (the tutorial's logistic regression);
K > 2 classes get K outputs and a softmax. The `transformer` language model returns
`[B, T, vocab]` logits, which the same softmax cross-entropy scores against `[B, T]`
next-token labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trainer.errors import UserError
from trainer.models import cnn
from trainer.models import transformer

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


def num_outputs(num_classes: int) -> int:
  return 1 if num_classes == 2 else num_classes


def create(config, num_classes: int) -> nn.Module:
  """Returns the flax module the config names. Raises UserError for an unknown name."""
  name = config.model.name
  outputs = num_outputs(num_classes)
  if name in ("logreg", "mlp", "cnn"):
    try:
      dtype = transformer.compute_dtype(config.model.dtype)
    except KeyError:
      raise UserError(f"config.model.dtype={config.model.dtype!r}: expected float32 or"
                      " bfloat16") from None
  if name == "logreg":
    return LogisticRegression(outputs, dtype)
  if name == "mlp":
    if config.model.activation not in _ACTIVATIONS:
      raise UserError(f"config.model.activation={config.model.activation!r}: expected one of"
                      f" {', '.join(_ACTIVATIONS)}")
    hidden = tuple(int(h) for h in config.model.hidden)
    return MLP(hidden, outputs, config.model.activation, dtype)
  if name == "cnn":
    return cnn.CNN(outputs, tuple(int(f) for f in config.model.conv_features),
                   int(config.model.dense), dtype)
  if name == "transformer":
    return _transformer(config.model)
  raise UserError(f"config.model.name={name!r}: expected logreg, mlp, cnn or transformer")


def _transformer(model) -> nn.Module:
  """The causal LM of `transformer.py`; its vocabulary comes from the config, not the data."""
  try:
    dtype = transformer.compute_dtype(model.dtype)
  except KeyError:
    raise UserError(f"config.model.dtype={model.dtype!r}: expected float32 or bfloat16") from None
  try:
    attention = transformer.attention_implementation(model.attention)
  except KeyError:
    raise UserError(f"config.model.attention={model.attention!r}: expected xla, cudnn or"
                    " auto") from None
  for key in ("vocab_size", "seq_len", "d_model", "num_layers", "num_heads"):
    if int(model[key]) <= 0:
      raise UserError(f"config.model.{key}={model[key]!r}: expected a positive integer")
  if model.d_model % model.num_heads:
    raise UserError(f"config.model.d_model={model.d_model} must be a multiple of"
                    f" config.model.num_heads={model.num_heads}")
  return transformer.TransformerLM(
      vocab_size=int(model.vocab_size), seq_len=int(model.seq_len), d_model=int(model.d_model),
      num_layers=int(model.num_layers), num_heads=int(model.num_heads),
      mlp_ratio=int(model.mlp_ratio), tie_embeddings=bool(model.tie_embeddings), dtype=dtype,
      attention=attention)


def loss_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy in float32 (also for bf16 logits): sigmoid for one output, else softmax."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    return optax.sigmoid_binary_cross_entropy(logits[..., 0], labels.astype(logits.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities [..., num_classes], also for the one-output binary model."""
  if logits.shape[-1] == 1:
    p1 = jax.nn.sigmoid(logits[..., 0])
    return jnp.stack([1.0 - p1, p1], axis=-1)
  return jax.nn.softmax(logits, axis=-1)


def predictions(logits: jax.Array) -> jax.Array:
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
