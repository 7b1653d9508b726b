"""A small convolutional classifier for images `[B, H, W, C]` (digits 8x8, MNIST, CIFAR-10)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class CNN(nn.Module):
  """Conv 3x3 blocks (ReLU, 2x2 average pooling while the image is at least 8 wide),
  then a dense layer and the head."""

  num_outputs: int
  features: Sequence[int] = (32, 64)
  dense: int = 128
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters stay float32

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.features):
      x = nn.relu(nn.Conv(width, (3, 3), dtype=self.dtype, name=f"conv_{i}")(x))
      if x.shape[-2] >= 8:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[:-3] + (-1,))
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype, name="dense")(x))
    return nn.Dense(self.num_outputs, dtype=self.dtype, name="head")(x)
