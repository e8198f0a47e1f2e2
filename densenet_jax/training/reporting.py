"""What a run writes for people and tools: metrics.jsonl, TensorBoard events, curves, a progress bar.

Only process 0 writes; the other processes get a writer that does nothing. The workdir may be local or gs://.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping

import jax
import numpy as np
import tqdm

from densenet_jax.io import storage
from densenet_jax.io import workdir as workdir_lib


class MetricWriter:
  """Appends one JSON object per call to WORKDIR/metrics.jsonl and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = f'{workdir}/{workdir_lib.METRICS_FILE}'
    self._tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter  # Pure Python; keeps the training loop free of TF.

      # On gs:// tensorboardX uploads the events file with google-cloud-storage at each flush.
      self._tensorboard = SummaryWriter(f'{workdir}/{workdir_lib.TENSORBOARD_DIR}')

  def write(self, step: int, epoch: float, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    record = {'step': int(step), 'epoch': round(float(epoch), 4), **scalars}
    storage.append_text(self.path, json.dumps(record) + '\n')
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _from_training(record: Mapping[str, float]) -> bool:
  """Whether a metrics record was written by a training or evaluation step (not the run's final summary)."""
  return any(k.startswith(('train_', 'eval_')) for k in record)


def cut_metrics_back(workdir: str, step: int) -> None:
  """Keeps the records of steps up to `step` (a resumed run's checkpoint) in metrics.jsonl, so that the steps
  redone after a crash, and the final summary of a rerun, are logged once and in order.

  The records of `step` itself are kept unless they are a final summary, which the run writes again. The file is
  rewritten next to itself and renamed over the old one: a crash now leaves the old file or the new one.
  """
  path = f'{workdir}/{workdir_lib.METRICS_FILE}'
  if not storage.exists(path):
    return
  lines = [line for line in storage.read_text(path).splitlines(keepends=True) if line.strip()]
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a crash while it was written
      continue
    if record['step'] < step or (record['step'] == step and _from_training(record)):
      kept.append(json.dumps(record) + '\n')
  if len(kept) == len(lines):
    return
  storage.write_atomically(path, ''.join(kept))


def has_record(workdir: str, step: int, key: str) -> bool:
  """Whether metrics.jsonl holds a record of `step` with `key`."""
  return any(r['step'] == step and key in r for r in read_metrics(workdir))


def read_metrics(workdir: str) -> list[dict]:
  path = f'{workdir}/{workdir_lib.METRICS_FILE}'
  if not storage.exists(path):
    return []
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def plot_error_curves(workdir: str) -> str | None:
  """Train and eval top-1 error (%) vs epoch, like the paper's training curves. Returns the PNG path."""
  records = read_metrics(workdir)
  train = [(r['epoch'], 100 * (1 - r['train_accuracy'])) for r in records if 'train_accuracy' in r]
  evals = [(r['epoch'], 100 * (1 - r['eval_accuracy'])) for r in records if 'eval_accuracy' in r]
  if not train and not evals:
    return None
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for points, label in ((train, 'train error'), (evals, 'eval error')):
    if points:
      epochs, errors = zip(*points)
      ax.plot(epochs, errors, label=label, marker='o' if len(points) < 30 else None)
  ax.set_xlabel('epoch')
  ax.set_ylabel('top-1 error (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = f'{workdir}/{workdir_lib.CURVES_FILE}'
  png = io.BytesIO()  # matplotlib writes local files only
  fig.savefig(png, format='png')
  plt.close(fig)
  storage.write_atomically(path, png.getvalue())
  return path


class Progress:
  """A console progress bar with loss, accuracy, images/s and ETA (process 0 only)."""

  def __init__(self, total_steps: int, initial_step: int, *, enabled: bool):
    self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit='step', dynamic_ncols=True,
                          disable=not enabled or jax.process_index() != 0)

  def update(self, step: int, metrics: Mapping[str, float]) -> None:
    """Moves the bar to `step` and shows the latest metrics."""
    shown = {
        'loss': f"{metrics['train_loss']:.4f}",
        'acc': f"{metrics['train_accuracy']:.4f}",
        'img/s': f"{metrics['images_per_second']:.0f}",
    }
    self._bar.set_postfix(shown, refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, message: str) -> None:
    if not self._bar.disable:
      self._bar.write(message)

  def close(self) -> None:
    self._bar.close()


class Throughput:
  """Images per second between calls, measured on the host after the device work has finished."""

  def __init__(self):
    self._time = time.perf_counter()

  def images_per_second(self, images: int) -> float:
    now = time.perf_counter()
    rate = images / max(now - self._time, 1e-9)
    self._time = now
    return rate


def mean_metrics(sums: Mapping[str, np.ndarray]) -> dict[str, float]:
  """{'loss': sum, 'accuracy': sum, ..., 'count': n} -> means over n examples."""
  count = float(sums['count'])
  return {k: float(v) / max(count, 1.0) for k, v in sums.items() if k != 'count'}
