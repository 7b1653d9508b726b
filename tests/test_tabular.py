"""Tabular CSV data as users bring it: string labels, categories, empty cells, regression.

The tables are scikit-learn's bundled wine, breast-cancer and diabetes sets, exported to
CSV here with string labels, a categorical column and a few empty cells; the reference
is scikit-learn fitted on the same split.
"""

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn import compose
from sklearn import datasets
from sklearn import impute
from sklearn import linear_model
from sklearn import metrics
from sklearn import model_selection
from sklearn import pipeline
from sklearn import preprocessing

from tests.conftest import ROOT, run_trainer, tiny_config
from trainer import data
from trainer import train
from trainer.data import tabular
from trainer.errors import UserError

CULTIVARS = np.array(["barolo", "grignolino", "barbera"])  # wine classes 0, 1, 2


def _blank(frame: pd.DataFrame, columns: list[str], count: int, seed: int) -> pd.DataFrame:
  """`count` empty cells at seeded random places of `columns` (to_csv writes them as "")."""
  rng = np.random.default_rng(seed)
  frame = frame.astype({c: object for c in columns})
  for row, col in zip(rng.integers(0, len(frame), count), rng.integers(0, len(columns), count)):
    frame.iat[row, frame.columns.get_loc(columns[col])] = None
  return frame


def wine_frame() -> pd.DataFrame:
  """Wine, label 'Cultivar' as names in the middle, 'hue' as words, 20 empty cells."""
  bunch = datasets.load_wine(as_frame=True)
  frame = bunch.data.copy()
  frame["hue"] = pd.cut(frame["hue"], 3, labels=["pale", "amber", "deep"]).astype(str)
  frame.insert(6, "Cultivar", CULTIVARS[bunch.target])
  features = [c for c in frame.columns if c != "Cultivar"]
  return _blank(frame, features, 20, seed=1)


def breast_cancer_frame() -> pd.DataFrame:
  """Labels 'malignant'/'benign', a size band written as 1/2/3, 30 empty cells."""
  bunch = datasets.load_breast_cancer(as_frame=True)
  frame = bunch.data.copy()
  frame["size band"] = pd.qcut(frame.pop("mean radius"), 3, labels=[1, 2, 3]).astype(int)
  frame.insert(10, "diagnosis", bunch.target_names[bunch.target])
  features = [c for c in frame.columns if c != "diagnosis"]
  return _blank(frame, features, 30, seed=2)


def diabetes_frame() -> pd.DataFrame:
  """Disease progression (a number) in the middle, 'sex' as words, 20 empty cells."""
  bunch = datasets.load_diabetes(as_frame=True, scaled=False)
  frame = bunch.data.copy()
  frame["sex"] = frame["sex"].map({1.0: "sex1", 2.0: "sex2"})
  frame.insert(5, "progression", bunch.target)
  features = [c for c in frame.columns if c != "progression"]
  return _blank(frame, features, 20, seed=3)


def _write(frame: pd.DataFrame, path) -> str:
  frame.to_csv(path, index=False)
  return str(path)


def csv_config(path, label_column, **overrides):
  overrides.setdefault("data__label_column", label_column)
  return tiny_config("csv.py", data__path=str(path), **overrides)


def _small_csv(tmp_path, labels, extra="") -> str:
  rows = "".join(f"{i},{i % 3}{extra},{label}\n" for i, label in enumerate(labels))
  return _write_text(tmp_path / "small.csv", "a,b,y\n" + rows)


def _write_text(path, text) -> str:
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("labels,classes", [
    (["10", "2", "1"] * 4, ["1", "2", "10"]),  # numbers: by value
    (["1.0", "0.0"] * 4, ["0", "1"]),  # how pandas writes integer labels next to NaN
    (["b", "a", "B", "a b"] * 4, ["B", "a", "a b", "b"]),  # strings: by code point
    (["True", "False"] * 4, ["False", "True"]),
])
def test_class_order_and_names(tmp_path, labels, classes):
  ds = data.load(csv_config(_small_csv(tmp_path, labels), "y"))
  assert ds.class_names == classes
  all_y = np.concatenate([ds.train_y, ds.test_y])  # every class occurs 4 times
  assert np.bincount(all_y).tolist() == [4] * len(classes)


