"""The CPU workloads: `python -m bench.workloads NAME {quick,full}` prints JSON lines.

Each workload runs in its own process (the orchestrator `python -m bench` sets the
virtual device count) and compares, in paired rounds on one compiled step:
`bare` (the step in a minimal loop over device-resident batches), `bare_again` (the A/A
control), `trainer` (the real `loop.Loop` as a run configures it: auto steps per dispatch,
the training split on the devices where it fits, else its loader) and `loop` (the same
loop at one step per dispatch fed device-resident batches: the trainer without its input
pipeline). `overhead` adds `trainer_k1`: the loop at one step per dispatch reading each
batch on the host (data_on_device=off), the trainer before those two choices existed.
`result` (bench/result.py) times whole processes instead.
"""

from __future__ import annotations

import os
import sys
import tempfile

import jax
import numpy as np

from bench import harness
from bench import result
from bench import startup
from bench.harness import emit
from bench.job import Job, Trainer
from trainer import data
from trainer.configs import base
from trainer.data import tokens

# block: seconds per timed block; calls: repetitions of each component measurement.
MODES = {"quick": {"rounds": 7, "block": 0.12, "calls": 100},
         "full": {"rounds": 15, "block": 0.25, "calls": 300}}


def mlp_config(features: int, hidden: tuple[int, ...], batch: int, classes: int,
               strategy: str = "sharding"):
  config = base.get_base_config()
  config.name = "bench-mlp"
  config.data.source = "synthetic"
  config.data.num_examples = 8192
  config.data.num_features = features
  config.data.num_classes = classes
  config.model.hidden = hidden
  config.train.batch_size = batch
  config.parallel.strategy = strategy
  return config


def lm_config(token_path: str = ""):
  """The compute-bound LM: ~30 ms steps on one core of the 2-core box."""
  config = base.get_base_config()
  config.name = "bench-lm"
  config.data.source = "tokens"
  config.data.token_path = token_path
  config.data.num_tokens = 300_000
  config.model.name = "transformer"
  config.model.vocab_size = 512
  config.model.seq_len = 64
  config.model.d_model = 64
  config.model.num_layers = 2
  config.model.num_heads = 4
  config.optimizer.name = "adamw"
  config.train.batch_size = 8
  return config


def _prepare(job: Job, runners: list[Trainer], block: float) -> int:
  """Compiles and warms every variant; returns the steps per timed block.

  Each runner's loop makes its auto choices and compiles what it dispatches here
  (`Trainer.warm_up`), so that no compilation lands in a timed block.
  """
  job.bare(3)
  step_s = job.bare(5).wall / 5
  for runner in runners:
    runner.warm_up(step_s)
  k = harness.steps_for(block, job.bare(5).wall / 5)
  harness.COMPILES.count = 0
  return k


def _hygiene(name: str, runner: Trainer, k: int) -> None:
  """Runs the trainer's loop under transfer_guard("disallow") and reports what it caught."""
  caught = runner.transfers_caught(k)
  emit({"bench": name, "metric": "implicit transfers (transfer_guard disallow)",
        "value": caught, "target": "none",
        "verdict": "pass" if caught == "none" else "fail"})


def _recompiles(name: str) -> None:
  n = harness.COMPILES.count
  emit({"bench": name, "metric": "recompiles during timed steps", "value": n,
        "target": "0", "verdict": "pass" if n == 0 else "fail"})


def compare(name: str, job: Job, mode: dict, workdir: str, *, target: float,
            target_us: float | None = None, input_target: float | None = None,
            input_name: str | None = None, host_fed_k1: bool = False) -> dict:
  """bare / bare_again / trainer / loop (/ trainer_k1) in paired rounds; emits the ratios
  and checks. `host_fed_k1` adds the trainer at one host-fed step per dispatch."""
  runners = {"trainer": Trainer(job, os.path.join(workdir, f"{name}-trainer")),
             # One step per dispatch: with `batches=` a loop that picked K > 1 would read
             # the host batches instead of the device-resident ones.
             "loop": Trainer(job, os.path.join(workdir, f"{name}-loop"), device_batches=True,
                             steps_per_dispatch=1)}
  if host_fed_k1:
    runners["trainer_k1"] = Trainer(job, os.path.join(workdir, f"{name}-trainer-k1"),
                                    steps_per_dispatch=1, data_on_device="off")
  trainer = runners["trainer"]
  k = _prepare(job, list(runners.values()), mode["block"])
  _hygiene(name, trainer, k)
  harness.COMPILES.count = 0
  variants = {"bare": lambda: job.bare(k), "bare_again": lambda: job.bare(k)}
  variants.update({v: (lambda r=r: r.run(k)) for v, r in runners.items()})
  times = harness.paired_rounds(variants, mode["rounds"])
  step_ms = float(np.median([t.wall for t in times["bare"]])) / k * 1e3
  info = {"steps_per_block": k, "bare_step_ms": round(step_ms, 3),
          "devices": jax.device_count(), "log_every": job.config.train.log_every,
          "steps_per_dispatch": trainer.loop.steps_per_dispatch,
          "data_on_device": trainer.loop.data_on_device}
  emit(harness.ratio_record(name, "trainer/bare", times, "trainer", "bare", target=target,
                            **info))
  if host_fed_k1:
    emit(harness.ratio_record(name, "trainer (K=1, host-fed)/bare", times, "trainer_k1",
                              "bare", target=None))
  emit(harness.ratio_record(name, "loop/bare (no input pipeline)", times, "loop", "bare",
                            target=None))
  if target_us is not None:
    emit(harness.overhead_record(name, times, "trainer", "bare", k, target_us=target_us))
  fed = "trainer_k1" if host_fed_k1 else "trainer"
  emit(_input_wait(input_name or name, times, fed, runners[fed], input_target))
  _recompiles(name)
  for runner in runners.values():
    runner.close()
  return times


