"""Several steps per dispatch and the training split on the devices change no result.

Every variant (K = 1 host-fed, the old path; K = 5 host-fed; K = 5 and auto with the
split on the devices) must give bit-identical parameters, metric rows, eval history and
committed checkpoints, for each strategy and for two processes. The cadences (log 7,
checkpoint 20, eval 25) do not divide K, so dispatches are cut at every boundary.
"""

import json
import os
import subprocess
import sys
import threading

import jax
import pytest

from tests.conftest import ROOT, tiny_config
from trainer import checkpoint
from trainer import hooks
from trainer import report
from trainer import train
from trainer.errors import UserError
from trainer.loop import Loop

# (steps_per_dispatch, data_on_device, prefetch); the first is the one-step host-fed path.
VARIANTS = [(1, "off", 0), (5, "off", 2), (5, "on", 0), (0, "auto", 0), (0, "off", 1)]


def _config(strategy="sharding", k=0, on_device="auto", prefetch=0, **overrides):
  fields = dict(train__steps=60, train__checkpoint_every=20, train__eval_every=25,
                train__log_every=7, train__batch_size=64, optimizer__warmup_steps=5,
                parallel__strategy=strategy, train__steps_per_dispatch=k,
                train__data_on_device=on_device, train__prefetch=prefetch)
  return tiny_config(**{**fields, **overrides})


def _outcome(workdir, summary):
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  metrics = [{k: v for k, v in r.items() if k not in ("time", "examples_per_s")} for r in rows]
  history = json.loads((workdir / "eval" / "history.json").read_text())
  steps = checkpoint.Checkpointer(workdir / "checkpoints", save_every=20, keep=5).all_steps()
  return summary["params_sha256"], metrics, history, steps


def _check_all_equal(outcomes):
  first = outcomes[0]
  for other in outcomes[1:]:
    assert other[0] == first[0]  # parameters, bit for bit
    assert other[1] == first[1]  # every logged metric row
    assert other[2] == first[2]  # eval history
    assert other[3] == first[3] == [40, 60]  # committed checkpoints (keep 2)


@pytest.mark.parametrize("strategy", [
    "sharding",
    pytest.param("shard_map", marks=pytest.mark.slow),
    pytest.param("pmap", marks=pytest.mark.slow)])
def test_every_dispatch_variant_is_bit_identical(tmp_path, strategy):
  outcomes = []
  for k, on_device, prefetch in VARIANTS:
    workdir = tmp_path / f"k{k}-{on_device}-p{prefetch}"
    summary = train.train_and_evaluate(_config(strategy, k, on_device, prefetch), str(workdir))
    assert summary["data_on_device"] is (on_device != "off")
    if k:
      assert summary["steps_per_dispatch"] == k
    else:
      assert summary["steps_per_dispatch"] >= 1  # picked from the measured step time
    outcomes.append(_outcome(workdir, summary))
  _check_all_equal(outcomes)


def test_nonfinite_steps_inside_a_dispatch_are_handled_per_step(tmp_path, monkeypatch):
  """nan@S (host-fed: the fault rewrites host batches) inside a 6-step dispatch."""
  monkeypatch.setenv("JAXJOB_FAULTS", "nan@12,nan@13")
  results = [train.train_and_evaluate(_config(k=k, train__nonfinite_policy="skip"),
                                      str(tmp_path / f"k{k}")) for k in (1, 6)]
  assert [r["skipped_steps"] for r in results] == [2, 2]
  assert results[0]["params_sha256"] == results[1]["params_sha256"]
  assert results[1]["data_on_device"] is False and results[1]["steps_per_dispatch"] == 6
  from trainer.errors import Diverged  # pylint: disable=g-import-not-at-top
  with pytest.raises(Diverged, match="at step 13"):
    train.train_and_evaluate(_config(k=6), str(tmp_path / "stop"))


def test_dispatches_end_where_a_hook_needs_the_state(tmp_path):
  job = train.build(_config(k=10, profile__steps="33,36"))
  loop = Loop(job, None, report.Reporter(str(tmp_path)), inject_faults=False)
  loop.watchdog.close()
  loop._prepare()  # pylint: disable=protected-access
  lengths, step = [], 0
  while step < 60:
    n = loop._dispatch_length(step, 60)  # pylint: disable=protected-access
    lengths.append(n)
    step += n
  ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
  # checkpoint 20, 40, 60; eval 25, 50; the profile's start and stop steps 33 and 36.
  assert ends == [10, 20, 25, 33, 36, 40, 50, 60]


def test_bad_dispatch_settings_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="steps_per_dispatch=-1: expected 0"):
    train.build(_config(k=-1))
  with pytest.raises(UserError, match="prefetch=-2: expected 0 \\(off\\)"):
    train.build(_config(prefetch=-2))
  with pytest.raises(UserError, match="data_on_device='gpu': expected auto, on or off"):
    train.build(_config(on_device="gpu"))
  lm = tiny_config("lm_tiny.py", train__data_on_device="on")
  with pytest.raises(UserError, match="data_on_device=on: this data set's training split"):
    train.build(lm)