def test_string_classes_field_selects_by_name(tmp_path):
  path = _write(wine_frame(), tmp_path / "wine.csv")
  ds = data.load(csv_config(path, "Cultivar", data__classes="barolo,barbera",
                            data__missing="mean"))
  assert ds.class_names == ["barbera", "barolo"] and ds.num_classes == 2
  assert len(ds.train_y) + len(ds.test_y) == 59 + 48
  with pytest.raises(UserError, match=r"classes='barolo,nebbiolo' lists \['nebbiolo'\]"):
    data.load(csv_config(path, "Cultivar", data__classes="barolo,nebbiolo",
                         data__missing="mean"))


def _sklearn_encoding(frame, label, categorical, strategy):
  """scikit-learn's imputer + one-hot encoder + scaler, one column at a time in file order."""
  steps = []
  for column in [c for c in frame.columns if c != label]:
    if column in categorical:
      steps.append((column, pipeline.make_pipeline(
          impute.SimpleImputer(strategy="most_frequent"),
          preprocessing.OneHotEncoder(handle_unknown="ignore", sparse_output=False)), [column]))
    else:
      steps.append((column, impute.SimpleImputer(strategy=strategy), [column]))
  return pipeline.make_pipeline(compose.ColumnTransformer(steps),
                                preprocessing.StandardScaler())


@pytest.mark.parametrize("strategy", ["mean", "median", "most_frequent"])
def test_encoding_equals_scikit_learn_fitted_on_the_training_rows(tmp_path, strategy):
  frame = breast_cancer_frame()
  path = _write(frame, tmp_path / "bc.csv")
  ds = data.load(csv_config(path, "diagnosis", data__missing=strategy,
                            data__categorical_columns="size band"))
  assert ds.class_names == ["benign", "malignant"]
  assert [n for n in ds.feature_names if n.startswith("size band")] == [
      "size band=1", "size band=2", "size band=3"]
  # Same rows as data._split: the permutation depends only on n, the labels and the seed.
  y = (frame["diagnosis"] == "malignant").to_numpy()
  train_rows, test_rows = model_selection.train_test_split(
      np.arange(len(frame)), test_size=0.2, stratify=y, random_state=0)
  reread = pd.read_csv(path, dtype={"size band": object})
  reference = _sklearn_encoding(reread, "diagnosis", ["size band"], strategy)
  expected_train = reference.fit_transform(reread.iloc[train_rows])
  np.testing.assert_allclose(ds.train_x, expected_train, atol=2e-5)
  np.testing.assert_allclose(ds.test_x, reference.transform(reread.iloc[test_rows]), atol=2e-5)
  np.testing.assert_array_equal(ds.train_y, y[train_rows])


def test_unseen_category_is_all_zeros_and_statistics_are_train_only():
  train_rows = pd.DataFrame({"n": [1.0, np.nan, 3.0, 3.0], "c": ["x", "y", None, "y"]})
  test_rows = pd.DataFrame({"n": [np.nan, 100.0], "c": ["z", None]})
  prep = tabular.Preprocessor.fit(train_rows, "mean")
  assert prep.feature_names == ["n", "c=x", "c=y"]
  assert prep.fill == {"n": pytest.approx(7 / 3), "c": "y"}
  np.testing.assert_allclose(prep.transform(test_rows), [[7 / 3, 0, 0], [100, 0, 1]], rtol=1e-6)
  saved = tabular.Preprocessor.from_stats(
      json.loads(json.dumps({"preprocess": prep.to_json()})))
  assert saved == prep
  legacy = tabular.Preprocessor.from_stats({"features": ["n", "m"], "mean": [0, 0]})
  assert legacy == tabular.Preprocessor(["n", "m"], {}, {}, "")  # runs with numbers only


def test_drop_policy_removes_rows_with_an_empty_cell(tmp_path):
  frame = wine_frame()
  path = _write(frame, tmp_path / "wine.csv")
  ds = data.load(csv_config(path, "Cultivar", data__missing="drop"))
  kept = int(frame.notna().all(axis=1).sum())
  assert kept < len(frame) and len(ds.train_y) + len(ds.test_y) == kept
  assert ds.stats["preprocess"]["fill"] == {}