def _input_wait(name: str, times, fed: str, runner: Trainer, target: float | None) -> dict:
  """(fed - loop) / fed: the share of a host-fed trainer's time spent on its input."""
  metric = f"input wait ({fed} - loop) / {fed}"
  if runner.loop.data_on_device:
    return {"bench": name, "metric": metric,
            "value": "none: the training split is on the devices"}
  wait = [(t.wall - l.wall) / t.wall for t, l in zip(times[fed], times["loop"])]
  control = [(a.wall - b.wall) / a.wall for a, b in zip(times["bare_again"], times["bare"])]
  record = {"bench": name, "metric": metric,
            **harness._rounded(harness.summary(wait)),  # pylint: disable=protected-access
            "aa": harness._rounded(harness.summary(control)),  # pylint: disable=protected-access
            "rounds": len(wait)}
  if target is not None:
    record["target"] = f"<= {target}"
    record["verdict"] = harness.verdict(record["median"], target, control, aa_center=0.0)
  return record


def components(name: str, job: Job, workdir: str, calls: int = 300) -> None:
  """Microseconds per call of the trainer's per-step host work (diagnosis)."""
  runner = Trainer(job, os.path.join(workdir, f"{name}-components"))
  loop = runner.loop
  state = job.strategy.to_device(job.state)
  state, metrics = job.step_fn(state, job.batches[0])
  jax.block_until_ready(metrics)
  cfg = job.config
  parts = {
      "batch indices (data.process_batch_indices)": lambda i: data.process_batch_indices(
          cfg.seed, i, cfg.train.batch_size, len(job.dataset.train_y), 0, 1),
      "host batch -> device (Loop.batch)": loop.batch,
      "read metrics (strategy.read_metrics)": lambda i: job.strategy.read_metrics(metrics),
      # Alternatives, for the report: what the same work costs done another way.
      "alt: one jax.device_put of the host batch": lambda i: jax.device_put(
          host, job.strategy.batch_sharding),
      "alt: read metrics with np.asarray per leaf": lambda i: {
          k: float(np.asarray(v).reshape(-1)[0]) for k, v in metrics.items()},
  }
  host = {"x": job.dataset.train_x[:cfg.train.batch_size],
          "y": job.dataset.train_y[:cfg.train.batch_size]}
  for label, fn in parts.items():
    fn(0)
    t = harness.timed(lambda fn=fn: [fn(i) for i in range(calls)])
    emit({"bench": name, "metric": f"component: {label}", "value": round(t.wall / calls * 1e6, 1),
          "unit": "us/call"})
  job.state = job.strategy.to_canonical(state)
  runner.close()


def dp(mode: dict, workdir: str) -> None:
  n = jax.device_count()
  job = Job(mlp_config(784, (256, 256), 128, 10))
  ops = job.hlo_op_counts()
  leaves = len(jax.tree.leaves(job.state.params))
  emit({"bench": f"dp{n}", "metric": "all-reduce ops in the compiled step (HLO)",
        "value": ops["all-reduce"], "ops": {k: v for k, v in ops.items() if v},
        "gradient_leaves": leaves, "target": "<= 4 (one or a few fused)",
        "verdict": "pass" if ops["all-reduce"] <= 4 else "fail"})
  compare(f"dp{n}", job, mode, workdir, target=1.05)


