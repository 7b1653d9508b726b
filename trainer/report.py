"""Run artefacts: metrics.jsonl, TensorBoard events, the history plot, the classification
report and summary.json (DESIGN.md section 3). Only process 0 creates a `Reporter` that
writes; other processes get a `Reporter(None)` whose methods do nothing. Logged rows also
go to the metric writers of `trainer.writers` (TensorBoard; W&B when configured).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import jax
import numpy as np

from trainer import plotting
from trainer import storage
from trainer import writers as writers_lib


class Reporter:
  """Writes the run's metrics and reports under `workdir` (None: write nothing)."""

  def __init__(self, workdir: str | None, resume_step: int = 0, config=None):
    """`config` names the optional writers (`config.report`); None: TensorBoard only."""
    self.workdir = workdir
    self.rows: list[dict] = []
    self._writers: list[writers_lib.MetricWriter] = []
    self._flushed = time.monotonic()  # of the last full flush (the writers' too)
    self._plot: plotting.Pending | None = None  # started by plot_history
    if workdir is None:
      return
    metrics_path = storage.path(workdir) / "metrics.jsonl"
    if metrics_path.exists():
      # Rows past the restored step are from a run that died before its next
      # checkpoint; they are recomputed, so drop them to keep one row per step.
      rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
      self.rows = [r for r in rows if r["step"] <= resume_step]
    self._writers = writers_lib.create(config, workdir)

  @property
  def active(self) -> bool:
    return self.workdir is not None

  def log(self, row: dict) -> None:
    if not self.active:
      return
    self.rows.append(row)
    scalars = {k: v for k, v in row.items()
               if k not in ("step", "time") and isinstance(v, (int, float))}
    for writer in self._writers:
      writer.write_scalars(row["step"], scalars)

  def flush(self, *, writers_unless_within_s: float = 0.0) -> None:
    """Rewrites metrics.jsonl in one atomic write and flushes the writers.

    `writers_unless_within_s`: the writers (TensorBoard, W&B) only when their last flush
    (or the reporter's start) is at least that long ago; metrics.jsonl always.
    """
    if not self.active:
      return
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
    storage.write_text(storage.path(self.workdir) / "metrics.jsonl", text)
    now = time.monotonic()
    if writers_unless_within_s and now - self._flushed < writers_unless_within_s:
      return
    self._flushed = now
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
    self.write_plot()
    self.flush()
    for writer in self._writers:
      writer.close()
    self._writers = []

  def write_json(self, relative: str, obj) -> None:
    if self.active:
      storage.write_json(storage.path(self.workdir) / relative, obj)

  def write_text(self, relative: str, text: str) -> None:
    if self.active:
      storage.write_text(storage.path(self.workdir) / relative, text)

  def plot_history(self, eval_rows: list[dict], metric: str = "accuracy") -> None:
    """Starts drawing plots/history.png: training loss and train/held-out `metric` by step.

    The plotter process (`trainer.plotting`) draws it if one was started; `write_plot`
    (or `close`) waits for it and writes the file.
    """
    if not self.active:
      return
    spec = plotting.history_spec(self.rows, eval_rows, metric)
    plotter = plotting.started()
    self._plot = (plotter.submit(spec) if plotter is not None
                  else plotting.Pending(None, spec))

  def write_plot(self) -> None:
    """Writes the plot `plot_history` started, once."""
    if self._plot is not None:
      pending, self._plot = self._plot, None
      storage.write_bytes(storage.path(self.workdir) / "plots" / "history.png",
                          pending.result())


def preload(*imports) -> None:
  """Runs the `imports` (callables) in order on a daemon thread.

  A run's checkpointing and writers need modules that take a while to import (Orbax,
  tensorboardX); imported here, they
  load while the main thread reads data, compiles and waits on the devices (which
  releases the GIL). Whoever needs one first waits for it on Python's import lock.
  """
  def run():
    for load in imports:
      load()

  threading.Thread(target=run, name="jaxjob-preload", daemon=True).start()


