"""Training features: gradient accumulation, clipping, EMA, bf16, schedules, TensorBoard,
profiler traces."""

import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from tests.conftest import tiny_config
from trainer import checkpoint
from trainer import models
from trainer import tasks
from trainer import train


def _setup(**overrides):
  config = tiny_config(**overrides)
  model = models.create(config.model, 10)
  tx, schedule = train.make_optimizer(config)
  state = train.create_train_state(jax.random.PRNGKey(0), model=model, tx=tx,
                                   example_x=jnp.zeros((1, 64)), ema=config.train.ema_decay > 0)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.standard_normal((32, 64)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 10, 32), jnp.int32)}
  step = lambda s, b, **kw: train.train_step(s, b, model=model, task=tasks.Classification(),
                                             tx=tx, schedule=schedule, l2=0.0, **kw)
  return config, state, batch, step


def _max_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                            jax.tree.leaves(b)))


def test_gradient_accumulation_equals_the_big_batch_step():
  _, state, batch, step = _setup()
  big, big_metrics = jax.jit(step)(state, batch)
  small, small_metrics = jax.jit(lambda s, b: step(s, b, accum_steps=4))(state, batch)
  assert _max_difference(big.params, small.params) < 1e-6
  assert abs(float(big_metrics["loss"]) - float(small_metrics["loss"])) < 1e-6


@pytest.mark.slow
def test_gradient_accumulation_end_to_end_on_eight_devices(tmp_path):
  runs = {}
  for accum in (1, 4):
    config = tiny_config(train__steps=30, train__eval_every=30, train__checkpoint_every=30,
                         optimizer__warmup_steps=5, train__grad_accum_steps=accum)
    runs[accum] = train.train_and_evaluate(config, str(tmp_path / str(accum)))
  a = checkpoint.load_latest(tmp_path / "1" / "checkpoints")[1]["params"]
  b = checkpoint.load_latest(tmp_path / "4" / "checkpoints")[1]["params"]
  assert _max_difference(a, b) < 1e-5


def test_gradient_clipping_bounds_the_update():
  _, state, batch, step = _setup(optimizer__name="sgd", optimizer__momentum=0.0,
                                 optimizer__learning_rate=1.0, optimizer__grad_clip_norm=1e-3)
  new, metrics = jax.jit(step)(state, batch)
  update = jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(new.params),
                                                               jax.tree.leaves(state.params))))
  assert float(metrics["grad_norm"]) > 1e-2  # unclipped norm, as reported
  assert float(update) <= 1e-3 * (1 + 1e-4)


def test_ema_follows_the_parameters():
  _, state, batch, step = _setup(train__ema_decay=0.9)
  fn = jax.jit(lambda s, b: step(s, b, ema_decay=0.9))
  one, _ = fn(state, batch)
  two, _ = fn(one, batch)
  expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p,
                          jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.params, one.params),
                          two.params)
  assert _max_difference(two.ema_params, expected) < 1e-6
  assert _max_difference(two.ema_params, two.params) > 1e-6  # (warmup: small updates)
  assert train.eval_params(two) is two.ema_params


def test_bf16_compute_keeps_float32_params(tmp_path):
  config = tiny_config(model__dtype="bfloat16", train__steps=200, train__eval_every=200,
                       train__checkpoint_every=200, optimizer__warmup_steps=10)
  model = models.create(config.model, 10)
  params, _ = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert model.apply(params, None, jnp.zeros((2, 64)))[0].dtype == jnp.bfloat16
  summary = train.train_and_evaluate(config, str(tmp_path / "bf16"))
  assert summary["eval"]["accuracy"] > 0.9


def _events(directory):
  for path in directory.iterdir():
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      record = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(record)
      yield event


def test_schedule_tensorboard_and_profile(tmp_path):
  workdir = tmp_path / "run"
  config = tiny_config(train__steps=60, train__eval_every=60, train__checkpoint_every=60,
                       optimizer__warmup_steps=20, profile__steps="5,10")
  train.train_and_evaluate(config, str(workdir))
  tags = {}
  for event in _events(workdir / "tensorboard"):
    for value in event.summary.value:
      tags.setdefault(value.tag, []).append((event.step, value.simple_value))
  assert {"loss", "accuracy", "learning_rate", "grad_norm", "examples_per_s"} <= set(tags)
  lr = dict(tags["learning_rate"])
  peak = config.optimizer.learning_rate
  assert lr[10] == pytest.approx(peak * 9 / 20, rel=1e-5)  # warmup (logged at step+1)
  assert lr[30] < peak and lr[60] < lr[30]  # cosine decay after the peak
  traces = [p for p in (workdir / "profile").rglob("*") if p.is_file()]
  assert any(p.name.endswith(".xplane.pb") for p in traces), traces
