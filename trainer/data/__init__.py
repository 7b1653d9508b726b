"""Data sources -> a train/test split held in host memory, and per-process batches.

Every source (`csv`, `embedded`, `synthetic`, `tfds`, `tokens` for language models, whose
windows are read from a memory map on demand, and a user's random-access source, see
`from_sources`) yields the same `Dataset`; `config.data.source` names it through the
registry (`trainer/registry.py`). The order of
training examples is a pure function of (seed, step): step `t` of a run reads positions
`[t*B, (t+1)*B)` of an endless sequence of per-epoch permutations, so a resumed run sees
exactly the batches an uninterrupted one would. Each process keeps only its contiguous
slice of every global batch, which matches the device order of the `data` mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from trainer import registry
from trainer.data import split
from trainer.data import tabular
from trainer.data import tfds_source
from trainer.data import tokens
from trainer.errors import UserError

# scikit-learn is imported where it is used: it adds ~2 s to every start otherwise.
_EMBEDDED = {
    "digits": "load_digits",
    "breast_cancer": "load_breast_cancer",
    "wine": "load_wine",
    "iris": "load_iris",
}
_EMBEDDED_REGRESSION = {"diabetes": "load_diabetes"}  # a real target: task regression


@dataclasses.dataclass
class Dataset:
  """A train/test split. `lm`: x and y are `tokens.TokenWindows` ([n, T] int32 each).

  `regression`: y is float32 [n], the standardised target, and `stats["target"]` holds
  its {"mean", "std"} (tasks report and predict in the original units). A data set built
  from a random-access source (`from_sources`) keeps its training split there
  (`train_source`, read batch by batch) and `train_x`/`train_y` are None.
  """
  train_x: np.ndarray | None  # float32 [n_train, d], standardised when asked
  train_y: np.ndarray | None  # int32 [n_train], in [0, num_classes); regression: float32
  test_x: np.ndarray
  test_y: np.ndarray
  class_names: list[str]  # original label of each class index
  feature_names: list[str]
  stats: dict  # {"mean": [...], "std": [...]} fitted on train_x, or {} when not standardised
  task: str = "classification"  # or "lm" (y = x shifted by one), "regression", a user task
  train_source: Any = None  # random access: len() and rows by index (see `from_sources`)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_features(self) -> int:
    return self.test_x.shape[1]

  @property
  def num_train(self) -> int:
    return len(self.train_source) if self.train_source is not None else len(self.train_y)

  def train_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The training rows at `indices` as {"x": ..., "y": ...} host arrays."""
    if self.train_source is not None:
      return read_rows(self.train_source, indices)
    return {"x": self.train_x[indices], "y": self.train_y[indices]}

  def in_memory_split(self) -> dict[str, np.ndarray] | None:
    """{"x", "y"}: the training split when it is whole in host memory (what can be put
    on the devices), else None (a random-access source, a token memory map)."""
    if isinstance(self.train_x, np.ndarray) and isinstance(self.train_y, np.ndarray):
      return {"x": self.train_x, "y": self.train_y}
    return None

  def example_x(self) -> np.ndarray:
    """One training input with a batch axis: what a model is initialised on."""
    return self.train_batch(np.arange(1))["x"]


def read_rows(source, indices) -> dict[str, np.ndarray]:
  """Rows of a random-access source stacked into {"key": [len(indices), ...]} arrays.

  The source follows Grain's `RandomAccessDataSource` protocol: `len(source)`, and
  `source[i]` (or `source.__getitems__(indices)`, tried first) giving a dict of numpy
  values per row; `__getitems__` may also return the stacked dict directly.
  """
  indices = [int(i) for i in indices]
  if hasattr(source, "__getitems__"):
    rows = source.__getitems__(indices)
    if isinstance(rows, dict):
      return {k: np.asarray(v) for k, v in rows.items()}
  else:
    rows = [source[i] for i in indices]
  return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def from_sources(train, test, *, task: str = "classification", class_names=(),
                 feature_names=(), stats: dict | None = None) -> Dataset:
  """A Dataset over two random-access sources (rows are {"x": ..., "y": ...} dicts).

  The training split stays in `train` and is read one batch at a time, in the trainer's
  (seed, step)-pure order; the held-out split is read once, whole, for evaluation.
  """
  if len(train) == 0 or len(test) == 0:
    raise UserError(f"data source: empty split (train {len(train)}, test {len(test)} rows)")
  held_out = read_rows(test, np.arange(len(test)))
  for key in ("x", "y"):
    if key not in held_out:
      raise UserError(f"data source: rows must be dicts with 'x' and 'y'; got keys"
                      f" {sorted(held_out)}")
  return Dataset(None, None, held_out["x"], held_out["y"], list(class_names),
                 list(feature_names), dict(stats or {}), task=task, train_source=train)


