"""FSDP: a (data, fsdp) mesh with the state sharded by one rule; same results as pure DP.

data=8, data=4 x fsdp=2 and data=2 x fsdp=4 run the same global batches through the same
model; only where parameters live and the order of the gradient sums change, so the
parameters agree to float32 rounding (tolerance 1e-5; the measured difference is
printed). A checkpoint written on one mesh restores onto another.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.conftest import tiny_config
from trainer import checkpoint
from trainer import parallel
from trainer import train
from trainer.errors import UserError

STEPS = 30


def _config(data, fsdp, steps=STEPS, **overrides):
  return tiny_config(train__steps=steps, train__checkpoint_every=10, train__eval_every=steps,
                     optimizer__warmup_steps=5, optimizer__schedule="constant",
                     parallel__data=data, parallel__fsdp=fsdp, **overrides)


def _max_difference(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_rule_shards_the_largest_divisible_dimension():
  assert parallel.state_spec((64, 128), 4) == P(None, "fsdp")
  assert parallel.state_spec((128, 10), 2) == P("fsdp", None)
  assert parallel.state_spec((10,), 4) == P()  # not divisible: replicated
  assert parallel.state_spec((), 2) == P()
  assert parallel.state_spec((64, 128), 1) == P()


@pytest.mark.parametrize("data,fsdp,message", [
    (3, -1, "does not divide the 8 devices"),
    (2, 2, "must equal the 8 devices"),
    (-1, -1, "at most one of them -1"),
])
def test_bad_mesh_is_a_user_error(data, fsdp, message):
  with pytest.raises(UserError, match=message):
    parallel.mesh_shape(data, fsdp, 8)


def test_pmap_refuses_fsdp():
  with pytest.raises(UserError, match="data parallel only"):
    parallel.create(_config(4, 2, parallel__strategy="pmap"))


@pytest.mark.slow
def test_fsdp_meshes_match_data_parallel_and_shard_by_the_rule(tmp_path):
  params = {}
  for data, fsdp in [(8, 1), (4, 2), (2, 4)]:
    workdir = tmp_path / f"{data}x{fsdp}"
    train.train_and_evaluate(_config(data, fsdp), str(workdir))
    params[fsdp] = checkpoint.load_latest(workdir / "checkpoints")[1]["params"]
  for fsdp in (2, 4):
    worst = _max_difference(params[1], params[fsdp])
    print(f"fsdp={fsdp}: max |difference| to data-parallel {worst:.3g}")
    assert worst <= 1e-5
  # The live state of an fsdp=4 run is sharded as the rule says.
  strategy = parallel.create(_config(2, 4))
  model_state = strategy.init_state(lambda: {"kernel": np.zeros((64, 128), np.float32),
                                             "bias": np.zeros((10,), np.float32)})
  assert model_state["kernel"].sharding.spec == P(None, "fsdp")
  assert model_state["kernel"].addressable_shards[0].data.shape == (64, 32)
  assert model_state["bias"].sharding.spec == P()


@pytest.mark.slow
def test_checkpoint_restores_onto_another_mesh(tmp_path):
  reference = train.train_and_evaluate(_config(8, 1, steps=40), str(tmp_path / "reference"))
  workdir = tmp_path / "moved"
  train.train_and_evaluate(_config(4, 2, steps=20), str(workdir))
  resumed = train.train_and_evaluate(_config(2, 4, steps=40), str(workdir),
                                     allow_config_change=True)
  assert resumed["resumed_from_step"] == 20
  a = checkpoint.load_latest(tmp_path / "reference" / "checkpoints")[1]["params"]
  b = checkpoint.load_latest(workdir / "checkpoints")[1]["params"]
  assert _max_difference(a, b) <= 1e-5
  assert abs(resumed["eval"]["accuracy"] - reference["eval"]["accuracy"]) <= 0.01
