"""The extension API: registry, per-model configs, tasks (regression), models with state and
randomness, hooks, the Python entry point, and the example project (examples/digits_nnx)
trained, resumed after kill -9 and predicted, in one and two processes."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LinearRegression

from tests.conftest import EXAMPLE_DIR, ROOT, run_trainer, tiny_config
from trainer import data
from trainer import hooks
from trainer import models
from trainer import registry
from trainer import tasks
from trainer import train
from trainer.errors import UserError

sys.path.insert(0, str(EXAMPLE_DIR))  # as PYTHONPATH=examples/digits_nnx does for the CLI
EXAMPLE_CONFIG = EXAMPLE_DIR / "digits_example" / "configs" / "digits.py"
ENV = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(EXAMPLE_DIR)])}


def no_decay(params):
  """A weight-decay mask (config.optimizer.weight_decay_mask) that decays nothing."""
  return jax.tree.map(lambda p: False, params)


class NoisyNormNet(nn.Module):
  """A Linen module with BatchNorm and Dropout, for the state and randomness tests."""

  num_outputs: int
  rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(32)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(self.rate, deterministic=not train)(nn.relu(x))
    return nn.Dense(self.num_outputs)(x)


def test_registry_resolves_builtins_and_import_paths():
  from trainer.models import builtin  # pylint: disable=g-import-not-at-top
  assert registry.resolve("model", "mlp") is builtin.mlp
  assert registry.resolve("model", "trainer.models.builtin:MLP") is builtin.MLP
  assert registry.resolve("task", "regression") is tasks.Regression
  assert registry.resolve("data", "tests.test_extension:no_decay") is no_decay
  with pytest.raises(UserError, match=r"config.model.name='resnet': expected one of logreg,"
                     " mlp, cnn, transformer or an importable module:attribute"):
    registry.resolve("model", "resnet")
  with pytest.raises(UserError, match="cannot import nosuchpkg"):
    registry.resolve("model", "nosuchpkg.model:Net")
  with pytest.raises(UserError, match="trainer.models.builtin has no attribute 'Nope'"):
    registry.resolve("model", "trainer.models.builtin:Nope")


def test_model_config_lists_every_key_and_rejects_others():
  cfg = models.config("transformer", d_model=64)
  assert cfg.d_model == 64 and cfg.num_heads == 4 and "num_outputs" not in cfg
  # Linen dataclass fields and NNX constructor arguments are read the same way.
  assert set(models.config("tests.test_extension:NoisyNormNet")) == {"name", "rate"}
  assert set(models.config("digits_example.model:Classifier")) == {
      "name", "num_features", "hidden", "depth", "dropout"}
  with pytest.raises(UserError, match="config.model.hidden: model 'transformer' takes no such"
                     " key; it accepts attention, d_model, dtype"):
    models.create({"name": "transformer", "hidden": (8,)})
  with pytest.raises(UserError, match="config.model.widht: model 'mlp' takes no such key"):
    models.config("mlp", widht=3)


def test_unknown_model_key_on_the_command_line_is_exit_2_with_one_line(tmp_path):
  cases = {
      "transformer": (["--config=trainer/configs/lm_tiny.py", "--config.model.hidden=8"],
                      "config.model.hidden: model 'transformer' takes no such key; it accepts"
                      " attention, d_model, dtype, mlp_ratio, num_heads"),
      "switched": (["--config.model.name=logreg"],
                   "config.model.activation: model 'logreg' takes no such key; it accepts"
                   " dtype"),
  }
  for name, (args, expected) in cases.items():
    proc = run_trainer([*args, f"--workdir={tmp_path / name}"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not (tmp_path / name).exists()


def _state_and_step(model, config, **kwargs):
  tx, schedule = train.make_optimizer(config)
  state = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                   example_x=jnp.zeros((1, 6)))
  step = jax.jit(lambda s, b: train.train_step(
      s, b, model=model, task=tasks.Classification(), tx=tx, schedule=schedule, **kwargs))
  return state, step


def _batch(n=32, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.standard_normal((n, 6)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, 3, n), jnp.int32)}


def test_weight_decay_applies_by_a_user_mask():
  config = tiny_config(optimizer__name="sgd", optimizer__momentum=0.0,
                       optimizer__weight_decay=0.5, optimizer__schedule="constant")
  model = models.create({"name": "mlp", "hidden": (8,)}, 3)
  results = {}
  for name, l2, mask in (("none", 0.0, None), ("user", 0.5, no_decay),
                         ("matrices", 0.5, "matrices")):
    config.optimizer.weight_decay_mask = mask if isinstance(mask, str) else (
        "tests.test_extension:no_decay")
    from trainer import optimizers  # pylint: disable=g-import-not-at-top
    state, step = _state_and_step(model, config, l2=l2,
                                  mask=optimizers.weight_decay_mask(config))
    results[name] = step(state, _batch())[0].params
  same = lambda a, b: all(bool(jnp.array_equal(x, y)) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert same(results["none"], results["user"])
  assert not same(results["none"], results["matrices"])
  # "matrices" decays kernels only: biases move exactly as without decay.
  assert bool(jnp.array_equal(results["none"]["head"]["bias"],
                              results["matrices"]["head"]["bias"]))


def test_dropout_keys_come_from_seed_and_step_and_batch_stats_update():
  model = models.Model(NoisyNormNet(3))
  state, step = _state_and_step(model, tiny_config(optimizer__schedule="constant"))
  assert set(state.model_state) == {"batch_stats"}
  a, metrics_a = step(state, _batch())
  b, metrics_b = step(state, _batch())
  assert float(metrics_a["loss"]) == float(metrics_b["loss"])  # pure: same step, same keys
  later, metrics_c = step(state.replace(step=state.step + 1), _batch())
  assert float(metrics_c["loss"]) != float(metrics_a["loss"])  # another step, other masks
  moved = jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a.model_state, state.model_state)
  assert all(jax.tree.leaves(moved))
  bad = _batch()
  bad["x"] = bad["x"].at[0, 0].set(jnp.nan)
  kept, metrics = step(a, bad)
  assert float(metrics["finite"]) == 0.0
  assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), kept.model_state,
                                   a.model_state))
  # Evaluation is deterministic: no dropout, running statistics.
  x = _batch()["x"]
  variables = {"params": a.params, **a.model_state}
  np.testing.assert_array_equal(model.eval_apply(variables, x), model.eval_apply(variables, x))
  del later


@pytest.mark.slow
def test_diabetes_regression_matches_linear_regression_and_predicts_values(tmp_path):
  config = tiny_config("diabetes.py")
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  ds = data.load(config)
  assert ds.task == "regression" and ds.train_y.dtype == np.float32
  target = ds.stats["target"]
  assert abs(float(ds.train_y.mean())) < 1e-5 and abs(float(ds.train_y.std()) - 1) < 1e-4
  actual = ds.test_y * target["std"] + target["mean"]
  reference = LinearRegression().fit(ds.train_x, ds.train_y * target["std"] + target["mean"])
  sk_r2 = reference.score(ds.test_x, actual)
  assert summary["eval"]["r2"] >= sk_r2 - 0.02, (summary["eval"], sk_r2)
  assert set(summary["eval"]) >= {"loss", "mae", "rmse", "r2"}
  assert summary["eval"]["mae"] > 10  # original units (the score spans 25..346), not z
  report_json = json.loads((workdir / "eval" / "report.json").read_text())
  assert report_json["r2"] == summary["eval"]["r2"]
  assert (workdir / "plots" / "predicted_vs_actual.png").stat().st_size > 1000
  # Prediction writes values in the target's units.
  raw = ds.test_x * np.asarray(ds.stats["std"]) + np.asarray(ds.stats["mean"])
  table = pd.DataFrame(raw, columns=ds.feature_names)
  table.insert(0, "id", range(len(table)))
  table.to_csv(tmp_path / "rows.csv", index=False)
  proc = subprocess.run([sys.executable, "-m", "trainer.predict", f"--workdir={workdir}",
                         f"--input={tmp_path / 'rows.csv'}", f"--output={tmp_path / 'p.csv'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  predicted = pd.read_csv(tmp_path / "p.csv")
  assert list(predicted.columns) == ["id", "prediction"]
  r2 = 1 - np.sum((predicted["prediction"] - actual) ** 2) / np.sum((actual - actual.mean()) ** 2)
  assert abs(r2 - summary["eval"]["r2"]) < 1e-3


class _Count(hooks.Hook):

  def __init__(self, every):
    self.every, self.calls = every, []

  def __call__(self, loop, done, state):
    self.calls.append((done, int(state.step)))


def _example(**overrides):
  return tiny_config(EXAMPLE_CONFIG, **overrides)


@pytest.mark.slow
def test_python_api_takes_objects_and_user_hooks(tmp_path):
  from digits_example import data as example_data  # pylint: disable=g-import-not-at-top
  from digits_example import task as example_task  # pylint: disable=g-import-not-at-top
  count = _Count(every=25)
  config = _example(train__steps=60, train__checkpoint_every=60, train__eval_every=60,
                    optimizer__warmup_steps=5)
  summary = train.train_and_evaluate(
      config, str(tmp_path / "objects"), model=NoisyNormNet(10, rate=0.1),
      dataset=example_data.digits(seed=0), task=example_task.DigitsTask(), hooks=[count])
  assert count.calls == [(25, 25), (50, 50), (60, 60)]
  assert summary["eval"]["accuracy"] > 0.6 and "balanced_accuracy" in summary["eval"]  # chance: 0.1
  assert "model_state_sha256" in summary


@pytest.mark.slow
def test_example_trains_on_eight_devices_and_resumes_bit_identically(tmp_path):
  cfg = lambda steps: _example(train__steps=steps, train__checkpoint_every=40,
                               train__eval_every=40, optimizer__schedule="constant")
  full = train.train_and_evaluate(cfg(120), str(tmp_path / "full"))
  assert full["num_devices"] == 8 and full["eval"]["accuracy"] > 0.9
  assert 0.85 < full["eval"]["balanced_accuracy"] <= 1.0
  part = tmp_path / "part"
  train.train_and_evaluate(cfg(80), str(part))
  resumed = train.train_and_evaluate(cfg(120), str(part), allow_config_change=True)
  assert resumed["resumed_from_step"] == 80
  assert resumed["params_sha256"] == full["params_sha256"]
  assert resumed["model_state_sha256"] == full["model_state_sha256"]


def _example_args(workdir, steps):
  return [f"--config={EXAMPLE_CONFIG}", f"--config.train.steps={steps}",
          "--config.train.checkpoint_every=20", "--config.train.eval_every=100",
          "--config.train.log_every=20", "--config.distributed.heartbeat_timeout=10",
          f"--workdir={workdir}"]


def _launch(workdir, steps):
  argv = [sys.executable, "-m", "launch", "local", "--processes=2",
          "--devices-per-process=4", "--grace-period=3", "--", *_example_args(workdir, steps)]
  return subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, **ENV), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _committed(workdir) -> list[int]:
  path = workdir / "checkpoints"
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit()) if path.exists() else []


def _trainer_pids(launcher_pid) -> list[int]:
  pids = []
  for task in os.listdir(f"/proc/{launcher_pid}/task"):
    with open(f"/proc/{launcher_pid}/task/{task}/children") as f:
      pids += [int(p) for p in f.read().split()]
  return pids


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_example_two_processes_kill_9_resume_bit_identical_and_predict(tmp_path):
  steps = 160
  reference = tmp_path / "reference"
  proc = _launch(reference, steps)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads((reference / "summary.json").read_text())
  assert summary["num_processes"] == 2 and summary["eval"]["accuracy"] > 0.9

  chaos = tmp_path / "chaos"
  proc = _launch(chaos, steps)
  deadline = time.monotonic() + 300
  while not any(s >= 40 for s in _committed(chaos)):
    assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint to kill after"
    time.sleep(0.05)
  os.kill(_trainer_pids(proc.pid)[-1], signal.SIGKILL)
  proc.communicate(timeout=120)
  assert proc.returncode != 0 and max(_committed(chaos)) < steps
  proc = _launch(chaos, steps)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 0, out[-3000:]
  resumed = json.loads((chaos / "summary.json").read_text())
  assert resumed["resumed_from_step"] >= 40
  assert resumed["params_sha256"] == summary["params_sha256"]
  assert resumed["model_state_sha256"] == summary["model_state_sha256"]

  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  rows = pd.DataFrame(digits.data[:300], columns=digits.feature_names)
  rows.to_csv(tmp_path / "rows.csv", index=False)
  proc = subprocess.run([sys.executable, "-m", "trainer.predict", f"--workdir={chaos}",
                         f"--input={tmp_path / 'rows.csv'}", f"--output={tmp_path / 'p.csv'}"],
                        cwd=ROOT, env=dict(os.environ, **ENV), capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  predicted = pd.read_csv(tmp_path / "p.csv")
  assert list(predicted.columns[:2]) == ["label", "p_0"]
  assert np.mean(predicted["label"].to_numpy() == digits.target[:300]) > 0.9


def test_example_dockerfile_lints_clean_and_extends_the_jaxjob_image():
  dockerfile = EXAMPLE_DIR / "Dockerfile"
  hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")
  proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style",
                         str(dockerfile)], capture_output=True, text=True, check=False)
  assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
  text = dockerfile.read_text()
  # FROM the jaxjob image, the package beside trainer/ on its PYTHONPATH, the user restored.
  assert "FROM ${JAXJOB_IMAGE}" in text and "COPY digits_example/ /app/digits_example/" in text
  assert text.rstrip().splitlines()[-1] == "USER 10001:10001"
  assert "PYTHONPATH=/app" in (ROOT / "Dockerfile").read_text()


def test_batch_statistics_cover_every_device_under_every_strategy():
  from trainer import report  # pylint: disable=g-import-not-at-top
  from trainer.loop import Loop  # pylint: disable=g-import-not-at-top
  means = {}
  for strategy in ("sharding", "pmap", "shard_map"):
    config = tiny_config(parallel__strategy=strategy, optimizer__schedule="constant")
    job = train.build(config, model=NoisyNormNet(10))
    state = job.strategy.to_device(job.state)
    batch = Loop(job, None, report.Reporter(None), inject_faults=False).batch(0)
    new, _ = job.step_fn(state, batch)
    mean = np.asarray(new.model_state["batch_stats"]["BatchNorm_0"]["mean"])
    if strategy == "pmap":  # one copy per device, identical after the pmean
      assert mean.shape[0] == 8 and all(np.array_equal(m, mean[0]) for m in mean)
      mean = mean[0]
    means[strategy] = mean
  assert np.abs(means["sharding"]).max() > 1e-3  # the statistics moved
  # The mean of 8 per-device batch means is the global batch mean.
  np.testing.assert_allclose(means["pmap"], means["sharding"], atol=1e-6)
  np.testing.assert_allclose(means["shard_map"], means["sharding"], atol=1e-6)


class _Rows:
  """A random-access source; `batched` adds `__getitems__` returning one stacked dict."""

  def __init__(self, n, batched=False):
    self.x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    self.y = (np.arange(n) % 2).astype(np.int32)
    if batched:
      self.__getitems__ = lambda idx: {"x": self.x[idx], "y": self.y[idx]}

  def __len__(self):
    return len(self.y)

  def __getitem__(self, i):
    return {"x": self.x[i], "y": self.y[i]}


@pytest.mark.parametrize("batched", [False, True])
def test_random_access_sources_read_like_arrays(batched):
  ds = data.from_sources(_Rows(20, batched), _Rows(6), class_names=["a", "b"],
                         feature_names=["f0", "f1", "f2"])
  assert ds.train_x is None and ds.num_train == 20 and ds.test_x.shape == (6, 3)
  idx = data.process_batch_indices(0, 3, 8, ds.num_train, 1, 2)
  batch = ds.train_batch(idx)
  np.testing.assert_array_equal(batch["x"], _Rows(20).x[idx])
  np.testing.assert_array_equal(batch["y"], _Rows(20).y[idx])
  assert ds.example_x().shape == (1, 3)
  with pytest.raises(UserError, match="rows must be dicts with 'x' and 'y'"):
    data.from_sources(_Rows(4), [{"features": np.zeros(3)}])


@pytest.mark.slow
def test_example_model_keys_override_from_the_command_line(tmp_path):
  workdir = tmp_path / "run"
  proc = run_trainer([f"--config={EXAMPLE_CONFIG}", "--config.model.hidden=32",
                      "--config.model.depth=1", "--config.train.steps=30",
                      "--config.train.eval_every=30", "--config.train.checkpoint_every=30",
                      f"--workdir={workdir}"], env=ENV, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  model = json.loads((workdir / "run.json").read_text())["config"]["model"]
  assert model["hidden"] == 32 and model["depth"] == 1
  from trainer import checkpoint  # pylint: disable=g-import-not-at-top
  _, state = checkpoint.load_latest(workdir / "checkpoints")
  assert sorted(state["params"]["layers"]) == ["0"]
  assert state["params"]["head"]["kernel"].shape == (32, 10)
  assert set(state["model_state"]["batch_stats"]["norms"]) == {"0"}


def test_resume_check_covers_the_models_own_keys(tmp_path):
  from trainer import runinfo  # pylint: disable=g-import-not-at-top
  from trainer import storage  # pylint: disable=g-import-not-at-top
  recorded = _example()
  storage.write_json(tmp_path / "run.json", {"config": json.loads(recorded.to_json())})
  runinfo.check_resume_config(str(tmp_path), _example(), allow_change=False)
  with pytest.raises(UserError, match=r"model.hidden: 128 -> 64"):
    runinfo.check_resume_config(str(tmp_path), _example(model__hidden=64), allow_change=False)
  with pytest.raises(UserError, match=r"data.test_fraction: 0.2 -> 0.3"):
    runinfo.check_resume_config(str(tmp_path), _example(data__test_fraction=0.3),
                                allow_change=False)


def lion(learning_rate, config, mask):
  """A user optimiser (config.optimizer.name = "tests.test_extension:lion")."""
  import optax  # pylint: disable=g-import-not-at-top
  return optax.lion(learning_rate, weight_decay=float(config.weight_decay), mask=mask)


def test_user_optimizer_by_import_path():
  config = tiny_config(optimizer__name="tests.test_extension:lion",
                       optimizer__schedule="constant", optimizer__weight_decay=0.0)
  model = models.create({"name": "mlp", "hidden": (8,)}, 3)
  state, step = _state_and_step(model, config)
  new, metrics = step(state, _batch())
  # Lion moves every parameter by exactly the learning rate (the sign of its update).
  moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)), new.params, state.params)
  lr = config.optimizer.learning_rate
  assert all(np.allclose(m[m > 0], lr, rtol=1e-3) for m in jax.tree.leaves(moved))
  assert float(metrics["finite"]) == 1.0
  with pytest.raises(UserError, match="config.optimizer.name='lamb'"):
    train.make_optimizer(tiny_config(optimizer__name="lamb"))
