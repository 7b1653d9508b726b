"""The held-out split and the classification report, checked against scikit-learn itself.

Both replace scikit-learn calls whose results earlier runs recorded (which rows were held
out; eval/report.txt and report.json), so they must agree exactly: the same rows in the
same order, the same text, the same floats. scikit-learn stays installed (the embedded
data sets come from it) and is the reference here; the CSV job itself must not import it.
"""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics
from sklearn import model_selection

from tests.conftest import ROOT, tiny_config
from trainer import data
from trainer import report
from trainer.data import split

SEEDS = range(6)
FRACTIONS = (0.1, 0.2, 0.25, 0.33)
SIZES = (10, 23, 150, 997, 5000)
CLASS_COUNTS = (2, 3, 5, 10)


def _labels(rng, n: int, k: int, balanced: bool) -> np.ndarray:
  """k classes over n rows, each at least twice: near-equal counts (many tied shares) or
  drawn from skewed proportions (some classes rare)."""
  if balanced:
    y = np.arange(n) % k
  else:
    y = rng.choice(k, size=n, p=rng.dirichlet(np.full(k, 0.3)))
    y[:2 * k] = np.repeat(np.arange(k), 2)
  rng.shuffle(y)
  return y.astype(np.int32)


def _frame(rng, n: int) -> pd.DataFrame:
  """A CSV-like frame: numeric and text columns, index labels that are not 0..n-1."""
  return pd.DataFrame({"a": rng.standard_normal(n), "b": rng.integers(0, 5, n).astype(str),
                       "c": np.arange(n, dtype=np.float64)}, index=np.arange(n) * 3 + 7)


def _assert_same(ours, theirs):
  for mine, reference in zip(ours, theirs, strict=True):
    if isinstance(reference, pd.DataFrame):
      pd.testing.assert_frame_equal(mine, reference)
    else:
      np.testing.assert_array_equal(mine, reference)


@pytest.mark.parametrize("seed", SEEDS)
def test_stratified_split_holds_out_the_rows_scikit_learn_does(seed):
  rng = np.random.default_rng([seed, 11])
  checked = 0
  for n in SIZES:
    for k in CLASS_COUNTS:
      for fraction in FRACTIONS:
        n_test = split.test_count(n, fraction)
        if min(n_test, n - n_test) < k:  # refused by `_split` (and by scikit-learn)
          continue
        for balanced in (True, False):
          y = _labels(rng, n, k, balanced)
          x = _frame(rng, n) if checked % 2 else rng.standard_normal((n, 3))
          ours = split.train_test(x, y, fraction, seed, stratified=True)
          theirs = model_selection.train_test_split(x, y, test_size=fraction, stratify=y,
                                                    random_state=seed)
          _assert_same(ours, theirs)
          checked += 1
  assert checked >= 100


@pytest.mark.parametrize("seed", SEEDS)
def test_plain_split_of_a_regression_target_matches_scikit_learn(seed):
  rng = np.random.default_rng([seed, 13])
  for n in SIZES:
    for fraction in FRACTIONS:
      y = rng.standard_normal(n)
      for x in (rng.standard_normal((n, 2)), _frame(rng, n)):
        ours = split.train_test(x, y, fraction, seed, stratified=False)
        theirs = model_selection.train_test_split(x, y, test_size=fraction, random_state=seed)
        _assert_same(ours, theirs)


def test_split_rows_are_disjoint_and_cover_every_row():
  y = _labels(np.random.default_rng(0), 101, 4, balanced=False)
  train, test = split.indices(101, 0.25, 5, stratify=y)
  assert len(test) == 26 and sorted(np.concatenate([train, test]).tolist()) == list(range(101))


def test_load_splits_as_before(tmp_path):
  """Through `data.load` and `split_regression`: the rows scikit-learn held out."""
  config = tiny_config("default.py", data__source="synthetic", data__num_examples=500,
                       data__standardize=False, seed=3)
  ds = data.load(config)
  x, y = data._synthetic(3, 500, config.data.num_features, config.data.num_classes)
  _, test_x, _, test_y = model_selection.train_test_split(x, y, test_size=0.2, stratify=y,
                                                          random_state=3)
  np.testing.assert_array_equal(ds.test_x, test_x)
  np.testing.assert_array_equal(ds.test_y, test_y)

  target = x[:, 0] * 2.0 + 1.0
  ds = data.split_regression(config, "test", x, target, [f"x{i}" for i in range(x.shape[1])])
  _, test_x = model_selection.train_test_split(x, test_size=0.2, random_state=3)
  np.testing.assert_array_equal(ds.test_x, test_x)


def _sklearn_report(labels, preds, names):
  kwargs = dict(labels=list(range(len(names))), target_names=names, zero_division=0, digits=4)
  return (metrics.classification_report(labels, preds, **kwargs),
          metrics.classification_report(labels, preds, output_dict=True, **kwargs))


def _report_cases():
  """(labels, preds, names): random predictions, classes never present or never predicted,
  perfect and all-wrong predictions, short and long class names."""
  rng = np.random.default_rng(17)
  for _ in range(120):
    k = int(rng.integers(2, 13))
    n = int(rng.integers(1, 600))
    present = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
    predicted = rng.choice(k, size=int(rng.integers(1, k + 1)), replace=False)
    labels = rng.choice(present, size=n).astype(np.int32)
    preds = np.where(rng.random(n) < 0.6, labels, rng.choice(predicted, size=n))
    if rng.random() < 0.5:
      preds = rng.choice(predicted, size=n)
    names = [str(c) if rng.random() < 0.7 else f"class number {c} long name" for c in range(k)]
    yield labels, preds.astype(np.int32), names
  labels = np.repeat(np.arange(4), 25).astype(np.int32)
  yield labels, labels.copy(), ["a", "b", "c", "d"]
  yield labels, (labels + 1) % 4, ["a", "b", "c", "d"]
  yield np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), ["0", "1"]


def test_report_matches_scikit_learn_text_and_dict():
  cases = list(_report_cases())
  zero_support = never_predicted = 0
  for labels, preds, names in cases:
    text, as_dict = report.classification_report(labels, preds, names)
    ref_text, ref_dict = _sklearn_report(labels, preds, names)
    assert text == ref_text
    assert json.dumps(as_dict) == json.dumps(ref_dict)  # keys, order, float values
    assert as_dict == ref_dict
    zero_support += any(as_dict[name]["support"] == 0 for name in names)
    never_predicted += len(set(range(len(names))) - set(preds.tolist())) > 0
  assert zero_support >= 20 and never_predicted >= 20  # the zero-division paths were checked


_JOB = """
import json, sys
from tests.conftest import tiny_config
from trainer import data, train

def sklearn_loaded():
  return sorted(m for m in sys.modules if m.split(".")[0] == "sklearn")[:3]

csv = tiny_config("mobile_price.py", data__path=sys.argv[1], train__steps=20,
                  train__eval_every=10)
data.load(csv)
data.load(tiny_config("default.py", data__source="synthetic", data__num_examples=256))
after_load = sklearn_loaded()
train.train_and_evaluate(csv, sys.argv[2])
print(json.dumps({"load": after_load, "job": sklearn_loaded()}))
"""


def test_csv_job_does_not_import_scikit_learn(mobile_price_csv, tmp_path):
  """The tutorial job, data loading to eval/report.txt, in a fresh interpreter."""
  result = subprocess.run([sys.executable, "-c", _JOB, str(mobile_price_csv),
                           str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert loaded == {"load": [], "job": []}
  assert "accuracy" in (tmp_path / "run" / "eval" / "report.txt").read_text()
