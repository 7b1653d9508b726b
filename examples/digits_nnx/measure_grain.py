"""Host cost of reading training batches from this project's source: the trainer vs Grain.

    pip install grain==0.2.18
    PYTHONPATH=.:examples/digits_nnx python examples/digits_nnx/measure_grain.py

Reads the same 400 batches of 64 rows (the trainer's (seed, step) order) three ways and
prints the best of 5 passes per batch; every way must return the same arrays.
"""

import time

import grain
import numpy as np

from digits_example import data as ex
from trainer import data

ds = ex.digits(seed=0)
src, n, B, T = ds.train_source, ds.num_train, 64, 400
ids = np.concatenate([data.process_batch_indices(0, t, B, n, 0, 1) for t in range(T)])

def trainer_path():
  for t in range(T):
    b = ds.train_batch(ids[t * B:(t + 1) * B])
  return b

g = grain.MapDataset.source(ids).map(lambda i: src[int(i)]).batch(B)
def grain_map():
  for t in range(T):
    b = g[t]
  return b

it_ds = g.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=8))
def grain_iter():
  it = iter(it_ds)
  for t in range(T):
    b = next(it)
  return b

ref = trainer_path()
for name, fn in [("trainer read_rows", trainer_path), ("grain MapDataset[t]", grain_map),
                 ("grain to_iter_dataset 2 threads", grain_iter)]:
  out = fn()
  assert np.array_equal(out["x"], ref["x"]) and np.array_equal(out["y"], ref["y"]), name
  times = []
  for _ in range(5):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  best = min(times)
  print(f"{name}: {best / T * 1e6:.0f} us per batch of {B}")
