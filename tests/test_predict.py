"""`python -m trainer.predict`: a vmapped single-example model over a run's checkpoint."""

import os
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from tests.conftest import ROOT, tiny_config
from trainer import models
from trainer import predict
from trainer import tasks
from trainer import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mobile_price_csv_path):
  workdir = tmp_path_factory.mktemp("predict") / "run"
  train.train_and_evaluate(tiny_config("mobile_price.py", data__path=str(mobile_price_csv_path),
                                       data__classes="", train__steps=300,
                                       train__eval_every=300), str(workdir))
  return workdir


@pytest.fixture(scope="module")
def mobile_price_csv_path():
  from tests.conftest import DATA_DIR  # pylint: disable=g-import-not-at-top
  return DATA_DIR / "train.csv"


def _predict(run_dir, input_path, output_path):
  return subprocess.run([sys.executable, "-m", "trainer.predict", f"--workdir={run_dir}",
                         f"--input={input_path}", f"--output={output_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)


def test_predicts_the_unlabelled_test_split(run_dir, mobile_price_csv_path, tmp_path):
  out = tmp_path / "pred.csv"
  proc = _predict(run_dir, mobile_price_csv_path.parent / "test.csv", out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  table = pd.read_csv(out)
  assert list(table.columns) == ["id", "label", "p_0", "p_1", "p_2", "p_3"]
  assert len(table) == 1000 and table["id"].tolist() == list(range(1, 1001))
  np.testing.assert_allclose(table[["p_0", "p_1", "p_2", "p_3"]].sum(axis=1), 1.0, atol=1e-5)
  assert set(table["label"]) <= {0, 1, 2, 3} and table["label"].nunique() == 4


def test_vmapped_single_example_model_equals_the_batched_model(run_dir, mobile_price_csv_path):
  config, stats, variables = predict.load_run(str(run_dir))
  raw = pd.read_csv(mobile_price_csv_path)[stats["features"]].to_numpy(np.float32)[:50]
  logits = predict.predict(config, stats, variables, raw)
  x = (raw - np.asarray(stats["mean"], np.float32)) / np.asarray(stats["std"], np.float32)
  model = models.create(config.model, 4)
  batched = model.apply(variables["params"], None, jnp.asarray(x))[0]
  np.testing.assert_allclose(logits, np.asarray(batched), rtol=1e-5, atol=1e-6)
  assert np.asarray(tasks.probabilities(jnp.asarray(logits))).shape == (50, 4)


@pytest.mark.parametrize("edit,expected", [
    (lambda t: t.drop(columns=["ram"]), "missing feature column(s) 'ram'"),
    (lambda t: t.assign(colour=1), "unknown column(s) 'colour'"),
])
def test_bad_columns_exit_2(run_dir, mobile_price_csv_path, tmp_path, edit, expected):
  bad = tmp_path / "bad.csv"
  edit(pd.read_csv(mobile_price_csv_path.parent / "test.csv")).to_csv(bad, index=False)
  proc = _predict(run_dir, bad, tmp_path / "out.csv")
  assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("flags_given,expected", [
    ([], "Flag --workdir must have a value other than None"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    (["--workdir=w", "--input=i", "--output=o", "extra"],
     "unexpected positional arguments ['extra']"),
])
def test_bad_flags_exit_2_with_one_line(flags_given, expected):
  proc = subprocess.run([sys.executable, "-m", "trainer.predict", *flags_given], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1


def test_an_unwritable_output_or_a_corrupt_run_exits_2(run_dir, mobile_price_csv_path, tmp_path):
  test_csv = mobile_price_csv_path.parent / "test.csv"
  (tmp_path / "a_folder").mkdir()
  proc = _predict(run_dir, test_csv, tmp_path / "a_folder")
  assert proc.returncode == 2 and "--output=" in proc.stderr and "cannot write there" in (
      proc.stderr), proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("run.json", "data_stats.json"):
    (broken / name).write_text((run_dir / name).read_text())
  for content, what in (("{not json", "is not valid JSON"), ("[1, 2]", "is a JSON list")):
    (broken / "data_stats.json").write_text(content)
    proc = _predict(broken, test_csv, tmp_path / "out.csv")
    assert proc.returncode == 2 and f"data_stats.json {what}" in proc.stderr and (
        "expected the data statistics a run writes" in proc.stderr), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()


def test_an_output_that_is_no_regular_file_or_a_bad_checkpoint_exits_2_untouched(
    run_dir, mobile_price_csv_path, tmp_path):
  test_csv = mobile_price_csv_path.parent / "test.csv"
  fifo = tmp_path / "fifo"  # like /dev/null: replacing it with a file would break it
  os.mkfifo(fifo)
  folder = tmp_path / "a_folder"
  folder.mkdir()
  for output, expected in ((fifo, "it exists and is not a regular file"),
                           (folder, "cannot write there: it exists and is not a regular"),
                           ("", "expected the path of a CSV file to write")):
    proc = _predict(run_dir, test_csv, output)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1
  assert stat.S_ISFIFO(fifo.stat().st_mode) and sorted(p.name for p in tmp_path.iterdir()) == [
      "a_folder", "fifo"]  # no temporary file left beside them
  assert not list(ROOT.glob(".*.tmp-*"))
  broken = tmp_path / "broken"
  shutil.copytree(run_dir, broken)
  metadata = next((broken / "checkpoints").glob("*/default/_METADATA"))
  metadata.write_text("{garbage")
  proc = _predict(broken, test_csv, tmp_path / "out.csv")
  assert proc.returncode == 2 and "its newest committed checkpoint cannot be read" in (
      proc.stderr), proc.stderr[-2000:]
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()
