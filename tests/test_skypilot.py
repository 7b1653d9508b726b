"""docs/skypilot.yaml: SkyPilot's node variables become the process contract (DESIGN.md 4).

The task file's own mapping block (between its "process contract" markers) runs under
bash with the variables SkyPilot sets; its output is checked, parsed by the trainer's
`distributed.read_env`, and finally given to two real trainer processes on localhost,
which must form one job.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT
from trainer import distributed

TASK = ROOT / "docs" / "skypilot.yaml"
CONTRACT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _task() -> dict:
  return yaml.safe_load(TASK.read_text())


def _mapping_block(run: str) -> str:
  lines = run.splitlines()
  start = lines.index("# --- process contract (DESIGN.md section 4) ---")
  end = lines.index("# --- end of process contract ---")
  return "\n".join(lines[start + 1:end])


def render(node_ips: list[str], rank: int, port: str | None = None) -> dict[str, str]:
  """The contract variables the task's `run:` mapping exports on node `rank`."""
  task = _task()
  env = {"PATH": os.environ["PATH"], **{k: str(v) for k, v in task["envs"].items()},
         "SKYPILOT_NODE_IPS": "\n".join(node_ips) + "\n", "SKYPILOT_NODE_RANK": str(rank),
         "SKYPILOT_NUM_NODES": str(len(node_ips))}
  if port is not None:
    env["JAXJOB_COORDINATOR_PORT"] = port
  script = "set -euo pipefail\n" + _mapping_block(task["run"]) + "\nenv -0\n"
  out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                       check=True, timeout=30).stdout
  rendered = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
  return {k: rendered[k] for k in CONTRACT}


def test_the_task_file_is_a_multi_node_task_whose_run_section_parses():
  task = _task()
  assert task["num_nodes"] >= 2 and "run" in task and "setup" in task
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in task["envs"]["XLA_FLAGS"]
  assert 0 < float(task["envs"]["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= 1
  # SkyPilot refuses to launch while an env of the task is empty: the workdir only.
  assert [k for k, v in task["envs"].items() if v in ("", None)] == ["JAXJOB_WORKDIR"]
  for section in ("setup", "run"):
    subprocess.run(["bash", "-n", "-c", task[section]], check=True, timeout=30)


def test_the_task_xla_flags_are_flags_this_xla_knows():
  # An unknown name in XLA_FLAGS aborts every process at start-up ("Unknown flag").
  task = _task()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=task["envs"]["XLA_FLAGS"],
             XLA_PYTHON_CLIENT_MEM_FRACTION=task["envs"]["XLA_PYTHON_CLIENT_MEM_FRACTION"])
  proc = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                        env=env, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]


@pytest.mark.parametrize("rank", [0, 2])
def test_node_variables_render_the_process_contract(rank):
  ips = ["10.128.0.7", "10.128.0.9", "10.128.0.12"]
  env = render(ips, rank)
  assert env == {"JAX_COORDINATOR_ADDRESS": "10.128.0.7:8482", "JAX_NUM_PROCESSES": "3",
                 "JAX_PROCESS_ID": str(rank)}
  assert distributed.read_env(env) == distributed.ProcessEnv("10.128.0.7:8482", 3, rank, None)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(400)
def test_two_nodes_with_the_rendered_variables_form_one_job(tmp_path):
  port = str(_free_port())
  workdir = tmp_path / "run"
  argv = [sys.executable, "-m", "trainer", "--config=trainer/configs/breast_cancer.py",
          "--config.train.steps=40", "--config.train.checkpoint_every=20",
          "--config.train.eval_every=40", "--config.train.log_every=20",
          "--config.train.batch_size=64", f"--workdir={workdir}",
          "--config.parallel.strategy=shard_map"]  # shard_map across processes, too
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = []
  for rank in range(2):
    env = dict(base, **render(["127.0.0.1", "127.0.0.1"], rank, port),
               JAXJOB_DEVICES_PER_PROCESS="2", PYTHONPATH=str(ROOT))
    procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=360)[0] for p in procs]
  for rank, (proc, out) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0, f"process {rank}:\n{out[-3000:]}"
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["num_processes"] == 2 and summary["num_devices"] == 4
  assert summary["final_step"] == 40 and summary["strategy"] == "shard_map"
