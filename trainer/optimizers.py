"""Optimisers and the weight-decay rule, resolved through the registry like every component.

`config.optimizer.name` is `sgd`, `adam`, `adamw` or `module:attribute` naming a function
`(learning_rate, config.optimizer, mask) -> optax.GradientTransformation` (the learning
rate is the schedule). `config.optimizer.weight_decay_mask` picks which parameters decay:
`matrices` (every leaf with 2 or more dimensions: dense and conv kernels, embeddings; not
biases or norm scales), `all`, `kernels` (leaves named `kernel`), or `module:attribute`
naming a function `params -> pytree of bools`. With adamw the decay is decoupled (optax's
`mask`); with the others it is an L2 term `0.5 * weight_decay * sum(w**2)` in the loss.
"""

from __future__ import annotations

import jax
import optax

from trainer import registry
from trainer.errors import UserError


def sgd(learning_rate, config, mask):
  del mask  # The L2 term in the loss applies it.
  return optax.sgd(learning_rate, momentum=float(config.momentum) or None)


def adam(learning_rate, config, mask):
  del config, mask
  return optax.adam(learning_rate)


def adamw(learning_rate, config, mask):
  return optax.adamw(learning_rate, weight_decay=float(config.weight_decay), mask=mask)


def decoupled(config) -> bool:
  """Whether the optimiser applies weight decay itself (else the loss gets an L2 term)."""
  return config.optimizer.name == "adamw"


def matrices(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def all_params(params):
  return jax.tree.map(lambda p: True, params)


def kernels(params):
  return jax.tree_util.tree_map_with_path(
      lambda path, p: jax.tree_util.keystr(path).endswith("['kernel']"), params)


def weight_decay_mask(config):
  """The `params -> pytree of bools` function `config.optimizer.weight_decay_mask` names."""
  return registry.resolve("weight_decay_mask", config.optimizer.weight_decay_mask)


def make(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax optimiser and learning-rate schedule the config names."""
  opt, steps = config.optimizer, int(config.train.steps)
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif opt.schedule == "cosine":
    schedule = optax.cosine_decay_schedule(lr, decay_steps=steps)
  elif opt.schedule == "warmup_cosine":
    warmup = int(opt.warmup_steps)
    if not 0 <= warmup < steps:
      raise UserError(f"config.optimizer.warmup_steps={warmup}: expected 0 <= warmup <"
                      f" config.train.steps={steps}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps=steps)
  else:
    raise UserError(f"config.optimizer.schedule={opt.schedule!r}: expected constant, cosine"
                    " or warmup_cosine")
  tx = registry.resolve("optimizer", opt.name)(schedule, opt, weight_decay_mask(config))
  clip = float(opt.grad_clip_norm)
  if not 0 <= clip < float("inf"):  # (NaN fails this too)
    raise UserError(f"config.optimizer.grad_clip_norm={clip}: expected a finite number >= 0"
                    " (0 = off)")
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