def test_regression_data_contract(tmp_path):
  frame = diabetes_frame()
  path = _write(frame, tmp_path / "diabetes.csv")
  ds = data.load(csv_config(path, "progression", data__task="regression",
                            data__missing="median"))
  assert ds.task == "regression" and ds.class_names == []
  assert ds.train_y.dtype == np.float32 and ds.test_y.dtype == np.float32
  assert ds.train_y.shape == (353,) and ds.test_y.shape == (89,)
  train_rows, test_rows = model_selection.train_test_split(  # plain: no stratification
      np.arange(len(frame)), test_size=0.2, random_state=0)
  target = frame["progression"].to_numpy()
  mean, std = target[train_rows].mean(), target[train_rows].std()
  assert ds.stats["target"] == {"name": "progression", "mean": pytest.approx(mean),
                                "std": pytest.approx(std)}
  np.testing.assert_allclose(ds.train_y, (target[train_rows] - mean) / std, rtol=1e-5)
  np.testing.assert_allclose(ds.test_y, (target[test_rows] - mean) / std, rtol=1e-5)
  assert ds.feature_names[1:3] == ["sex=sex1", "sex=sex2"]


@pytest.mark.parametrize("text,overrides,expected", [
    ("a,b,y\n1,2,0\n,3,1\n", {}, "line 3, column 'a': empty cell (config.data.missing=drop|"),
    ("a,b,y\n1,2,0\n3,4,\n", {}, "line 3, column 'y': empty cell"),
    ("a,b,y\n1,2,0\n1,x,1\n", {}, "'x' is not a finite number (list the column in"
                                   " config.data.categorical_columns"),
    ("a,b,y\n1,2,0.5\n", {}, "label '0.5' is not an integer; a numeric target to predict is"
                              " config.data.task=regression"),
    ("a,b,y\n1,2,low\n", {"data__task": "regression"}, "line 2, column 'y': 'low' is not a"
                                                        " finite number (a regression target"),
    ("a,b,y\n1,2,0\n", {"data__missing": "zero"}, "config.data.missing='zero': expected mean,"),
    ("a,b,y\n1,2,0\n", {"data__task": "ranking"}, "config.data.task='ranking': expected"),
    ("a,b,y\n1,2,0\n", {"data__categorical_columns": "c"}, "categorical_columns lists 'c', not"),
    ("a,b,y\n1,2,0\n", {"data__label_column": ""}, "config.data.label_column is empty"),
    ("a,b,y\n1,2,0\n", {"data__feature_columns": "a,y"}, "label column 'y' is also listed as"),
    ("a,b,y\n" + "".join(f"{i},n{i},{i % 2}\n" for i in range(1300)), {},
     "categorical column 'b' has 1040 distinct values in the training split, more than 1000"),
    ("a,b,y\n1,2,0\n", {"data__task": "regression", "data__classes": "0,1"},
     "a regression has no classes"),
    ("a,b,y\n,2,0\n1,,1\n", {"data__missing": "drop"}, "every row has an empty cell"),
    ("a,b,y\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n", {},
     "4 rows are too few for config.data.test_fraction=0.2 with all 2"),
    ("a,b,y\n" + ",2,0\n,3,1\n" * 5, {"data__missing": "mean"},
     "column 'a' has no value in the training split"),
])
def test_bad_tabular_input_is_one_line(tmp_path, text, overrides, expected):
  path = _write_text(tmp_path / "bad.csv", text)
  with pytest.raises(UserError) as info:
    data.load(csv_config(path, "y", **overrides))
  assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_prediction_rows_follow_the_trained_policy():
  rows = pd.DataFrame({"n": ["1.5", ""], "c": ["x", "x"]}, index=[0, 1])
  strict = tabular.Preprocessor(["n", "c"], {"c": ["x"]}, {}, "")
  with pytest.raises(UserError, match="rows.csv: line 3, column 'n': empty cell .the model was"
                                      " trained with no empty cells"):
    strict.read_rows("rows.csv", rows)
  filling = tabular.Preprocessor(["n", "c"], {"c": ["x"]}, {"n": 4.0, "c": "x"}, "median")
  np.testing.assert_array_equal(filling.read_rows("rows.csv", rows), [[1.5, 1], [4, 1]])
  with pytest.raises(UserError, match="line 2, column 'n': 'high' is not a finite number"):
    filling.read_rows("rows.csv", rows.replace("1.5", "high"))


