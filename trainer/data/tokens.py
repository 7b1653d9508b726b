"""Token data for language models: a synthetic stream or a memmap token file, in windows.

The stream (uint16 or int32 token ids) is cut into fixed windows of `T + 1` tokens with
stride `T`; window i gives the input `x = w[:-1]` and the next-token labels `y = w[1:]`.
The first windows are the training split and the last `test_fraction` of them the
held-out split, so the two never share text. `TokenWindows` reads only the rows it is
asked for (`train_x[idx]` -> `[len(idx), T]` int32), so a token file many times larger
than memory works: the operating system pages in what the batches touch.

`synthetic` tokens follow a random sparse Markov chain (each token has
`_BRANCHING` equally likely successors): deterministic given the seed, learnable, and
with a known floor on the loss (the chain's entropy, about ln 4 = 1.39 nats).
"""

from __future__ import annotations

import os

import numpy as np

from trainer import storage
from trainer.errors import UserError

_BRANCHING = 4
_DTYPES = {"uint16": np.uint16, "int32": np.int32}
_CHECKED_TOKENS = 1 << 24  # ids checked against the vocabulary per chunk


class TokenWindows:
  """An array-like of windows over a token stream: `[n, length]` int32, read on demand."""

  def __init__(self, tokens: np.ndarray, starts: np.ndarray, length: int, shift: int = 0):
    self._tokens = tokens
    self._starts = np.asarray(starts, np.int64)
    self.length = int(length)
    self.shift = int(shift)
    # A strided view (no copy): row s is tokens[s + shift : s + shift + length].
    self._rows = np.lib.stride_tricks.sliding_window_view(tokens[shift:], self.length)

  def __len__(self) -> int:
    return len(self._starts)

  @property
  def shape(self) -> tuple[int, int]:
    return (len(self._starts), self.length)

  @property
  def dtype(self):
    return np.dtype(np.int32)

  @property
  def ndim(self) -> int:
    return 2

  def __getitem__(self, key) -> np.ndarray:
    if isinstance(key, (int, np.integer)):
      return self[np.asarray([key])][0]
    starts = self._starts[key]
    return self._rows[starts].astype(np.int32)

  def __array__(self, dtype=None, copy=None):  # pylint: disable=unused-argument
    """Every window at once: for the (small) held-out split, never a training split."""
    out = self[:]
    return out if dtype is None else out.astype(dtype)


def synthetic_tokens(seed: int, num_tokens: int, vocab_size: int) -> np.ndarray:
  """A deterministic token stream from a random sparse Markov chain over the vocabulary."""
  rng = np.random.default_rng([seed, 104729])
  successors = rng.integers(0, vocab_size, size=(vocab_size, _BRANCHING))
  chains = 256  # independent chains advanced together: one numpy op per column
  columns = -(-num_tokens // chains)
  choice = rng.integers(0, _BRANCHING, size=(columns, chains), dtype=np.int8)
  out = np.empty((columns, chains), np.uint16 if vocab_size <= 1 << 16 else np.int32)
  current = rng.integers(0, vocab_size, size=chains)
  for c in range(columns):
    out[c] = current
    current = successors[current, choice[c]]
  return out.T.reshape(-1)[:num_tokens]  # each chain contiguous, one after another


def read_token_file(path: str, dtype: str, vocab_size: int) -> np.ndarray:
  """Memory-maps a flat file of token ids; checks its size and (a sample of) its ids."""
  if dtype not in _DTYPES:
    raise UserError(f"config.data.token_dtype={dtype!r}: expected uint16 or int32")
  if storage.is_remote(path):
    raise UserError(f"config.data.token_path={path}: token files are memory-mapped and must"
                    " be local; copy it to local disk first")
  if not os.path.isfile(path):
    raise UserError(f"config.data.token_path={path}: no such file")
  itemsize = np.dtype(_DTYPES[dtype]).itemsize
  size = os.path.getsize(path)
  if size == 0 or size % itemsize:
    raise UserError(f"{path}: {size} bytes is not a whole number of {dtype} tokens"
                    " (check config.data.token_dtype)")
  tokens = np.memmap(path, dtype=_DTYPES[dtype], mode="r")
  # Every id, in chunks (about 1 s per GB here): one outside the vocabulary anywhere would
  # end the run as "diverged" when its window is drawn.
  for start in range(0, len(tokens), _CHECKED_TOKENS):
    part = tokens[start:start + _CHECKED_TOKENS]
    low, high = int(part.min()), int(part.max())
    if low < 0 or high >= vocab_size:
      at = start + int(np.flatnonzero((part < 0) | (part >= vocab_size))[0])
      raise UserError(f"{path}: token id {int(tokens[at])} at position {at} is outside"
                      f" [0, config.model.vocab_size={vocab_size})")
  return tokens


def load(config):
  """(train_x, train_y, test_x, test_y, stats) of windows for `config.data.source = tokens`."""
  seq_len, vocab = int(config.model.seq_len), int(config.model.vocab_size)
  if seq_len <= 0 or vocab <= 1:
    raise UserError(f"config.model.seq_len={seq_len}, config.model.vocab_size={vocab}:"
                    " expected seq_len >= 1 and vocab_size >= 2")
  if config.data.token_path:
    tokens = read_token_file(str(config.data.token_path), config.data.token_dtype, vocab)
    where = str(config.data.token_path)
  else:
    if int(config.data.num_tokens) <= 0:
      raise UserError(f"config.data.num_tokens={config.data.num_tokens}: expected > 0")
    tokens = synthetic_tokens(int(config.seed), int(config.data.num_tokens), vocab)
    where = "synthetic"
  fraction = float(config.data.test_fraction)
  if not 0.0 < fraction < 1.0:
    raise UserError(f"config.data.test_fraction={fraction}: expected a value in (0, 1)")
  num_windows = (len(tokens) - 1) // seq_len
  num_test = max(1, int(round(num_windows * fraction)))
  if num_windows - num_test < 1:
    raise UserError(f"{where}: {len(tokens)} tokens make {num_windows} window(s) of"
                    f" {seq_len} + 1; need at least 2 (one per split)")
  starts = np.arange(num_windows, dtype=np.int64) * seq_len
  train, test = starts[:num_windows - num_test], starts[num_windows - num_test:]
  stats = {"source": where, "num_tokens": int(len(tokens)), "seq_len": seq_len,
           "vocab_size": vocab, "train_windows": int(len(train)), "test_windows": int(len(test))}
  return (TokenWindows(tokens, train, seq_len), TokenWindows(tokens, train, seq_len, 1),
          TokenWindows(tokens, test, seq_len), TokenWindows(tokens, test, seq_len, 1), stats)
