"""The transformer language model and its token data: shapes, causality, sources, a run."""

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, run_trainer, tiny_config
from trainer import data
from trainer import models
from trainer import train
from trainer.data import tokens
from trainer.errors import UserError
from trainer.models import transformer


def _lm(**kwargs):
  args = dict(vocab_size=64, seq_len=16, d_model=32, num_layers=2, num_heads=4)
  args.update(kwargs)
  model = transformer.TransformerLM(**args)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
  return model, params


def test_logits_shape_and_dtypes():
  model, params = _lm(dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (3, 10)), jnp.int32)
  logits = model.apply({"params": params}, x)
  assert logits.shape == (3, 10, 64) and logits.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  with pytest.raises(ValueError, match="T <= 16"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
  model, params = _lm()
  x = np.random.default_rng(1).integers(0, 64, (2, 16))
  t = 9
  y = x.copy()
  y[:, t] = (y[:, t] + 1) % 64
  a = np.asarray(model.apply({"params": params}, jnp.asarray(x)))
  b = np.asarray(model.apply({"params": params}, jnp.asarray(y)))
  np.testing.assert_array_equal(a[:, :t], b[:, :t])
  assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 1e-6  # every later position moves


def test_untied_head_adds_vocab_by_width_parameters():
  _, tied = _lm()
  _, untied = _lm(tie_embeddings=False)
  assert transformer.num_params(untied) - transformer.num_params(tied) == 64 * 32


def test_gpt2_small_config_is_124m_and_matches_the_flop_anchor():
  config = tiny_config("gpt2_small.py")
  model = models.create(config.model)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 1024), jnp.int32))[0])
  n = transformer.num_params(shapes)
  assert 124e6 < n < 125e6, n
  # perf-anchors.md section 2.3: 8.03e8 (causal) and 8.60e8 FLOPs/token for N = 124.4M.
  causal = transformer.flops_per_token(num_params=n, num_layers=12, d_model=768, seq_len=1024)
  palm = transformer.flops_per_token(num_params=n, num_layers=12, d_model=768, seq_len=1024,
                                     causal=False)
  assert abs(causal / 8.03e8 - 1) < 0.01 and abs(palm / 8.60e8 - 1) < 0.01


def test_bad_model_fields_are_user_errors():
  with pytest.raises(UserError, match="config.model.dtype"):
    models.create(tiny_config("lm_tiny.py", model__dtype="float16").model)
  with pytest.raises(UserError, match="multiple of config.model.num_heads"):
    models.create(tiny_config("lm_tiny.py", model__num_heads=5).model)
  # A key the transformer does not take (the MLP's) names the model and its keys.
  with pytest.raises(UserError, match="config.model.hidden: model 'transformer' takes no such"
                     " key; it accepts attention, d_model"):
    models.create(tiny_config("lm_tiny.py", model__hidden=(8,)).model)


def test_synthetic_tokens_are_deterministic_and_in_range():
  a = tokens.synthetic_tokens(0, 5000, 300)
  assert len(a) == 5000 and a.min() >= 0 and a.max() < 300
  np.testing.assert_array_equal(a, tokens.synthetic_tokens(0, 5000, 300))
  assert not np.array_equal(a, tokens.synthetic_tokens(1, 5000, 300))


def test_windows_shift_by_one_and_splits_do_not_overlap():
  ds = data.load(tiny_config("lm_tiny.py", data__num_tokens=10_000))
  assert ds.task == "lm" and ds.train_x.shape == (len(ds.train_x), 64)
  x, y = ds.train_x[np.arange(5)], ds.train_y[np.arange(5)]
  assert x.dtype == np.int32 and x.shape == (5, 64)
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  np.testing.assert_array_equal(x[1:, 0], y[:-1, -1])  # stride T: windows share one token
  np.testing.assert_array_equal(ds.train_x[2], x[2])
  np.testing.assert_array_equal(ds.train_x[1:3], x[1:3])
  assert len(ds.train_x) + len(ds.test_x) == (10_000 - 1) // 64
  stream = tokens.synthetic_tokens(0, 10_000, 256)
  np.testing.assert_array_equal(np.asarray(ds.test_x)[0],
                                stream[len(ds.train_x) * 64:len(ds.train_x) * 64 + 64])
  assert ds.stats["test_windows"] == len(ds.test_y) == 8


@pytest.mark.parametrize("dtype", ["uint16", "int32"])
def test_memmap_token_file(tmp_path, dtype):
  stream = (np.arange(3000) * 7 % 256).astype(dtype)
  path = tmp_path / "train.bin"
  stream.tofile(path)
  ds = data.load(tiny_config("lm_tiny.py", data__token_path=str(path), data__token_dtype=dtype,
                             data__test_fraction=0.1))
  assert isinstance(ds.train_x._tokens, np.memmap)  # pylint: disable=protected-access
  idx = np.array([3, 0, 7])
  np.testing.assert_array_equal(ds.train_x[idx], np.stack([stream[i * 64:i * 64 + 64]
                                                           for i in idx]))
  np.testing.assert_array_equal(ds.train_y[idx][:, -1], stream[idx * 64 + 64])
  assert len(ds.train_x) == 41 and len(ds.test_x) == 5 and ds.stats["source"] == str(path)


