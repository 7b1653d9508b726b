"""Models: flax modules whose `apply(params, x)` is pure; one registry keyed by name.

A binary problem gets one output and a sigmoid (the tutorial's logistic regression);
K > 2 classes get K outputs and a softmax.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trainer.errors import UserError

_ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh}


class LogisticRegression(nn.Module):
  """Logistic (one output) or softmax (K outputs) regression: one dense layer."""

  num_outputs: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_outputs, name="linear")(x)


class MLP(nn.Module):
  """Fully connected network with the given hidden widths."""

  hidden: Sequence[int]
  num_outputs: int
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    act = _ACTIVATIONS[self.activation]
    for i, width in enumerate(self.hidden):
      x = act(nn.Dense(width, name=f"hidden_{i}")(x))
    return nn.Dense(self.num_outputs, name="head")(x)


def num_outputs(num_classes: int) -> int:
  return 1 if num_classes == 2 else num_classes


def create(config, num_classes: int) -> nn.Module:
  """Returns the flax module the config names. Raises UserError for an unknown name."""
  name = config.model.name
  outputs = num_outputs(num_classes)
  if name == "logreg":
    return LogisticRegression(outputs)
  if name == "mlp":
    if config.model.activation not in _ACTIVATIONS:
      raise UserError(f"config.model.activation={config.model.activation!r}: expected one of"
                      f" {', '.join(_ACTIVATIONS)}")
    hidden = tuple(int(h) for h in config.model.hidden)
    return MLP(hidden, outputs, config.model.activation)
  raise UserError(f"config.model.name={name!r}: expected logreg or mlp")


def loss_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy: sigmoid for one output, softmax otherwise."""
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
