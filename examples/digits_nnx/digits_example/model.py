"""A Flax NNX classifier with BatchNorm and Dropout.

Its constructor's keyword arguments (less `rngs`) are its `config.model` keys; the
trainer passes `num_outputs` (the number of classes) and `train` (True in the training
step: Dropout on, batch statistics updated; False in evaluation and prediction).
"""

from flax import nnx


class Classifier(nnx.Module):
  """Dense -> BatchNorm -> ReLU -> Dropout, `depth` times, then a dense head."""

  def __init__(self, num_outputs: int, num_features: int = 64, hidden: int = 128,
               depth: int = 2, dropout: float = 0.1, *, rngs: nnx.Rngs):
    widths = [num_features] + [hidden] * depth
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths, widths[1:])])
    self.norms = nnx.List([nnx.BatchNorm(hidden, rngs=rngs) for _ in range(depth)])
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(hidden, num_outputs, rngs=rngs)

  def __call__(self, x, train: bool = False):
    for layer, norm in zip(self.layers, self.norms):
      x = norm(layer(x), use_running_average=not train)
      x = self.dropout(nnx.relu(x), deterministic=not train)
    return self.head(x)
