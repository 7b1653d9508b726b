"""Models: any flax Linen or NNX module behind one `Model` interface, named by the registry.

`config.model.name` is a built-in name (`logreg`, `mlp`, `cnn`, `transformer`, see
`builtin.py`) or `module:attribute` naming a Linen module class, an NNX module class or
a factory function returning a Linen module. The other keys of `config.model` are its
keyword arguments; a key it does not take is an error naming the model and the keys it
accepts. `num_outputs`, when the model takes it and the config does not set it, comes
from the task (1 for a binary classifier or a regression, K for K classes).

An NNX module is wrapped with `flax.nnx.bridge.to_linen`, so every model's state is the
same pytree of variable collections: `params` (trained) and, when the model has them,
mutable collections such as BatchNorm's `batch_stats` (the TrainState's `model_state`).
A module whose `__call__` takes `train` gets `train=True` in the training step (Dropout
active, batch statistics updated) and `train=False` in evaluation and prediction; its
Dropout draws from the `dropout` RNG stream, which the step derives from (seed, step).
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import jax
import ml_collections

from trainer import registry
from trainer.errors import UserError


def _is_nnx_class(obj) -> bool:
  # An NNX class's module has imported flax.nnx; importing it for a Linen model costs ~0.4 s.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(obj, type) and issubclass(obj, nnx.Module)


def _module_from(obj, kwargs: dict):
  """A Linen module from a Linen class, an NNX class or a factory, with `kwargs`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if _is_nnx_class(obj):
    from flax.nnx import bridge  # pylint: disable=g-import-not-at-top
    return bridge.to_linen(obj, **kwargs)
  module = obj(**kwargs)
  if not isinstance(module, nn.Module):
    raise UserError(f"config.model.name: {obj!r} returned {type(module).__name__}; expected a"
                    " flax Linen module (or name an NNX module class)")
  return module


class Model:
  """One interface over Linen and NNX modules: init, and apply with or without training."""

  def __init__(self, module, name: str = ""):
    self.module = module
    self.name = name or type(module).__name__
    call = module.__call__ if not hasattr(module, "nnx_class") else module.nnx_class.__call__
    self._takes_train = "train" in inspect.signature(call).parameters

  def _train_kwargs(self, train: bool) -> dict:
    return {"train": train} if self._takes_train else {}

  def init(self, rng, x) -> tuple[Any, Any]:
    """(params, model_state) for an example input; model_state is None when stateless."""
    # `rng` itself is the params stream (as in `module.init(rng, x)`), so a model without
    # dropout initialises exactly as it always did.
    rngs = {"params": rng, "dropout": jax.random.fold_in(rng, 1)}
    variables = dict(self.module.init(rngs, x, **self._train_kwargs(False)))
    params = variables.pop("params")
    return params, (variables or None)

  def apply(self, params, model_state, x, *, train: bool = False, rng=None):
    """(outputs, new model_state). `rng` feeds the `dropout` stream when training."""
    variables = {"params": params, **(model_state or {})}
    rngs = {"dropout": rng} if rng is not None else None
    kwargs = self._train_kwargs(train)
    if train and model_state:
      outputs, updates = self.module.apply(variables, x, rngs=rngs, mutable=list(model_state),
                                           **kwargs)
      return outputs, dict(updates)
    return self.module.apply(variables, x, rngs=rngs, **kwargs), model_state

  def eval_apply(self, variables, x):
    """Outputs in evaluation mode for `{"params": ..., **model_state}` (jit-able, stable)."""
    return self.module.apply(variables, x, **self._train_kwargs(False))


def create(model_config, num_outputs: int | None = None) -> Model:
  """The model `model_config` names (`name` plus its keyword arguments).

  Raises:
    UserError: unknown model, a key it does not take, or a bad value.
  """
  name = model_config["name"]
  obj = registry.resolve("model", name)
  accepted = registry.accepted_keys(obj)
  given = {k: _plain(v) for k, v in model_config.items() if k != "name"}
  registry.check_keys("model", name, given,
                      {k: v for k, v in accepted.items() if k != "num_outputs"})
  if "num_outputs" in accepted and "num_outputs" not in given:
    if num_outputs is None:
      raise UserError(f"config.model.name={name!r} takes num_outputs, which this task does not"
                      " set; give config.model.num_outputs")
    given["num_outputs"] = num_outputs
  try:
    module = _module_from(obj, given)
  except UserError:
    raise
  except (TypeError, ValueError) as e:
    raise UserError(f"config.model ({name!r}): {e}") from None
  return Model(module, name if isinstance(name, str) else getattr(name, "__name__", ""))


def config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.model` for `name`: every key it accepts with its default, then `overrides`.

  A workload file sets `config.model = models.config("mlp", hidden=(64,))`, so every
  key of the model exists in the config and `--config.model.KEY=...` can override it.
  A required key (no default) must be in `overrides`.
  """
  obj = registry.resolve("model", name)
  accepted = {k: v for k, v in registry.accepted_keys(obj).items() if k != "num_outputs"}
  registry.check_keys("model", name, overrides, accepted)
  values = {k: v for k, v in accepted.items() if v is not registry.REQUIRED}
  values.update(overrides)
  return ml_collections.ConfigDict({"name": name, **{k: _config_value(v)
                                                     for k, v in values.items()}})


def explain_override(config_path: str, key: str, name: str | None = None) -> str:
  """Why `--config.model.KEY=...` cannot apply to the config file at `config_path`.

  Overrides only change keys the config file has (ml_collections cannot add one from the
  command line); `models.config(name, ...)` in the file gives every key the model takes.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("_jaxjob_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  name = name or module.get_config().model.name
  accepted = {k for k in registry.accepted_keys(registry.resolve("model", name))
              if k != "num_outputs"}
  if key not in accepted:
    return (f"config.model.{key}: model {name!r} takes no such key; it accepts"
            f" {', '.join(sorted(accepted)) or 'none'}")
  return (f"config.model.{key}: model {name!r} takes it, but {config_path} does not set it;"
          f" overrides change only keys the config file has (set config.model with"
          f" models.config({name!r}, ...), which lists every key)")


def _config_value(value):
  return tuple(value) if isinstance(value, list) else value


def _plain(value):
  """ConfigDict values as the plain Python values a constructor expects."""
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return value