def test_bad_token_files_are_user_errors(tmp_path, monkeypatch):
  cfg = lambda path, **kw: tiny_config("lm_tiny.py", data__token_path=str(path), **kw)
  with pytest.raises(UserError, match="no such file"):
    data.load(cfg(tmp_path / "missing.bin"))
  odd = tmp_path / "odd.bin"
  odd.write_bytes(b"abc")
  with pytest.raises(UserError, match="not a whole number of uint16"):
    data.load(cfg(odd))
  big = tmp_path / "big.bin"
  np.full(1000, 300, np.uint16).tofile(big)
  with pytest.raises(UserError, match="token id 300 at position 0 is outside"):
    data.load(cfg(big))
  middle = tmp_path / "middle.bin"  # one bad id far from both ends, in a chunk of its own
  ids = np.zeros(5000, np.uint16)
  ids[2600] = 301
  ids.tofile(middle)
  monkeypatch.setattr(tokens, "_CHECKED_TOKENS", 512)
  with pytest.raises(UserError, match="token id 301 at position 2600 is outside"):
    data.load(cfg(middle))
  short = tmp_path / "short.bin"
  np.zeros(70, np.uint16).tofile(short)
  with pytest.raises(UserError, match="need at least 2"):
    data.load(cfg(short))
  with pytest.raises(UserError, match="must be local"):
    data.load(cfg("gs://bucket/train.bin"))
  with pytest.raises(UserError, match="token_dtype"):
    data.load(cfg(big, data__token_dtype="int8"))


def test_tiny_lm_trains_on_eight_devices(tmp_path):
  workdir = tmp_path / "lm"
  summary = train.train_and_evaluate(
      tiny_config("lm_tiny.py", train__steps=80, train__eval_every=40,
                  train__checkpoint_every=40), str(workdir))
  assert summary["num_devices"] == 8 and summary["final_step"] == 80
  assert summary["eval"]["loss"] < math.log(256) - 1.5, summary["eval"]
  assert summary["train_loss"] < math.log(256) - 1.5
  report_json = json.loads((workdir / "eval" / "report.json").read_text())
  assert set(report_json) == {"loss", "accuracy", "perplexity", "num_tokens"}
  assert abs(report_json["perplexity"] - math.exp(report_json["loss"])) < 1e-6
  assert "precision" not in (workdir / "eval" / "report.txt").read_text()
  history = json.loads((workdir / "eval" / "history.json").read_text())
  assert [row["step"] for row in history] == [40, 80]
  assert json.loads((workdir / "data_stats.json").read_text())["vocab_size"] == 256
  assert (workdir / "plots" / "history.png").stat().st_size > 1000


def test_lm_eval_matches_full_logits():
  config = tiny_config("lm_tiny.py", data__num_tokens=8_000)
  ds = data.load(config)
  model = models.create(config.model)
  from trainer import parallel  # pylint: disable=g-import-not-at-top
  from trainer import tasks  # pylint: disable=g-import-not-at-top
  strategy = parallel.create(config)
  params, _ = model.init(jax.random.PRNGKey(0), jnp.asarray(ds.train_x[:1]))
  variables = {"params": jax.device_put(params, strategy.replicated)}
  chunked = tasks.LanguageModel().evaluate(strategy, model, variables, ds, chunk=3)
  full = tasks.Classification().metrics(strategy.predict(model.eval_apply, variables,
                                                         ds.test_x), ds.test_y)
  assert abs(chunked["loss"] - full["loss"]) < 1e-5
  assert abs(chunked["accuracy"] - full["accuracy"]) < 1e-9


@pytest.mark.slow
def test_lm_tiny_config_runs_from_the_command_line(tmp_path):
  proc = run_trainer(["--config=trainer/configs/lm_tiny.py", f"--workdir={tmp_path / 'run'}",
                      "--config.train.steps=60", "--config.train.eval_every=30",
                      "--config.train.checkpoint_every=30", "--config.parallel.strategy=pmap"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "perplexity" in proc.stdout
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert summary["strategy"] == "pmap" and summary["eval"]["loss"] < math.log(256) - 1.0
  # Prediction labels CSV rows: a language model run is refused with one line.
  rows = tmp_path / "rows.csv"
  rows.write_text("a,b\n1,2\n")
  proc = subprocess.run([sys.executable, "-m", "trainer.predict", f"--workdir={tmp_path / 'run'}",
                         f"--input={rows}", f"--output={tmp_path / 'out.csv'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and "a lm run without feature columns" in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.csv").exists()