def classification_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]):
  """Per-class precision, recall, F1 and support, then accuracy, macro and weighted averages.

  Returns (text, dict) laid out exactly as scikit-learn's `classification_report(...,
  labels=range(K), target_names=class_names, zero_division=0, digits=4)`, which earlier
  runs wrote to eval/report.txt and report.json, without importing it (1-2 s of start-up).
  A ratio with a zero denominator (a class never predicted or never present) is 0.

  Args:
    labels: true class indices in [0, K), K = len(class_names); at least one.
    preds: predicted class indices in [0, K), one per label.
  """
  k, n = len(class_names), len(labels)
  labels, preds = np.asarray(labels), np.asarray(preds)
  hits = np.bincount(labels[labels == preds], minlength=k)
  support = np.bincount(labels, minlength=k)
  predicted = np.bincount(preds, minlength=k)
  precision = _ratio(hits, predicted)
  recall = _ratio(hits, support)
  f1 = _ratio(2.0 * hits, support + predicted)  # from counts: to the bit scikit-learn's value
  # Averaged one 1-D array at a time: a reduction over an axis of a 2-D array adds in
  # another order and can differ in the last bit.
  averages = {"macro avg": [np.mean(m) for m in (precision, recall, f1)],
              "weighted avg": [np.average(m, weights=support) for m in (precision, recall, f1)]}
  scores = np.stack([precision, recall, f1], axis=1)  # [K, 3]
  accuracy = float(_ratio(hits.sum(), n))
  as_dict = {name: _report_entry(scores[i], support[i]) for i, name in enumerate(class_names)}
  as_dict["accuracy"] = accuracy
  as_dict.update({heading: _report_entry(avg, n) for heading, avg in averages.items()})
  text = _report_text(class_names, scores, support, accuracy, averages, any_hit=hits.any())
  return text, as_dict


def _report_text(class_names, scores, support, accuracy, averages, any_hit) -> str:
  """The report as a table: a row per class, then accuracy and the averages."""
  # With no right prediction at all, scikit-learn counts in floats and prints a support
  # as "49.0"; kept, so that such a report reads as it always has.
  count = int if any_hit else float
  n = count(support.sum())
  width = max([len(name) for name in class_names] + [len("weighted avg")])
  lines = [f"{'':>{width}} " + "".join(f" {h:>9}" for h in _REPORT_HEADERS) + "\n\n"]
  lines += [_report_row(width, name, scores[i], count(support[i]))
            for i, name in enumerate(class_names)]
  blank = " " * 20  # accuracy has no precision or recall cell, only the f1-score one
  lines.append(f"\n{'accuracy':>{width}} {blank} {accuracy:>9.4f} {n:>9}\n")
  lines += [_report_row(width, heading, avg, n) for heading, avg in averages.items()]
  return "".join(lines)


_REPORT_HEADERS = ("precision", "recall", "f1-score", "support")


def _report_entry(scores, support) -> dict:
  """One row of the report as JSON: precision, recall, f1-score and support, all floats."""
  return dict(zip(_REPORT_HEADERS, [float(v) for v in (*scores, support)]))


def _report_row(width: int, heading: str, scores, support: int | float) -> str:
  """One row of the text table: 4 decimals per score, right-aligned in 9 characters."""
  cells = "".join(f" {float(v):>9.4f}" for v in scores)
  return f"{heading:>{width}} {cells} {support:>9}\n"


def _ratio(numerator, denominator) -> np.ndarray:
  """numerator / denominator as float64, 0 where the denominator is 0."""
  numerator = np.asarray(numerator, dtype=np.float64)
  out = np.zeros_like(numerator)
  return np.divide(numerator, denominator, out=out, where=np.asarray(denominator) != 0)


def _whole(leaf) -> np.ndarray:
  """The full value of a (possibly sharded, possibly multi-process) array, on the host."""
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.sharding.is_fully_replicated:
      return np.asarray(leaf.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
  return np.asarray(leaf)


def fingerprint(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes (process-independent)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    host = _whole(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{host.dtype}{host.shape}".encode())
    digest.update(np.ascontiguousarray(host).tobytes())
  return digest.hexdigest()