def test_prediction_columns_keep_class_names_and_write_regression_values():
  from trainer import tasks  # pylint: disable=g-import-not-at-top
  stats = {"classes": ["a, b", 'say "c"']}
  logits = np.log(np.array([[3.0], [1 / 9]]))  # one sigmoid output: p = 0.75, 0.1
  columns = tasks.Classification().predict_columns(logits, stats)
  assert list(columns) == ["label", "p_a, b", 'p_say "c"']
  assert columns["label"] == ['say "c"', "a, b"]
  assert columns['p_say "c"'] == ["0.750000", "0.100000"]
  columns = tasks.Regression().predict_columns(np.array([[0.5], [-1.0]]),
                                              {"target": {"mean": 100.0, "std": 20.0}})
  assert columns == {"prediction": ["110", "80"]}


@pytest.mark.slow
@pytest.mark.parametrize("flags,expected", [
    ([], "line 2, column 'a': empty cell"),
    # Rows dropped, then a later bad-input error: still one line on stderr.
    (["--config.data.missing=drop", "--config.train.batch_size=100"], "multiple of the device"),
])
def test_cli_bad_tabular_input_is_exit_2_one_line(tmp_path, flags, expected):
  path = _write_text(tmp_path / "t.csv", "a,b,y\n,1,x\n" + "1,2,x\n3,4,y\n" * 10)
  workdir = tmp_path / "run"
  proc = run_trainer(["--config=trainer/configs/csv.py", f"--config.data.path={path}",
                      "--config.data.label_column=y", *flags, f"--workdir={workdir}"],
                     timeout=300)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
  assert not workdir.exists()


def test_csv_fields_are_rejected_for_other_sources():
  config = tiny_config("breast_cancer.py", data__categorical_columns="mean radius")
  with pytest.raises(UserError, match="only config.data.source=csv has it"):
    data.load(config)


def _sklearn_penalty(ds) -> float:
  """The L2 weight of scikit-learn's default C=1: 1 / (C * n_train) on the mean loss."""
  return 1.0 / len(ds.train_y)


