"""Gang restarts on the container rehearsal: what each policy does when one of two pods dies.

JAX processes cannot join a coordination service that is already running, so a restart of one
pod while its peer still runs is not a restart of the job. Two containers stand in for the two
pods of `python -m launch k8s render --nodes=2` (tests/test_container.py's `Job`); one is
killed (`docker kill`, SIGKILL: a node lost, an OOM kill), then the controller's reaction is
replayed with docker:

- JobSet (the default for --nodes > 1): `backoffLimit: 0` fails the group's Job on the first
  pod failure and `failurePolicy` restarts the whole JobSet: every pod is deleted (SIGTERM,
  the grace period) and every index starts again, on a fresh coordination service.
- Indexed Job (`--indexed-job`): the Job controller replaces only the failed pod, with the
  same index and coordinator address, while the other pod runs on; every failed pod counts
  against `backoffLimit`.

docs/gke.md ("Two restart policies") and docs/container.md ("Gang restarts") record the outcome.
"""

import time

import pytest

from tests import container
from tests.test_container import (  # pylint: disable=unused-import
    EVERY, JOB_ARGS, STEPS, Job, gcs, image, jobs, reference)

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess, pytest.mark.timeout(2400)]


def _exit_codes(names: list[str]) -> list[int | None]:
  """Each container's exit code, None while it runs."""
  if not names:
    return []
  out = container.docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}",
                         *names).stdout.split("\n")
  return [None if running == "true" else int(code)
          for running, code in (line.split() for line in out if line)]


def _kill_after_a_commit(job: Job) -> int:
  """Kills index 1 once a checkpoint is committed; returns the last committed step."""
  job.wait_for_commit(EVERY)
  container.docker("kill", job.current[1])
  assert job.wait(1) == 137
  return max(job.committed())


def test_jobset_restarts_the_whole_group_and_the_job_finishes(reference, image, gcs, jobs):
  job = jobs(image, gcs, 2, JOB_ARGS, "jobset-gang", kind="jobset")
  assert job.manifest["kind"] == "JobSet"
  assert job.job_spec["backoffLimit"] == 0, "one pod failure must fail the group's Job"
  assert job.manifest["spec"]["failurePolicy"]["maxRestarts"] >= 1
  grace = job.pod["terminationGracePeriodSeconds"]
  job.start()
  killed = time.monotonic()
  _kill_after_a_commit(job)
  # restartJobSet: the controller deletes every pod of the group (SIGTERM, then the grace).
  container.docker("stop", f"--time={grace}", job.current[0], timeout=grace + 30)
  survivor = job.wait(0)
  step = max(job.committed())  # What the survivor may have added while it stopped.
  assert step < STEPS, "the run finished before the kill"
  job.start()  # Every index again, on a new coordination service.
  codes = [job.wait(i) for i in range(2)]
  print(f"JobSet: survivor exited {survivor}; fresh group {codes} resumed from step {step}"
        f" ({time.monotonic() - killed:.0f} s from the kill)")
  assert codes == [0, 0], job.logs(0)[-3000:] + job.logs(1)[-3000:]
  starts = job.file("run.json")["starts"]
  assert starts[-1]["resumed_from_step"] == step
  assert starts[-1]["exit"]["code"] == 0
  assert job.file("summary.json")["params_sha256"] == reference[0]


def _replay_job_controller(job: Job, delay_s: float, deadline_s: float):
  """Plays the Job controller for an Indexed Job: a failed index alone gets a new pod.

  Args:
    job: started; its containers are watched until every index succeeded.
    delay_s: the back-off before the n-th replacement is delay_s * 2**(n - 1) (the Job
      controller's pod failure back-off is 10 s, 20 s, 40 s, ...); 0 replaces at once.
    deadline_s: how long to play.

  Returns:
    (outcome, events): "Complete", "Failed" or "BackoffLimitExceeded", and one
    (seconds, index, exit code) per pod that ended.
  """
  limit = job.job_spec["backoffLimit"]
  started, failures, events = time.monotonic(), 0, []
  watching, pending, done = dict(enumerate(job.current)), {}, set()
  while len(done) < job.nodes:
    assert time.monotonic() - started < deadline_s, events
    for index, at in list(pending.items()):
      if time.monotonic() >= at:
        job.start_index(index)
        watching[index] = job.current[index]
        del pending[index]
    names = list(watching.items())
    for (index, _), code in zip(names, _exit_codes([name for _, name in names])):
      if code is None:
        continue
      del watching[index]
      events.append((round(time.monotonic() - started, 1), index, code))
      if code == 0:
        done.add(index)
        continue
      if code in job.fail_job_codes:
        return "Failed", events
      failures += 1
      if failures > limit:
        return "BackoffLimitExceeded", events
      pending[index] = time.monotonic() + delay_s * 2 ** (failures - 1)
    time.sleep(0.2)
  return "Complete", events


@pytest.mark.parametrize("delay_s", [0, 10])
def test_indexed_job_recreates_one_pod_which_cannot_join_its_running_peer(
    reference, image, gcs, jobs, delay_s):
  job = jobs(image, gcs, 2, JOB_ARGS, f"indexed-gang-{delay_s}")
  assert job.manifest["kind"] == "Job"
  job.start()
  step = _kill_after_a_commit(job)
  outcome, events = _replay_job_controller(job, delay_s, deadline_s=900)
  print(f"Indexed Job, back-off {delay_s} s: {outcome}; pods ended (s, index, code): {events}")
  assert outcome == "Complete", events
  survivor = container.docker("logs", job.started[0]).stderr
  if delay_s == 0:  # The replacement met the running peer, whose service refused it.
    assert "1 unexpectedly tried to connect with a different incarnation" in survivor
  failures = [code for _, _, code in events if code]
  assert failures[0] == 137 and len(failures) <= job.nodes, events
  starts = job.file("run.json")["starts"]
  assert starts[-1]["resumed_from_step"] >= step
  assert job.file("summary.json")["params_sha256"] == reference[0]
