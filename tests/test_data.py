"""Data: deterministic batch order, per-process slices, and CSV errors that name the spot."""

import numpy as np
import pytest

from tests.conftest import tiny_config
from trainer import data
from trainer.data import csv_source
from trainer.data import tabular
from trainer.errors import UserError


def test_batch_order_is_a_pure_function_of_seed_and_step():
  a = [data.global_batch_indices(3, s, 64, 1000) for s in range(40)]
  data._epoch_permutation.cache_clear()
  b = [data.global_batch_indices(3, s, 64, 1000) for s in reversed(range(40))][::-1]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not np.array_equal(a[0], data.global_batch_indices(4, 0, 64, 1000))


def test_each_epoch_visits_every_example_once():
  n, batch = 1000, 40  # 25 steps per epoch; also check a batch spanning two epochs
  first = np.concatenate([data.global_batch_indices(0, s, batch, n) for s in range(25)])
  assert sorted(first.tolist()) == list(range(n))
  spanning = data.global_batch_indices(0, 0, 1500, n)
  assert len(set(spanning[:1000].tolist())) == 1000


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_process_slices_are_disjoint_and_cover_the_global_batch(processes):
  for step in range(30):
    full = data.global_batch_indices(1, step, 64, 512)
    parts = [data.process_batch_indices(1, step, 64, 512, p, processes) for p in range(processes)]
    assert np.array_equal(np.concatenate(parts), full)
    assert len(set(np.concatenate(parts).tolist())) == 64


def test_split_is_stratified_and_standardised_on_train_only(mobile_price_csv):
  config = tiny_config("mobile_price.py", data__path=str(mobile_price_csv), data__classes="")
  ds = data.load(config)
  assert ds.train_x.shape == (1600, 20) and ds.test_x.shape == (400, 20)
  assert np.bincount(ds.test_y).tolist() == [100, 100, 100, 100]
  np.testing.assert_allclose(ds.train_x.mean(axis=0), 0, atol=1e-5)
  np.testing.assert_allclose(ds.train_x.std(axis=0), 1, atol=1e-4)
  assert abs(float(ds.test_x.mean())) > 1e-4  # test statistics were not used


def test_binary_default_keeps_two_price_ranges(mobile_price_csv):
  ds = data.load(tiny_config("mobile_price.py", data__path=str(mobile_price_csv)))
  assert ds.class_names == ["0", "1"] and len(ds.train_y) + len(ds.test_y) == 1000


GOOD_HEADER = "a,b,price_range\n"
BAD_CSVS = {
    "empty": ("", "file is empty"),
    "header_only": (GOOD_HEADER, "header only, no data rows"),
    "no_label": ("id,a,b\n1,2,3\n", "no label column 'price_range' (this looks like an unlabelled"),
    "word": (GOOD_HEADER + "1,2,0\n1,x,1\n", "line 3, column 'b': 'x' is not a finite number"),
    "word_label": (GOOD_HEADER + "1,2,0\n1,2,inf\n", "line 3, column 'price_range': 'inf' is not"),
    "empty_cell": (GOOD_HEADER + "1,2,0\n,2,1\n", "line 3, column 'a': empty cell"),
    "inf": (GOOD_HEADER + "1,inf,0\n", "line 2, column 'b': 'inf' is not a finite"),
    "past_float32": (GOOD_HEADER + "1,-1e300,0\n", "line 2, column 'b': '-1e300' is past"
                     " float32's range"),
    "overflow": (GOOD_HEADER + "1,1e400,0\n", "line 2, column 'b': '1e400' is not a finite"),
    "nan": (GOOD_HEADER + "1,2,0\n3,nan,1\n", "line 3, column 'b': 'nan' is not a finite"),
    "short_row": (GOOD_HEADER + "1,2,0\n1,2\n", "line 3: 2 fields, fewer than the 3 in the header"),
    "long_row": (GOOD_HEADER + "1,2,3,4\n", "line 2: 4 fields, more than the 3"),
    "unterminated_quote": (GOOD_HEADER + '1,"2,0\n', "malformed CSV"),
    "duplicate_header": ("a,a,price_range\n1,2,0\n", "line 1: duplicate column 'a'"),
    "float_label": (GOOD_HEADER + "1,2,0.5\n", "line 2, column 'price_range': label '0.5' is not"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv_names_file_line_and_column(tmp_path, case):
  text, expected = BAD_CSVS[case]
  path = tmp_path / f"{case}.csv"
  path.write_text(text)
  with pytest.raises(UserError) as info:
    tabular.read_csv(_csv_config(path))
  message = str(info.value)
  assert message.startswith(str(path)) and expected in message
  assert "\n" not in message


def test_integer_labels_past_float64s_exact_range_stay_apart(tmp_path):
  # 2**53 + 1 and 2**53 + 2 are one float64; as int64 they would become one class.
  path = tmp_path / "ids.csv"
  path.write_text(GOOD_HEADER + "1,2,9007199254740993\n3,4,9007199254740994\n"
                  "5,6,9007199254740993\n")
  _, labels, _ = tabular.read_csv(_csv_config(path))
  assert sorted(set(labels.tolist())) == ["9007199254740993", "9007199254740994"]


def _csv_config(path, **overrides):
  return tiny_config("csv.py", data__path=str(path), data__label_column="price_range",
                     **overrides)


def test_missing_file_and_feature_column(tmp_path):
  with pytest.raises(UserError, match="file not found"):
    csv_source.read_table(str(tmp_path / "nope.csv"), "price_range", [])
  path = tmp_path / "ok.csv"
  path.write_text(GOOD_HEADER + "1,2,0\n")
  with pytest.raises(UserError, match="feature column\\(s\\) 'c' not found"):
    csv_source.read_table(str(path), "price_range", ["a", "c"])


def test_unlabelled_test_split_is_rejected(mobile_price_csv):
  with pytest.raises(UserError, match="test.csv: no label column 'price_range'"):
    csv_source.read_table(str(mobile_price_csv.parent / "test.csv"), "price_range", [])


@pytest.mark.parametrize("overrides,expected", [
    (dict(data__source="parquet"), "config.data.source='parquet'"),
    (dict(data__name="mnist"), "config.data.name='mnist'"),
    (dict(data__classes="0,9"), "labels present"),
    (dict(data__classes="a,b"), "config.data.classes='a,b'"),
    (dict(data__test_fraction=1.5), "config.data.test_fraction=1.5"),
])
def test_bad_data_config(overrides, expected):
  config = tiny_config("breast_cancer.py", **overrides)
  with pytest.raises(UserError, match=expected.replace("(", "\\(")):
    data.load(config)