def pmap_vs_sharding(mode: dict, workdir: str) -> None:
  """The same MLP under the three strategies, bare and trainer, in one run."""
  n = jax.device_count()
  shard = Job(mlp_config(784, (256, 256), 128, 10, "sharding"))
  pm = Job(mlp_config(784, (256, 256), 128, 10, "pmap"))
  sm = Job(mlp_config(784, (256, 256), 128, 10, "shard_map"))
  runners = {"sharding": Trainer(shard, os.path.join(workdir, "pmap-s")),
             "pmap": Trainer(pm, os.path.join(workdir, "pmap-p")),
             "shard_map": Trainer(sm, os.path.join(workdir, "pmap-m"))}
  k = _prepare(shard, [runners["sharding"]], mode["block"])
  _prepare(pm, [runners["pmap"]], mode["block"])
  _prepare(sm, [runners["shard_map"]], mode["block"])
  chosen = {name: {"steps_per_dispatch": r.loop.steps_per_dispatch,
                   "data_on_device": r.loop.data_on_device} for name, r in runners.items()}
  ops = {name: job.hlo_op_counts() for name, job in (("sharding", shard), ("pmap", pm),
                                                        ("shard_map", sm))}
  emit({"bench": f"pmap{n}", "metric": "all-reduce / transpose ops in the compiled step",
        "value": {name: f"{o['all-reduce']} / {o['transpose']}" for name, o in ops.items()}})
  harness.COMPILES.count = 0
  times = harness.paired_rounds({
      "bare": lambda: shard.bare(k), "bare_again": lambda: shard.bare(k),
      "pmap_bare": lambda: pm.bare(k), "shard_map_bare": lambda: sm.bare(k),
      "trainer": lambda: runners["sharding"].run(k),
      "pmap_trainer": lambda: runners["pmap"].run(k),
      "shard_map_trainer": lambda: runners["shard_map"].run(k)}, mode["rounds"])
  for num, den, what in (("pmap_bare", "bare", "pmap/sharding (bare step)"),
                         ("pmap_trainer", "trainer", "pmap/sharding (trainer)"),
                         ("shard_map_bare", "bare", "shard_map/sharding (bare step)"),
                         ("shard_map_trainer", "trainer", "shard_map/sharding (trainer)")):
    record = harness.ratio_record(f"pmap{n}", what, times, num, den, target=None,
                                  steps_per_block=k, trainer_loops=chosen)
    record["target"] = "within 0.95..1.05"
    record["verdict"] = harness.verdict(abs(record["median"] - 1), 0.05,
                                        harness.ratios(times, "bare_again", "bare"))
    emit(record)
  emit({"bench": f"pmap{n}", "metric": "recompiles during timed steps",
        "value": harness.COMPILES.count, "target": "0",
        "verdict": "pass" if harness.COMPILES.count == 0 else "fail"})
  for runner in runners.values():
    runner.close()


def checkpointing(mode: dict, workdir: str) -> None:
  """The trainer with an async Orbax save every K steps (one per block) against none."""
  job = Job(mlp_config(784, (256, 256), 128, 10))
  without = Trainer(job, os.path.join(workdir, "ckpt-without"))
  k = _prepare(job, [without], mode["block"] * (4 if mode["rounds"] > 7 else 3))
  with_saves = Trainer(job, os.path.join(workdir, "ckpt-with"), checkpoint_every=k)
  _prepare(job, [with_saves], mode["block"])  # also its first save: the directory layout
  times = harness.paired_rounds({
      "without": lambda: without.run(k), "without_again": lambda: without.run(k),
      "with": lambda: with_saves.run(k)}, mode["rounds"])
  step_ms = float(np.median([t.wall for t in times["without"]])) / k * 1e3
  record = harness.ratio_record(
      "checkpoint", f"with a save every {k} steps / without", times, "with", "without",
      target=1.02, aa=("without_again", "without"), steps_per_block=k,
      step_ms=round(step_ms, 3), steps_per_dispatch=without.loop.steps_per_dispatch,
      data_on_device=without.loop.data_on_device)
  added = float(np.median([a.wall - b.wall for a, b in zip(times["with"], times["without"])]))
  record["ms_per_save"] = round(added * 1e3, 1)
  record["state_mb"] = round(sum(x.nbytes for x in jax.tree.leaves(job.state)) / 2**20, 2)
  # The save interval at which this per-save cost is 2% of the time between saves.
  record["interval_for_2pct_s"] = round(max(added, 0.0) / 0.02, 2)
  emit(record)
  without.close()
  with_saves.close()


def main(argv: list[str]) -> None:
  name, mode_name = argv[1], argv[2]
  mode = MODES[mode_name]
  emit({"bench": name, "metric": "machine", "value": harness.machine()})
  with tempfile.TemporaryDirectory(prefix=f"jaxjob-bench-{name}-") as workdir:
    if name == "overhead":
      job = Job(mlp_config(64, (64,) * 16, 32, 4))
      compare(name, job, mode, workdir, target=1.05, target_us=50.0, host_fed_k1=True)
      components(name, job, workdir, mode["calls"])
    elif name == "balanced":
      job = Job(mlp_config(784, (256, 256), 128, 10))
      compare(name, job, mode, workdir, target=1.05)
      components(name, job, workdir, mode["calls"])
    elif name == "compute":
      path = os.path.join(workdir, "tokens.u16")
      tokens.synthetic_tokens(0, 300_000, 512).astype(np.uint16).tofile(path)
      job = Job(lm_config(path))
      compare(name, job, mode, workdir, target=1.02, input_target=0.02,
              input_name="input")
    elif name == "checkpoint":
      checkpointing(mode, workdir)
    elif name == "dp":
      dp(mode, workdir)
    elif name == "pmap":
      pmap_vs_sharding(mode, workdir)
    elif name == "result":
      result.measure(mode_name, workdir)
    elif name == "startup":
      startup.measure(repeats=1 if mode_name == "quick" else 3)
      if mode_name == "full":
        startup.measure_imports(repeats=3)
    else:
      raise SystemExit(f"unknown workload {name!r}")


if __name__ == "__main__":
  main(sys.argv)
