"""Run artefacts: metrics.jsonl, TensorBoard events, the history plot, the classification
report and summary.json (DESIGN.md section 3). Only process 0 creates a `Reporter` that
writes; other processes get a `Reporter(None)` whose methods do nothing. Logged rows also
go to the metric writers of `trainer.writers` (TensorBoard; W&B when configured).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading

import jax
import numpy as np

from trainer import storage
from trainer import writers as writers_lib


class Reporter:
  """Writes the run's metrics and reports under `workdir` (None: write nothing)."""

  def __init__(self, workdir: str | None, resume_step: int = 0, config=None):
    """`config` names the optional writers (`config.report`); None: TensorBoard only."""
    self.workdir = workdir
    self.rows: list[dict] = []
    self._writers: list[writers_lib.MetricWriter] = []
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

  def flush(self) -> None:
    """Rewrites metrics.jsonl in one atomic write and flushes the writers."""
    if not self.active:
      return
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows)
    storage.write_text(storage.path(self.workdir) / "metrics.jsonl", text)
    for writer in self._writers:
      writer.flush()

  def close(self) -> None:
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
    """plots/history.png: training loss and train/held-out `metric` against step."""
    if not self.active:
      return
    steps = [r["step"] for r in self.rows]
    plt = _pyplot()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(steps, [r["loss"] for r in self.rows], label="train")
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss history")
    ax_acc.plot(steps, [r.get(metric) for r in self.rows], label="train")
    if eval_rows:
      ax_acc.plot([r["step"] for r in eval_rows], [r.get(metric) for r in eval_rows], "o-",
                  label="held-out")
      ax_loss.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-",
                   label="held-out")
    ax_acc.set(xlabel="step", ylabel=metric, title=metric.capitalize())
    for ax in (ax_loss, ax_acc):
      ax.grid(alpha=0.3)
      ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(storage.path(self.workdir) / "plots" / "history.png", buffer.getvalue())


def _pyplot():
  # matplotlib loads only where a plot is drawn (~1 s): `preload` starts it early.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def preload(*imports) -> None:
  """Runs the `imports` (callables) in order on a daemon thread.

  A run's writers, checkpointing and plot need modules that take seconds to import
  (tensorboardX pulls in google-cloud-storage, Orbax, matplotlib); imported here, they
  load while the main thread reads data, compiles and waits on the devices (which
  releases the GIL). Whoever needs one first waits for it on Python's import lock.
  """
  def run():
    for load in imports:
      load()

  threading.Thread(target=run, name="jaxjob-preload", daemon=True).start()


def preload_for_process_0():
  """The imports process 0's run needs beyond the other processes' (writers, plots)."""
  return (writers_lib.preload_tensorboard, _pyplot)


def classification_report(labels: np.ndarray, preds: np.ndarray, class_names: list[str]):
  """scikit-learn's report as (text, dict): per-class precision, recall, F1, support."""
  from sklearn import metrics as sk_metrics  # pylint: disable=g-import-not-at-top
  kwargs = dict(labels=list(range(len(class_names))), target_names=class_names,
                zero_division=0, digits=4)
  text = sk_metrics.classification_report(labels, preds, **kwargs)
  as_dict = sk_metrics.classification_report(labels, preds, output_dict=True, **kwargs)
  return text, as_dict


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
