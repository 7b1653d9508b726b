"""Parallelism: `shard_map`, `pmap` and `sharding` agree, and 1 device agrees with 8.

Bit-identity across strategies and device counts is not expected: the gradient mean is
summed in a different order (per-device partial sums, then an all-reduce), so float32
results differ in the last bits. After 40 Adam steps on the MLP the measured difference
is 3e-8 for both; the tolerance (atol 1e-5, 300 times that, and
far below the ~1e-2 change a single step makes) catches any real bug such as a missing
pmean. Adam's update hardly changes when every gradient is scaled by the same factor, so
a doubled pmean (gradients counted once per device) barely moves the parameters (1.3e-5):
the logged gradient norms and losses are compared too (rtol 1e-4; measured 9e-8).
"""

import json

import numpy as np
import pytest

from tests.conftest import run_trainer, tiny_config
from trainer import checkpoint
from trainer import train

STEPS = 40
ATOL = 1e-5


def _params(workdir):
  step, state = checkpoint.load_latest(workdir / "checkpoints")
  assert step == STEPS
  return state["params"]


def _assert_close(a, b, atol=ATOL):
  flat_a = {k: v for k, v in _flatten(a)}
  flat_b = {k: v for k, v in _flatten(b)}
  assert flat_a.keys() == flat_b.keys()
  worst = max(float(np.max(np.abs(flat_a[k] - flat_b[k]))) for k in flat_a)
  print(f"max |difference| {worst:.3g}")
  assert worst <= atol, f"max |difference| {worst} > {atol}"
  return worst


def _flatten(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, f"{prefix}{key}/")
    else:
      yield prefix + key, np.asarray(value)


def _config(**overrides):
  return tiny_config(train__steps=STEPS, train__checkpoint_every=STEPS, train__eval_every=STEPS,
                     optimizer__warmup_steps=5,
                     **overrides)


def _metrics(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == list(range(10, STEPS + 1, 10))
  return np.array([[r["loss"], r["grad_norm"], r["accuracy"]] for r in rows])


@pytest.fixture(scope="module")
def sharding_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sharding")
  summary = train.train_and_evaluate(_config(parallel__strategy="sharding"), str(workdir))
  assert summary["strategy"] == "sharding" and summary["num_devices"] == 8
  return workdir


@pytest.mark.parametrize("strategy", ["pmap", "shard_map"])
def test_strategy_matches_sharding(strategy, sharding_run, tmp_path):
  summary = train.train_and_evaluate(_config(parallel__strategy=strategy), str(tmp_path))
  assert summary["strategy"] == strategy and summary["num_devices"] == 8
  _assert_close(_params(sharding_run), _params(tmp_path))
  expected, got = _metrics(sharding_run), _metrics(tmp_path)
  print(f"max relative metric difference {np.max(np.abs(got - expected) / expected):.3g}")
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_shard_map_refuses_fsdp():
  from trainer import parallel  # pylint: disable=g-import-not-at-top
  from trainer.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="strategy=shard_map is data parallel only"):
    parallel.create(tiny_config(parallel__strategy="shard_map", parallel__fsdp=2))


def test_unknown_strategy_names_the_choices():
  from trainer import parallel  # pylint: disable=g-import-not-at-top
  from trainer.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="expected auto, sharding, shard_map or pmap"):
    parallel.create(tiny_config(parallel__strategy="smap"))


def test_auto_strategy_is_shard_map_unless_the_state_is_sharded():
  from trainer import parallel  # pylint: disable=g-import-not-at-top
  assert parallel.create(tiny_config()).name == "shard_map"
  assert parallel.create(tiny_config(parallel__data=4, parallel__fsdp=-1)).name == "sharding"
  assert parallel.create(tiny_config(parallel__data=8, parallel__fsdp=-1)).name == "shard_map"
  assert parallel.create(tiny_config(parallel__fsdp=2)).name == "sharding"
  assert parallel.create(tiny_config(parallel__data=-1, parallel__fsdp=1)).name == "shard_map"


@pytest.mark.slow
def test_one_device_matches_eight(tmp_path):
  train.train_and_evaluate(_config(), str(tmp_path / "eight"))
  proc = run_trainer([f"--workdir={tmp_path / 'one'}", f"--config.train.steps={STEPS}",
                      f"--config.train.checkpoint_every={STEPS}",
                      f"--config.train.eval_every={STEPS}", "--config.optimizer.warmup_steps=5"],
                     env={"JAXJOB_DEVICES_PER_PROCESS": "1"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / "one" / "summary.json").read_text())["num_devices"] == 1
  _assert_close(_params(tmp_path / "eight"), _params(tmp_path / "one"))


def test_batch_that_does_not_divide_devices_is_an_error():
  from trainer.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="batch_size=100 must be a positive multiple of the"
                                      " device count \\(8 = 1 process\\(es\\) x 8"):
    train.train_and_evaluate(tiny_config(train__batch_size=100), "/nonexistent/never-written")