def _two_processes(workdir, k, on_device, prefetch):
  argv = [sys.executable, "-m", "launch", "local", "--processes=2",
          "--devices-per-process=4", "--grace-period=3", "--",
          "--config=trainer/configs/default.py", "--config.train.steps=60",
          "--config.train.checkpoint_every=20", "--config.train.eval_every=25",
          "--config.train.log_every=7", "--config.train.batch_size=64",
          "--config.optimizer.warmup_steps=5", f"--config.train.steps_per_dispatch={k}",
          f"--config.train.data_on_device={on_device}", f"--config.train.prefetch={prefetch}",
          f"--workdir={workdir}"]
  proc = subprocess.run(argv, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                        timeout=400, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  return json.loads((workdir / "summary.json").read_text())


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_two_processes_every_dispatch_variant_is_bit_identical(tmp_path):
  """Each process holds the whole split on its devices and gathers its own rows."""
  outcomes = []
  for k, on_device, prefetch in ((1, "off", 0), (0, "auto", 0), (5, "off", 2)):
    workdir = tmp_path / f"k{k}-{on_device}"
    summary = _two_processes(workdir, k, on_device, prefetch)
    assert summary["num_processes"] == 2 and summary["data_on_device"] is (on_device != "off")
    outcomes.append(_outcome(workdir, summary))
  _check_all_equal(outcomes)


@pytest.mark.parametrize("on_device", ["on", "off"])
def test_dispatches_make_no_implicit_transfer(on_device):
  """After the first dispatch of each length, everything reaches the devices explicitly."""
  import jax  # pylint: disable=g-import-not-at-top
  from trainer import preemption  # pylint: disable=g-import-not-at-top

  class NoCheckpoint:
    def save(self, *args, **kwargs):
      return False

    def close(self):
      pass

  config = _config(k=8, on_device=on_device, train__eval_every=1000,
                   train__checkpoint_every=1000).unlock()
  job = train.build(config)
  loop = Loop(job, NoCheckpoint(), report.Reporter(None), inject_faults=False)
  state = job.strategy.to_device(job.state)
  config.train.steps = 16  # compiles, and transfers the trip count 8 once
  state = loop.run(job.step_fn, state, 0, preemption.Watcher())
  config.train.steps = 40
  with jax.transfer_guard("disallow"):
    loop.run(job.step_fn, state, 16, preemption.Watcher())
  loop.watchdog.close()
  assert loop.steps_per_dispatch == 8 and loop.data_on_device is (on_device == "on")


@pytest.mark.parametrize("strategy,on_device,function,later", [
    ("sharding", "auto", "run_steps", set()), ("shard_map", "auto", "run_steps", set()),
    # Host-fed, auto K: once the probe has timed single steps, K steps per dispatch.
    ("shard_map", "off", "train_step", {"jit(run_steps)"})])
def test_the_first_dispatch_is_compiled_once_while_the_state_is(tmp_path, strategy, on_device,
                                                                 function, later):
  lowered, first_step = _lowerings(_config(strategy, on_device=on_device), tmp_path / "run")
  mine = [thread for name, thread in lowered if function in name]
  assert mine == ["jaxjob-precompile"], lowered
  # The main thread traces the initialiser only once that thread has traced the step.
  initialiser = [(i, thread) for i, (name, thread) in enumerate(lowered)
                 if "create_train_state" in name]
  assert initialiser == [(1, "MainThread")] and function in lowered[0][0], lowered
  # The evaluation's executable compiled on the main thread meanwhile, once, before the
  # first step: the evaluations at steps 25, 50 and 60 found it; their losses are NumPy's.
  _assert_compiled_ahead(lowered, first_step, ("eval_apply",))
  # Nothing else compiled once the steps ran, besides the slices with which Orbax's saves
  # copy the 8 devices' shards out.
  assert {name for name, _ in lowered[first_step:]} <= {"jit(slice)"} | later, lowered


def test_a_regression_runs_evaluation_compiles_ahead_too(tmp_path):
  config = tiny_config("diabetes.py", train__steps=30, train__eval_every=10)
  lowered, first_step = _lowerings(config, tmp_path / "run")
  _assert_compiled_ahead(lowered, first_step, ("eval_apply",))


def _lowerings(config, workdir) -> tuple[list[tuple[str, str]], int]:
  """Runs `config`: (function, thread) of each lowering to MLIR (which every compilation
  starts with), and how many of them came before the first step was dispatched."""
  lowered, first_step = [], []
  jax.clear_caches()  # an earlier test's run may have compiled the same functions

  def listen(event, duration, fun_name="", **_):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append((fun_name, threading.current_thread().name))

  class FirstStep(hooks.Hook):
    def before_step(self, loop, step, state):
      first_step.append(len(lowered))

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    train.train_and_evaluate(config, str(workdir), hooks=[FirstStep()])
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return lowered, first_step[0]


def _assert_compiled_ahead(lowered, first_step: int, names) -> None:
  for name in names:
    at = [i for i, (fun, _) in enumerate(lowered) if name in fun]
    assert len(at) == 1 and at[0] < first_step and lowered[at[0]][1] == "MainThread", lowered


def test_pmap_runs_without_precompiling(tmp_path):
  job = train.build(_config("pmap"))
  assert "precompile" not in job.cache
  train.run(job, str(tmp_path / "run"))


def test_a_process_that_builds_and_exits_at_once_exits_cleanly():
  script = ("from tests.conftest import tiny_config\nfrom trainer import train\n"
            "train.build(tiny_config())\n")  # the first dispatch is still compiling here
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
