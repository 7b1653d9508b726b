"""The plotter process (`trainer.plotting`): the same PNG as drawing in-process, and each
way the child can fail ends with the plot drawn in the run's own process."""

import io
import json
import os
import signal
import time

import pytest
from PIL import Image

from tests.conftest import tiny_config
from trainer import plotting
from trainer import report
from trainer import train

ROWS = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5 + s / 400} for s in range(10, 110, 10)]
HELD_OUT = [{"step": 50, "loss": 0.1, "accuracy": 0.7}, {"step": 100, "loss": 0.05,
                                                          "accuracy": 0.75}]
SPEC = plotting.history_spec(ROWS, HELD_OUT, "accuracy")


@pytest.fixture
def plotter():
  p = plotting.Plotter()
  yield p
  p.stop()


def _ready(plotter: plotting.Plotter) -> None:
  """Waits until the child has loaded matplotlib and answers."""
  assert plotter.submit(SPEC).result() and plotter.served == 1


def test_the_child_draws_the_same_png_as_the_run_would(plotter):
  png = plotter.submit(SPEC).result()
  assert plotter.served == 1 and plotter.alive()
  assert png == plotting.draw(SPEC)
  with Image.open(io.BytesIO(png)) as image:
    assert image.format == "PNG" and image.size == (1000, 400)


def test_each_answer_goes_to_its_own_request(plotter):
  other = plotting.history_spec(ROWS[:3], [], "loss")
  first, second = plotter.submit(SPEC), plotter.submit(other)
  assert second.result() == plotting.draw(other)  # reads the first's answer and keeps it
  assert first.result() == plotting.draw(SPEC)
  assert plotter.served == 2


def test_a_dead_child_means_drawing_here(plotter):
  plotter.proc.kill()
  plotter.proc.wait()
  assert plotter.submit(SPEC).result() == plotting.draw(SPEC)
  assert plotter.served == 0 and not plotter.alive()


def test_a_child_that_dies_before_answering_means_drawing_here(plotter):
  _ready(plotter)
  pending = plotter.submit(SPEC)
  plotter.proc.kill()
  assert pending.result() == plotting.draw(SPEC)
  assert plotter.served == 1 and not plotter.alive()


def test_a_stuck_child_is_given_up_after_the_timeout(plotter):
  _ready(plotter)
  pid = plotter.proc.pid
  os.kill(pid, signal.SIGSTOP)
  start = time.monotonic()
  assert plotter.submit(SPEC).result(timeout_s=1.0) == plotting.draw(SPEC)
  assert time.monotonic() - start < 30
  assert not plotter.alive()
  with pytest.raises(ProcessLookupError):  # stopped, then killed and reaped
    os.kill(pid, 0)


def test_an_error_in_the_child_is_raised_here_and_the_child_serves_on(plotter):
  bad = {**SPEC, "metric": None}  # None.capitalize()
  with pytest.raises(AttributeError):
    plotter.submit(bad).result()
  assert plotter.alive() and plotter.served == 0
  assert plotter.submit(SPEC).result() == plotting.draw(SPEC) and plotter.served == 1


def test_the_child_ignores_the_signals_its_process_group_gets(plotter):
  _ready(plotter)
  for sig in (signal.SIGINT, signal.SIGTERM):
    os.kill(plotter.proc.pid, sig)
  assert plotter.submit(SPEC).result() == plotting.draw(SPEC)
  assert plotter.served == 2


def test_the_child_exits_when_its_parent_closes_stdin(plotter):
  _ready(plotter)
  proc = plotter.proc
  proc.stdin.close()
  assert proc.wait(timeout=30) == 0


def test_without_a_plotter_the_reporter_draws_in_process(tmp_path):
  plotting.stop()
  assert plotting.started() is None
  reporter = report.Reporter(str(tmp_path))
  for row in ROWS:
    reporter.log(row)
  reporter.plot_history(HELD_OUT)
  reporter.write_plot()
  assert (tmp_path / "plots" / "history.png").read_bytes() == plotting.draw(SPEC)


def test_a_run_has_its_plot_drawn_by_the_plotter(tmp_path):
  served = plotting.start().served
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(train__steps=60, train__eval_every=30), str(workdir))
  assert plotting.started().served == served + 1
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  held_out = json.loads((workdir / "eval" / "history.json").read_text())
  expected = plotting.draw(plotting.history_spec(rows, held_out, "accuracy"))
  assert (workdir / "plots" / "history.png").read_bytes() == expected


def test_a_child_without_matplotlib_exits_and_the_run_draws(tmp_path, monkeypatch):
  broken = tmp_path / "matplotlib"
  broken.mkdir()
  (broken / "__init__.py").write_text("raise ImportError('no matplotlib in this child')\n")
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  plotter = plotting.Plotter()
  try:
    assert plotter.proc.wait(timeout=60) == 0
    assert plotter.submit(SPEC).result() == plotting.draw(SPEC) and plotter.served == 0
  finally:
    plotter.stop()
