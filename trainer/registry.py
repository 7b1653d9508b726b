"""One way to find a component: a built-in name, or `module:attribute` for anything importable.

Models, data sources, tasks, optimisers and weight-decay masks are all resolved here, the built-in ones
exactly as a user's: `resolve("model", "mlp")` looks the name up in `BUILTIN`, and
`resolve("model", "mypkg.model:ResNetTiny")` imports `mypkg.model` and returns its
`ResNetTiny`. A component's keyword arguments are its configuration: `accepted_keys`
reads them (with their defaults) from its signature, or from its dataclass fields for
a flax Linen module, so a config section can be checked against the component it names
before anything runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

from trainer.errors import UserError

# kind -> built-in name -> "module:attribute". Imported only when resolved.
BUILTIN: dict[str, dict[str, str]] = {
    "model": {
        "logreg": "trainer.models.builtin:logreg",
        "mlp": "trainer.models.builtin:mlp",
        "cnn": "trainer.models.builtin:cnn",
        "transformer": "trainer.models.builtin:transformer",
    },
    "data": {
        "csv": "trainer.data:load_csv",
        "embedded": "trainer.data:load_embedded",
        "synthetic": "trainer.data:load_synthetic",
        "tfds": "trainer.data:load_tfds",
        "tokens": "trainer.data:load_tokens",
    },
    "task": {
        "classification": "trainer.tasks:Classification",
        "lm": "trainer.tasks:LanguageModel",
        "regression": "trainer.tasks:Regression",
    },
    "optimizer": {
        "sgd": "trainer.optimizers:sgd",
        "adam": "trainer.optimizers:adam",
        "adamw": "trainer.optimizers:adamw",
    },
    "weight_decay_mask": {
        "matrices": "trainer.optimizers:matrices",
        "all": "trainer.optimizers:all_params",
        "kernels": "trainer.optimizers:kernels",
    },
}

# Where each kind is named in a config, for error messages.
_FIELD = {"model": "config.model.name", "data": "config.data.source", "task": "config.task",
          "optimizer": "config.optimizer.name",
          "weight_decay_mask": "config.optimizer.weight_decay_mask"}

REQUIRED = inspect.Parameter.empty  # an accepted key without a default


def resolve(kind: str, name: Any) -> Any:
  """The component `name` names: a built-in name, `module:attribute`, or the object itself.

  Raises:
    UserError: an unknown built-in name, a module that does not import or an attribute
      it lacks.
  """
  if not isinstance(name, str):
    return name  # Already an object (the Python API passes classes and instances).
  builtins = BUILTIN[kind]
  target = builtins.get(name, name)
  if ":" not in target:
    raise UserError(f"{_FIELD[kind]}={name!r}: expected one of {', '.join(builtins)} or an"
                    " importable module:attribute")
  module_name, _, attribute = target.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f"{_FIELD[kind]}={name!r}: cannot import {module_name} ({e}); is its"
                    " package installed or on PYTHONPATH?") from None
  try:
    obj = module
    for part in attribute.split("."):
      obj = getattr(obj, part)
  except AttributeError:
    raise UserError(f"{_FIELD[kind]}={name!r}: {module_name} has no attribute"
                    f" {attribute!r}") from None
  if not callable(obj) and kind != "task":  # a task may be an instance (tasks.resolve)
    raise UserError(f"{_FIELD[kind]}={name!r}: {target} is a {type(obj).__name__}; expected"
                    " a class or a function")
  return obj


def accepted_keys(obj, injected: tuple[str, ...] = ()) -> dict[str, Any]:
  """Keyword arguments `obj` takes, with defaults (`REQUIRED` when none), minus `injected`.

  A flax Linen module's are its dataclass fields (less `parent` and `name`); an NNX
  module's, a class's or a function's come from its signature (less `rngs`). An object
  with `default_config()` declares them itself.
  """
  if hasattr(obj, "default_config"):
    keys = dict(obj.default_config())
  elif isinstance(obj, type) and dataclasses.is_dataclass(obj) and _is_linen(obj):
    keys = {}
    for f in dataclasses.fields(obj):
      if f.name in ("parent", "name") or not f.init:
        continue
      if f.default is not dataclasses.MISSING:
        keys[f.name] = f.default
      elif f.default_factory is not dataclasses.MISSING:
        keys[f.name] = f.default_factory()
      else:
        keys[f.name] = REQUIRED
  else:
    target = obj.__init__ if isinstance(obj, type) else obj
    keys = {}
    for p in inspect.signature(target).parameters.values():
      if p.name in ("self", "rngs") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
        continue
      keys[p.name] = p.default
  return {k: v for k, v in keys.items() if k not in injected}


def _is_linen(cls) -> bool:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return issubclass(cls, nn.Module)


def check_keys(what: str, name: str, given, accepted: dict[str, Any]) -> None:
  """Raises UserError when `given` holds a key `accepted` lacks, or lacks a required one."""
  unknown = sorted(set(given) - set(accepted))
  if unknown:
    raise UserError(f"config.{what}.{unknown[0]}: {what} {name!r} takes no such key; it"
                    f" accepts {', '.join(sorted(accepted)) or 'none'}")
  missing = sorted(k for k, v in accepted.items() if v is REQUIRED and k not in given)
  if missing:
    raise UserError(f"config.{what}.{missing[0]}: {what} {name!r} needs it (no default); it"
                    f" accepts {', '.join(sorted(accepted))}")
