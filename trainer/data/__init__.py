"""Data sources -> a train/test split held in host memory, and per-process batches.

Every source (`csv`, `embedded`, `synthetic`, and `tokens` for language models, whose
windows are read from a memory map on demand) yields the same `Dataset`. The order of
training examples is a pure function of (seed, step): step `t` of a run reads positions
`[t*B, (t+1)*B)` of an endless sequence of per-epoch permutations, so a resumed run sees
exactly the batches an uninterrupted one would. Each process keeps only its contiguous
slice of every global batch, which matches the device order of the `data` mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

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


@dataclasses.dataclass
class Dataset:
  """A train/test split. `lm`: x and y are `tokens.TokenWindows` ([n, T] int32 each)."""
  train_x: np.ndarray  # float32 [n_train, d], standardised when asked
  train_y: np.ndarray  # int32 [n_train], in [0, num_classes); regression: float32, standardised
  test_x: np.ndarray
  test_y: np.ndarray
  class_names: list[str]  # original label of each class index
  feature_names: list[str]
  stats: dict  # {"mean": [...], "std": [...]} fitted on train_x, or {} when not standardised
  task: str = "classification"  # "regression" (csv); "lm": next-token prediction, y = x[1:]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def num_features(self) -> int:
    return self.train_x.shape[1]


def load(config) -> Dataset:
  """Builds the data set the config names. Raises UserError on bad config or data."""
  tabular.check_config(config)
  source = config.data.source
  if source == "csv":  # x: typed columns, encoded by _split with training statistics
    x, y, names = tabular.read_csv(config)
    where = config.data.path
  elif source == "embedded":
    loader = _EMBEDDED.get(config.data.name)
    if loader is None:
      raise UserError(f"config.data.name={config.data.name!r}: expected one of"
                      f" {', '.join(sorted(_EMBEDDED))}")
    from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
    bunch = getattr(sk_datasets, loader)()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    names = [str(n) for n in getattr(bunch, "feature_names", range(x.shape[1]))]
    where = f"embedded:{config.data.name}"
  elif source == "tfds":
    train_x, train_y, test_x, test_y, class_names, names, stats = tfds_source.load(config)
    return Dataset(train_x, train_y, test_x, test_y, class_names, names, stats)
  elif source == "tokens":
    train_x, train_y, test_x, test_y, stats = tokens.load(config)
    return Dataset(train_x, train_y, test_x, test_y, [], [], stats, task="lm")
  elif source == "synthetic":
    x, y = _synthetic(config.seed, config.data.num_examples, config.data.num_features,
                      config.data.num_classes)
    names = [f"x{i}" for i in range(x.shape[1])]
    where = "synthetic"
  else:
    raise UserError(f"config.data.source={source!r}: expected csv, embedded, synthetic, tfds"
                    " or tokens")
  class_names = []
  if config.data.task != "regression":
    x, y, class_names = _select_classes(where, x, y, config.data.classes)
  dataset = _split(config, where, x, y, class_names, names)
  if config.data.images:
    if (source, config.data.name) != ("embedded", "digits"):
      raise UserError("config.data.images=True: only the embedded digits set has an image"
                      " form here; use config.data.source=tfds for image data sets")
    dataset.train_x = dataset.train_x.reshape(-1, 8, 8, 1)
    dataset.test_x = dataset.test_x.reshape(-1, 8, 8, 1)
  return dataset


def _split_list(value: str) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def _select_classes(where, x, y, classes: str):
  """Keeps the listed label values (all when empty) and maps them to 0..K-1.

  Class order: by value for integer labels, as sorted strings for string labels.
  """
  present = np.unique(y)
  names = [str(c) for c in present]
  listed = _split_list(classes)
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


def _split(config, where, x, y, class_names, names) -> Dataset:
  fraction = float(config.data.test_fraction)
  if not 0.0 < fraction < 1.0:
    raise UserError(f"config.data.test_fraction={fraction}: expected a value in (0, 1)")
  regression = config.data.task == "regression"  # a plain split, a standardised target
  counts = np.bincount(y, minlength=len(class_names)) if not regression else None
  if counts is not None and counts.min() < 2:
    raise UserError(f"{where}: class {class_names[int(counts.argmin())]!r} has"
                    f" {counts.min()} example(s); a stratified split needs at least 2")
  n_test = int(np.ceil(fraction * len(y)))  # as scikit-learn rounds it
  if min(n_test, len(y) - n_test) < max(len(class_names), 1):
    both = f" with all {len(class_names)} classes in both" if class_names else ""
    raise UserError(f"{where}: {len(y)} rows are too few for config.data.test_fraction="
                    f"{fraction}{both}: expected more rows")
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  train_x, test_x, train_y, test_y = model_selection.train_test_split(
      x, y, test_size=fraction, stratify=None if regression else y, random_state=config.seed)
  stats = {}
  if isinstance(train_x, tabular.pd.DataFrame):  # a CSV: encoded with training statistics
    prep = tabular.Preprocessor.fit(train_x, config.data.missing)
    train_x, test_x, names = prep.transform(train_x), prep.transform(test_x), prep.feature_names
    stats["preprocess"] = prep.to_json()
  if regression:
    train_y, test_y, stats["target"] = tabular.standardize_target(train_y, test_y)
  if config.data.standardize:
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    train_x = (train_x - mean) / std
    test_x = (test_x - mean) / std
    stats.update(mean=mean.tolist(), std=std.tolist(), features=list(names))
  return Dataset(train_x.astype(np.float32), train_y, test_x.astype(np.float32), test_y,
                 class_names, list(names), stats, task=config.data.task)


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


def process_batch_indices(seed: int, step: int, batch_size: int, n: int,
                          process_index: int, process_count: int) -> np.ndarray:
  """This process's contiguous slice of global batch `step`."""
  per_process = batch_size // process_count
  start = process_index * per_process
  return global_batch_indices(seed, step, batch_size, n)[start:start + per_process]