def load(config) -> Dataset:
  """Builds the data set `config.data.source` names. Raises UserError on bad config or data.

  A built-in source or a loader whose only parameter is `config` gets the whole config;
  any other source (a user's `module:attribute`) is called with the other keys of
  `config.data` as keyword arguments (plus `seed` when it takes one) and returns a
  `Dataset`, e.g. from `from_sources`.
  """
  name = config.data.source
  source = registry.resolve("data", name)
  accepted = registry.accepted_keys(source)
  if name in registry.BUILTIN["data"]:
    tabular.check_config(config)  # the CSV-only fields of the shared `config.data`
  if list(accepted) == ["config"]:
    return source(config)
  given = {k: v for k, v in config.data.items() if k != "source"}
  if "seed" in accepted and "seed" not in given:
    given["seed"] = config.seed
  registry.check_keys("data", name, given, accepted)
  dataset = source(**given)
  if not isinstance(dataset, Dataset):
    raise UserError(f"config.data.source={name!r} returned {type(dataset).__name__}; expected"
                    " a trainer.data.Dataset (e.g. trainer.data.from_sources(train, test))")
  return dataset


def load_csv(config) -> Dataset:
  """`csv`: a local or gs:// file with a label column (`config.data.path`).

  Cells are typed and checked by `tabular.read_csv`; categorical columns, empty cells
  and standardisation are fitted on the training split only (`tabular.Preprocessor`,
  saved in `stats["preprocess"]` for prediction). `config.data.task=regression` reads the
  label column as a numeric target.
  """
  x, y, names = tabular.read_csv(config)
  if config.data.task == "regression":
    return split_regression(config, config.data.path, x, y, names,
                            target_name=config.data.label_column)
  return _classes_and_split(config, config.data.path, x, y, names)


def load_embedded(config) -> Dataset:
  """`embedded`: a data set that ships with scikit-learn (no download)."""
  name = config.data.name
  loader = _EMBEDDED.get(name) or _EMBEDDED_REGRESSION.get(name)
  if loader is None:
    raise UserError(f"config.data.name={name!r}: expected one of"
                    f" {', '.join(sorted({**_EMBEDDED, **_EMBEDDED_REGRESSION}))}")
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  bunch = getattr(sk_datasets, loader)()
  x = bunch.data.astype(np.float32)
  names = [str(n) for n in getattr(bunch, "feature_names", range(x.shape[1]))]
  where = f"embedded:{name}"
  if name in _EMBEDDED_REGRESSION:
    return split_regression(config, where, x, bunch.target.astype(np.float64), names,
                            target_name="target")
  dataset = _classes_and_split(config, where, x, bunch.target.astype(np.int64), names)
  if config.data.images:
    if name != "digits":
      raise UserError("config.data.images=True: only the embedded digits set has an image"
                      " form here; use config.data.source=tfds for image data sets")
    dataset.train_x = dataset.train_x.reshape(-1, 8, 8, 1)
    dataset.test_x = dataset.test_x.reshape(-1, 8, 8, 1)
  return dataset


def load_synthetic(config) -> Dataset:
  """`synthetic`: a learnable random classification problem (`_synthetic`)."""
  for key, lowest in (("num_examples", 1), ("num_features", 1), ("num_classes", 2)):
    value = config.data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      raise UserError(f"config.data.{key}={value!r}: expected an integer >= {lowest}")
  x, y = _synthetic(config.seed, config.data.num_examples, config.data.num_features,
                    config.data.num_classes)
  names = [f"x{i}" for i in range(x.shape[1])]
  return _classes_and_split(config, "synthetic", x, y, names)


def load_tfds(config) -> Dataset:
  """`tfds`: a prepared TensorFlow Datasets set, read by index (`tfds_source.py`)."""
  train_x, train_y, test_x, test_y, class_names, names, stats = tfds_source.load(config)
  return Dataset(train_x, train_y, test_x, test_y, class_names, names, stats)


def load_tokens(config) -> Dataset:
  """`tokens`: windows of a token stream for a language model (`tokens.py`)."""
  train_x, train_y, test_x, test_y, stats = tokens.load(config)
  return Dataset(train_x, train_y, test_x, test_y, [], [], stats, task="lm")


def _classes_and_split(config, where, x, y, names) -> Dataset:
  x, y, class_names = _select_classes(where, x, y, config.data.classes)
  return _split(config, where, x, y, class_names, names)


def split_regression(config, where, x, y, names, target_name: str = "target") -> Dataset:
  """A random (unstratified) split of a regression problem, target standardised.

  Features are standardised when `config.data.standardize`; the target always is, with
  statistics fitted on the training split only (`stats["target"]`).
  """
  if _split_list(config.data.classes):
    raise UserError(f"{where}: config.data.classes={config.data.classes!r} applies to"
                    " classification; expected it empty for a regression target")
  if not np.all(np.isfinite(y)):
    raise UserError(f"{where}: the regression target {target_name!r} has non-finite values")
  return _split(config, where, x, y, [], names, target_name=target_name)


