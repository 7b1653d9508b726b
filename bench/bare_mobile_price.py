"""The tutorial job as a user would write it without jaxjob: `python bench/bare_mobile_price.py CSV`.

Logistic regression on price_range 0 vs 1 of the Mobile Price CSV: an 80/20 split,
features standardised with the training split's statistics, a sigmoid output with an
L2 penalty of 1e-3 on the weights, adam with a cosine decay from 0.05 over 1000 steps,
batches of 256, one jitted step. Prints the held-out accuracy; writes nothing. The
`result` benchmark (`bench/result.py`) times it against `python -m trainer`.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

STEPS, BATCH, L2 = 1000, 256, 1e-3

frame = pd.read_csv(sys.argv[1])
frame = frame[frame["price_range"].isin([0, 1])]
x = frame.drop(columns="price_range").to_numpy(np.float32)
y = frame["price_range"].to_numpy(np.float32)
rng = np.random.default_rng(0)
order = rng.permutation(len(y))
n_test = int(np.ceil(0.2 * len(y)))
test, train = order[:n_test], order[n_test:]
mean, std = x[train].mean(0), x[train].std(0) + 1e-8
x = (x - mean) / std

tx = optax.adam(optax.cosine_decay_schedule(0.05, STEPS))
params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
opt_state = tx.init(params)


def loss_fn(params, xb, yb):
  logits = xb @ params["w"] + params["b"]
  return optax.sigmoid_binary_cross_entropy(logits, yb).mean() + 0.5 * L2 * jnp.sum(
      params["w"] ** 2)


@jax.jit
def step(params, opt_state, xb, yb):
  grads = jax.grad(loss_fn)(params, xb, yb)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


for i in range(STEPS):
  idx = rng.choice(train, BATCH)
  params, opt_state = step(params, opt_state, x[idx], y[idx])

logits = x[test] @ np.asarray(params["w"]) + float(params["b"])
print(f"held-out accuracy {np.mean((logits > 0) == (y[test] > 0.5)):.4f}")