def _predict(workdir, input_path, output_path):
  return subprocess.run([sys.executable, "-m", "trainer.predict", f"--workdir={workdir}",
                         f"--input={input_path}", f"--output={output_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_wine_with_names_categories_and_empty_cells_trains_and_predicts(tmp_path):
  """The issue's done-when: `csv.py` trains on it, matches scikit-learn, and predicts."""
  frame = wine_frame()
  path = _write(frame, tmp_path / "wine.csv")
  workdir = tmp_path / "run"
  ds = data.load(csv_config(path, "Cultivar", data__missing="mean"))
  args = ["--config=trainer/configs/csv.py", f"--config.data.path={path}",
          "--config.data.label_column=Cultivar", "--config.data.missing=mean",
          f"--config.optimizer.weight_decay={_sklearn_penalty(ds)}", f"--workdir={workdir}"]
  proc = run_trainer(args, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  stats = json.loads((workdir / "data_stats.json").read_text())
  assert stats["classes"] == ["barbera", "barolo", "grignolino"]
  assert stats["preprocess"]["categories"]["hue"] == ["amber", "deep", "pale"]
  sk_accuracy = linear_model.LogisticRegression(max_iter=5000).fit(
      ds.train_x, ds.train_y).score(ds.test_x, ds.test_y)
  print(f"wine: jaxjob {summary['eval']['accuracy']:.3f} scikit-learn {sk_accuracy:.3f}")
  assert summary["eval"]["accuracy"] >= sk_accuracy - 0.03, (summary["eval"], sk_accuracy)
  assert "barolo" in (workdir / "eval" / "report.txt").read_text()

  rows = frame.drop(columns=["Cultivar"])
  rows.insert(0, "id", [f"w{i}" for i in range(len(rows))])
  rows.loc[0, "hue"] = "violet"  # a category the training split never had
  rows.loc[1, "alcohol"] = None
  proc = _predict(workdir, _write(rows, tmp_path / "rows.csv"), tmp_path / "pred.csv")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "column 'hue': 1 row(s) with a category the training split never had" in proc.stderr
  table = pd.read_csv(tmp_path / "pred.csv")
  assert list(table.columns) == ["id", "label", "p_barbera", "p_barolo", "p_grignolino"]
  assert table["id"].tolist() == rows["id"].tolist()
  np.testing.assert_allclose(table.iloc[:, 2:].sum(axis=1), 1.0, atol=1e-5)
  assert (table["label"] == frame["Cultivar"]).mean() > 0.9

  word = rows.assign(alcohol=rows["alcohol"].where(rows.index != 5, "strong"))
  proc = _predict(workdir, _write(word, tmp_path / "word.csv"), tmp_path / "word_pred.csv")
  assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
  assert "line 7, column 'alcohol': 'strong' is not a finite number" in proc.stderr

  bad = rows.rename(columns={"hue": "Hue"})
  proc = _predict(workdir, _write(bad, tmp_path / "bad.csv"), tmp_path / "bad_pred.csv")
  assert proc.returncode == 2 and "missing feature column(s) 'hue'" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "bad_pred.csv").exists()


@pytest.mark.slow
def test_breast_cancer_with_names_and_a_declared_category_matches_scikit_learn(tmp_path):
  path = _write(breast_cancer_frame(), tmp_path / "bc.csv")
  fields = dict(data__missing="median", data__categorical_columns="size band")
  ds = data.load(csv_config(path, "diagnosis", **fields))
  config = csv_config(path, "diagnosis", optimizer__weight_decay=_sklearn_penalty(ds), **fields)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  sk_accuracy = linear_model.LogisticRegression(max_iter=5000).fit(
      ds.train_x, ds.train_y).score(ds.test_x, ds.test_y)
  print(f"breast cancer: jaxjob {summary['eval']['accuracy']:.3f} scikit-learn"
        f" {sk_accuracy:.3f}")
  assert summary["eval"]["accuracy"] >= sk_accuracy - 0.02, (summary["eval"], sk_accuracy)
  assert summary["eval"]["num_examples"] == 114


@pytest.mark.slow
def test_diabetes_regression_r2_matches_scikit_learn(tmp_path):
  frame = diabetes_frame()
  path = _write(frame, tmp_path / "diabetes.csv")
  workdir = tmp_path / "run"
  proc = run_trainer(["--config=trainer/configs/csv.py", f"--config.data.path={path}",
                      "--config.data.label_column=progression", "--config.data.task=regression",
                      "--config.data.missing=median", f"--workdir={workdir}"], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ds = data.load(csv_config(path, "progression", data__task="regression",
                            data__missing="median"))
  target = ds.stats["target"]
  train_y = ds.train_y * target["std"] + target["mean"]
  test_y = ds.test_y * target["std"] + target["mean"]
  references = {name: model.fit(ds.train_x, train_y).score(ds.test_x, test_y)
                for name, model in [("linear", linear_model.LinearRegression()),
                                    ("ridge", linear_model.Ridge(alpha=1.0))]}
  # The held-out rows through `python -m trainer.predict`: the values, not the loss.
  _, test_rows = model_selection.train_test_split(np.arange(len(frame)), test_size=0.2,
                                                  random_state=0)
  rows = frame.iloc[test_rows].drop(columns=["progression"])
  proc = _predict(workdir, _write(rows, tmp_path / "rows.csv"), tmp_path / "pred.csv")
  assert proc.returncode == 0, proc.stderr[-3000:]
  values = pd.read_csv(tmp_path / "pred.csv")["prediction"].to_numpy()
  r2 = metrics.r2_score(frame["progression"].to_numpy()[test_rows], values)
  print(f"diabetes R2: jaxjob {r2:.3f} scikit-learn {references}")
  assert r2 >= max(references.values()) - 0.02, (r2, references)