def _standardize(train_x, test_x, names):
  mean = train_x.mean(axis=0)
  std = train_x.std(axis=0)
  std = np.where(std > 0, std, 1.0)
  stats = {"mean": mean.tolist(), "std": std.tolist(), "features": list(names)}
  return (train_x - mean) / std, (test_x - mean) / std, stats


def _split_list(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def _select_classes(where, x, y, classes: str):
  """Keeps the listed label values (all when empty) and maps them to 0..K-1.

  Class order: by value for integer labels, as sorted strings for string labels.
  """
  present = np.unique(y)
  names = [str(c) for c in present]
  listed = _split_list(classes)
  if str(classes).strip() and not listed:
    raise UserError(f"config.data.classes={classes!r} names no class; expected comma-separated"
                    " label values, or empty for all")
  if listed:
    absent = [c for c in listed if c not in names]
    if absent:
      raise UserError(f"{where}: config.data.classes={classes!r} lists {absent}, which never"
                      f" occur; labels present: {names}")
    wanted = present[np.isin(names, listed)]
    keep = np.isin(y, wanted)
    x, y = x[keep], y[keep]
  else:
    wanted = present
  if len(wanted) < 2:
    raise UserError(f"{where}: need at least 2 classes, found {[str(c) for c in wanted]}")
  return x, np.searchsorted(wanted, y).astype(np.int32), [str(c) for c in wanted]


def _split(config, where, x, y, class_names, names, target_name: str | None = None) -> Dataset:
  """Held-out split (stratified by class; plain for a regression `target_name`), then the
  feature encoding and standardisation fitted on the training split only."""
  fraction = float(config.data.test_fraction)
  if not 0.0 < fraction < 1.0:
    raise UserError(f"config.data.test_fraction={fraction}: expected a value in (0, 1)")
  regression = target_name is not None
  if not regression:
    counts = np.bincount(y, minlength=len(class_names))
    if counts.min() < 2:
      raise UserError(f"{where}: class {class_names[int(counts.argmin())]!r} has"
                      f" {counts.min()} example(s); a stratified split needs at least 2")
  n_test = split.test_count(len(y), fraction)
  if min(n_test, len(y) - n_test) < max(len(class_names), 1):
    both = f" with all {len(class_names)} classes in both" if class_names else ""
    raise UserError(f"{where}: {len(y)} rows are too few for config.data.test_fraction="
                    f"{fraction}{both}: expected more rows")
  train_x, test_x, train_y, test_y = split.train_test(x, y, fraction, config.seed,
                                                      stratified=not regression)
  stats = {}
  if isinstance(train_x, tabular.pd.DataFrame):  # a CSV: encoded with training statistics
    prep = tabular.Preprocessor.fit(train_x, config.data.missing)
    train_x, test_x, names = prep.transform(train_x), prep.transform(test_x), prep.feature_names
    stats["preprocess"] = prep.to_json()
  if config.data.standardize:
    train_x, test_x, standardized = _standardize(train_x, test_x, names)
    stats.update(standardized)
  if regression:
    train_y, test_y, target = tabular.standardize_target(train_y, test_y)
    stats["target"] = {"name": target_name, **target}
  return Dataset(train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y,
                 class_names, list(names), stats,
                 task="regression" if regression else "classification")


def _synthetic(seed: int, n: int, d: int, k: int):
  """A linearly separable-ish problem from a random teacher: learnable, not trivial."""
  rng = np.random.default_rng([seed, 7919])
  x = rng.standard_normal((n, d)).astype(np.float32)
  teacher = rng.standard_normal((d, k)).astype(np.float32)
  logits = x @ teacher + 0.5 * rng.standard_normal((n, k)).astype(np.float32)
  return x, logits.argmax(axis=1).astype(np.int64)


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """Example indices of global batch `step`: a pure function of its arguments."""
  positions = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(batch_size, dtype=np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _epoch_permutation(seed, int(epoch), n)[offsets[mask]]
  return out


def steps_batch_indices(seed: int, start: int, steps: int, batch_size: int, n: int,
                        process_index: int, process_count: int) -> np.ndarray:
  """This process's slices of global batches `start .. start+steps-1`: [steps, B/P].

  Row t equals `process_batch_indices(seed, start + t, ...)`, computed in one pass.
  """
  per_process = batch_size // process_count
  positions = np.arange(start * batch_size, (start + steps) * batch_size).reshape(steps,
                                                                                   batch_size)
  positions = positions[:, process_index * per_process:(process_index + 1) * per_process]
  epochs, offsets = np.divmod(positions, n)
  out = np.empty(positions.shape, dtype=np.int64)
  for epoch in np.unique(epochs):
    mask = epochs == epoch
    out[mask] = _epoch_permutation(seed, int(epoch), n)[offsets[mask]]
  return out


def process_batch_indices(seed: int, step: int, batch_size: int, n: int,
                          process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous slice of global batch `step`."""
  per_process = batch_size // process_count
  start = process_index * per_process
  return global_batch_indices(seed, step, batch_size, n)[start:start + per_process]
