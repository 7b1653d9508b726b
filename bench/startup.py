"""Time to first step: `python -m trainer` (the default job) vs a bare script, fresh processes.

Each child prints `FIRST_STEP <epoch seconds>` when its first training step has
finished on the device; the parent measures from just before it starts the process.
The trainer child runs the real `python -m trainer` entry point (flags, config file,
data, checkpoint manager, run.json, ...) with one probe: whichever compiled function the
loop dispatches first, one step (a strategy's `compile_step`) or several
(`compile_steps`, the split on the devices), reports and exits after its first call. It
gets a fresh, empty compilation cache (a user's first run); the bare child none. The
bare child is the shortest good script that trains the same MLP shape (jax, flax,
optax, numpy; jitted init and step) on random data of the digits set's shape.
Children alternate (bare, trainer, trainer, bare, ...) so drift hits both alike.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

_MARK = "FIRST_STEP"


def _bare_child() -> None:
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for width in (128, 128):
        x = nn.relu(nn.Dense(width)(x))
      return nn.Dense(10)(x)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((128, 64), dtype=np.float32)
  y = rng.integers(0, 10, 128).astype(np.int32)
  model, tx = MLP(), optax.adam(1e-3)

  @jax.jit  # One compilation instead of one per eager op.
  def init(rng):
    params = model.init(rng, x[:1])
    return params, tx.init(params)

  params, opt_state = init(jax.random.PRNGKey(0))

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  jax.block_until_ready(step(params, opt_state, x, y))
  print(f"{_MARK} {time.time()}", flush=True)


def _trainer_child(workdir: str) -> None:
  import runpy  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from trainer import parallel  # pylint: disable=g-import-not-at-top

  def probed(compile_fn):

    def compile_and_probe(self, *args):
      compiled = compile_fn(self, *args)

      def first_call(*call_args):
        jax.block_until_ready(compiled(*call_args))
        print(f"{_MARK} {time.time()}", flush=True)
        os._exit(0)  # pylint: disable=protected-access

      return first_call

    return compile_and_probe

  for strategy in (parallel.DataParallel, parallel.ShardMap, parallel.Pmap):
    for name in ("compile_step", "compile_steps"):
      if name in vars(strategy):  # each class's own (ShardMap and Pmap override them)
        setattr(strategy, name, probed(vars(strategy)[name]))
  sys.argv = ["trainer", f"--workdir={workdir}"]
  runpy.run_module("trainer", run_name="__main__", alter_sys=True)


def _time_child(kind: str, timeout: float = 180.0) -> float:
  with tempfile.TemporaryDirectory(prefix="jaxjob-startup-") as workdir:
    env = child_env(os.path.join(workdir, "jax-cache") if kind == "trainer" else None)
    argv = [sys.executable, "-m", "bench.startup", kind, os.path.join(workdir, "run")]
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
  for line in proc.stdout.splitlines():
    if line.startswith(_MARK):
      return float(line.split()[1]) - start
  raise RuntimeError(f"{kind} child exited {proc.returncode} without {_MARK}:"
                     f" {proc.stderr.strip().splitlines()[-1:]}")


def child_env(cache: str | None) -> dict[str, str]:
  """This environment for a child on one CPU device (as users get) that compiles with
  `cache` as its persistent compilation cache, or with none."""
  drop = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAXJOB_COMPILATION_CACHE_DIR")
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env["JAXJOB_COMPILATION_CACHE_DIR"] = cache or "off"
  return env


def _time_import(module_list: str) -> float:
  code = (f"import time; t = time.perf_counter(); import {module_list};"
          " print(time.perf_counter() - t)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, check=True)
  return float(proc.stdout.split()[-1])


def measure_imports(repeats: int) -> None:
  """Import time of the trainer against the bare script's imports (fresh processes)."""
  from bench.harness import emit  # pylint: disable=g-import-not-at-top
  kinds = {"bare": "jax, flax.linen, optax", "trainer": "trainer.train",
           "sklearn": "sklearn.datasets, sklearn.model_selection, sklearn.metrics",
           "matplotlib": "matplotlib.pyplot", "orbax": "orbax.checkpoint"}
  times = {k: [] for k in kinds}
  for _ in range(repeats):
    for kind, modules in kinds.items():
      times[kind].append(_time_import(modules))
  medians = {k: round(statistics.median(v), 2) for k, v in times.items()}
  emit({"bench": "startup", "metric": "import time, fresh process (s)", "value": medians,
        "note": "trainer.train imports jax, flax, optax and what is listed beside them"})


def measure(repeats: int) -> None:
  """Emits time-to-first-step of bare and trainer (median of `repeats` fresh processes each)."""
  from bench.harness import emit  # pylint: disable=g-import-not-at-top
  times = {"bare": [], "trainer": []}
  for r in range(repeats):
    for kind in (("bare", "trainer") if r % 2 == 0 else ("trainer", "bare")):
      times[kind].append(_time_child(kind))
  bare, trainer = statistics.median(times["bare"]), statistics.median(times["trainer"])
  allowed = max(1.0, 0.2 * bare)
  noise = max(times["bare"]) - min(times["bare"])
  emit({"bench": "startup", "metric": "time to first step, trainer - bare (s)",
        "median": round(trainer - bare, 3), "bare_s": [round(t, 2) for t in times["bare"]],
        "trainer_s": [round(t, 2) for t in times["trainer"]],
        "ratio": round(trainer / bare, 3), "bare_spread_s": round(noise, 3),
        "target": f"<= max(1 s, 20% of bare) = {allowed:.2f}",
        "verdict": ("inconclusive" if noise > 2 * allowed else
                    "pass" if trainer - bare <= allowed else "fail"),
        "rounds": repeats})


if __name__ == "__main__":
  if sys.argv[1] == "bare":
    _bare_child()
  elif sys.argv[1] == "trainer":
    _trainer_child(sys.argv[2])
  else:
    raise SystemExit(f"usage: python -m bench.startup {{bare,trainer}} WORKDIR")
