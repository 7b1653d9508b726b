"""Training: the pure step, end-to-end runs, artefacts, resume and the tutorial accuracy."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from tests.conftest import tiny_config
from trainer import checkpoint
from trainer import data
from trainer import models
from trainer import report
from trainer import tasks
from trainer import train
from trainer.errors import UserError


def _step_fn(config, num_classes=3, num_features=5):
  model = models.create(config.model, num_classes)
  tx, schedule = train.make_optimizer(config)
  state = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                   example_x=jnp.zeros((1, num_features)))
  step = jax.jit(lambda s, b: train.train_step(s, b, model=model, task=tasks.Classification(),
                                                tx=tx, schedule=schedule, l2=0.0))
  return state, step


def _batch(n=16, d=5, k=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((n, d)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, k, n), jnp.int32)}


def test_train_step_is_pure_and_learns():
  state, step = _step_fn(tiny_config())
  batch = _batch()
  a, metrics_a = step(state, batch)
  b, metrics_b = step(state, batch)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))
  assert float(metrics_a["loss"]) == float(metrics_b["loss"]) and int(a.step) == 1
  for _ in range(50):
    a, metrics = step(a, batch)
  assert float(metrics["loss"]) < float(metrics_a["loss"]) / 2


def test_nonfinite_step_leaves_state_unchanged():
  state, step = _step_fn(tiny_config())
  state, _ = step(state, _batch())
  bad = _batch()
  bad["x"] = bad["x"].at[0, 0].set(jnp.nan)
  new, metrics = step(state, bad)
  assert float(metrics["finite"]) == 0.0 and int(new.step) == int(state.step) + 1
  same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), (new.params, new.opt_state),
                      (state.params, state.opt_state))
  assert jax.tree.all(same)


def test_binary_model_has_one_sigmoid_output():
  config = tiny_config("breast_cancer.py")
  model = models.create(config.model, 1)
  params, model_state = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4)))
  logits, _ = model.apply(params, model_state, jnp.ones((3, 4)))
  assert logits.shape == (3, 1) and model_state is None
  probs = tasks.probabilities(logits)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1.0, rtol=1e-6)
  loss = tasks.loss_per_example(logits, jnp.array([0, 1, 1]))
  expected = optax.sigmoid_binary_cross_entropy(logits[:, 0], jnp.array([0.0, 1.0, 1.0]))
  np.testing.assert_allclose(np.asarray(loss), np.asarray(expected))


@pytest.mark.parametrize("outputs", [1, 4])
def test_held_out_losses_and_predictions_on_the_host_equal_the_training_loss(outputs):
  # The evaluation computes them in NumPy from `predict`'s host logits; the step in JAX.
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((64, 3, outputs)) * 30).astype(np.float32)
  logits[0, 0] = 1e4  # far past exp's float32 range either way
  logits[1, 0] = -1e4
  labels = rng.integers(0, max(outputs, 2), (64, 3)).astype(np.int32)
  losses, preds = tasks._losses_and_predictions(logits, labels)
  np.testing.assert_allclose(losses, np.asarray(tasks.loss_per_example(logits, labels)),
                             rtol=2e-6, atol=1e-6)
  np.testing.assert_array_equal(preds, np.asarray(tasks.predictions(jnp.asarray(logits))))
  assert losses.dtype == np.float32 and np.isfinite(losses).all()


def test_default_run_writes_every_artefact(tmp_path):
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(tiny_config(train__steps=60, train__eval_every=30,
                                                 train__checkpoint_every=30), str(workdir))
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  for key in ("final_step", "eval", "train_loss", "params_sha256", "num_devices",
              "num_processes", "wall_time_s", "examples_per_second"):
    assert on_disk[key] is not None, key
  assert on_disk["final_step"] == 60 and on_disk["num_devices"] == 8
  assert on_disk["eval"]["accuracy"] > 0.8
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "examples_per_s"} <= set(rows[0])
  with Image.open(workdir / "plots" / "history.png") as image:
    image.verify()
    assert image.format == "PNG" and image.size[0] > 500
  report_json = json.loads((workdir / "eval" / "report.json").read_text())
  assert set(report_json) >= {"0", "9", "accuracy", "macro avg"}
  assert abs(report_json["accuracy"] - on_disk["eval"]["accuracy"]) < 1e-9
  assert "precision" in (workdir / "eval" / "report.txt").read_text()
  run = json.loads((workdir / "run.json").read_text())
  assert run["config"]["train"]["steps"] == 60 and run["starts"][0]["exit"]["code"] == 0
  assert list((workdir / "tensorboard").iterdir())
  assert checkpoint.Checkpointer(workdir / "checkpoints", save_every=30, keep=2).all_steps() == [
      30, 60]
  stats = json.loads((workdir / "data_stats.json").read_text())
  assert len(stats["mean"]) == 64


def test_resume_is_bit_identical(tmp_path):
  # A constant schedule makes "40 steps, then resume to 60" the same computation as 60
  # steps; what is left to check is the restored state and the data order.
  cfg = lambda steps: tiny_config(train__steps=steps, train__checkpoint_every=20,
                                  optimizer__schedule="constant")
  full = train.train_and_evaluate(cfg(60), str(tmp_path / "full"))
  part = tmp_path / "part"
  first = train.train_and_evaluate(cfg(40), str(part))
  assert first["params_sha256"] != full["params_sha256"]
  with pytest.raises(UserError, match="train.steps: 40 -> 60"):
    train.train_and_evaluate(cfg(60), str(part))
  resumed = train.train_and_evaluate(cfg(60), str(part), allow_config_change=True)
  assert resumed["resumed_from_step"] == 40
  assert resumed["params_sha256"] == full["params_sha256"]
  run = json.loads((part / "run.json").read_text())
  assert [s["resumed_from_step"] for s in run["starts"]] == [0, 40]
  rows = [json.loads(l)["step"] for l in (part / "metrics.jsonl").read_text().splitlines()]
  assert rows == list(range(10, 61, 10))


def test_checkpoint_round_trip(tmp_path):
  config = tiny_config()
  state, step = _step_fn(config)
  state, _ = step(state, _batch())
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  ckpt.save(1, state)
  ckpt.close()
  again = checkpoint.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  restored, at = again.restore_latest(checkpoint.abstract(state))
  again.close()
  assert at == 1
  assert report.fingerprint(restored.params) == report.fingerprint(state.params)
  same = jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), restored, state)
  assert jax.tree.all(same)
  step_number, loaded = checkpoint.load_latest(tmp_path / "ckpt")
  assert step_number == 1
  np.testing.assert_array_equal(loaded["params"]["hidden_0"]["kernel"],
                                np.asarray(state.params["hidden_0"]["kernel"]))


@pytest.mark.slow
@pytest.mark.parametrize("classes,tolerance", [("0,1", 0.01), ("", 0.02)])
def test_mobile_price_matches_scikit_learn(tmp_path, mobile_price_csv, classes, tolerance):
  config = tiny_config("mobile_price.py", data__path=str(mobile_price_csv),
                       data__classes=classes)
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  ds = data.load(config)
  reference = LogisticRegression(max_iter=5000).fit(ds.train_x, ds.train_y)
  sk_accuracy = reference.score(ds.test_x, ds.test_y)
  assert summary["eval"]["accuracy"] >= sk_accuracy - tolerance, (summary["eval"], sk_accuracy)
  assert summary["eval"]["num_examples"] == (200 if classes else 400)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sharding", "pmap"])
def test_long_run_on_eight_devices_does_not_deadlock(tmp_path, strategy):
  # Hundreds of collective-containing steps on 8 virtual devices and 2 cores: with
  # unbounded async dispatch XLA:CPU deadlocks here within ~50 queued steps.
  config = tiny_config(train__steps=800, train__batch_size=64, train__log_every=100,
                       train__eval_every=400, train__checkpoint_every=400,
                       parallel__strategy=strategy)
  summary = train.train_and_evaluate(config, str(tmp_path / strategy))
  assert summary["final_step"] == 800 and summary["eval"]["accuracy"] > 0.9


@pytest.mark.parametrize("seed", [7, 2**31])  # 2**31: past int32, the key is made eagerly
def test_the_initial_state_is_made_from_the_seeds_key(seed):
  job = train.build(tiny_config(seed=seed))
  expected = train.create_train_state(jax.random.PRNGKey(seed), model=job.model, tx=job.tx,
                                      example_x=job.dataset.example_x())
  for got, want in zip(jax.tree.leaves(job.state), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_resumed_run_never_makes_the_initial_state(tmp_path):
  workdir = str(tmp_path / "run")
  cadence = dict(train__checkpoint_every=30, train__eval_every=30)
  train.train_and_evaluate(tiny_config(train__steps=60, **cadence), workdir)
  job = train.build(tiny_config(train__steps=90, **cadence))
  made, make = [], job.make_state
  job.make_state = lambda **kwargs: made.append(1) or make(**kwargs)
  summary = train.run(job, workdir, allow_config_change=True)
  assert made == [] and summary["resumed_from_step"] == 60 and summary["final_step"] == 90
  assert job.state is not None and made == [1]  # made when asked for
