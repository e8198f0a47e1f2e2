"""The layout of a run's workdir, and what a run writes there before it trains: the directory, its config.

    WORKDIR/config.json           the resolved config (a rerun with another config is refused)
    WORKDIR/checkpoints/<step>/   the latest `keep_checkpoints` training states
    WORKDIR/best/<step>/          with keep_best_checkpoint: the state with the best eval accuracy
    WORKDIR/metrics.jsonl         one JSON object per logged step
    WORKDIR/tensorboard/          TensorBoard events
    WORKDIR/error_curves.png      train and eval error vs epoch

Reading a workdir back (its config, its newest intact checkpoint, the model it trained) is loading.py's.
WORKDIR and every path here may be local or gs://bucket/... (densenet_jax.io.storage).
"""

from __future__ import annotations

import json
import os

import ml_collections

from densenet_jax import config as config_lib
from densenet_jax import platform
from densenet_jax.io import checkpoints, storage

CONFIG_FILE = 'config.json'
CHECKPOINTS_DIR = 'checkpoints'
BEST_DIR = 'best'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
CURVES_FILE = 'error_curves.png'

# Fields that do not change what a run computes: a resumed run may change them.
COSMETIC_FIELDS = frozenset({'log_every_steps', 'progress_bar', 'keep_checkpoints', 'compilation_cache_dir',
                             'checkpoint_every_epochs', 'eval_every_epochs'})
# Fields that choose how the same model is computed (densenet_jax.platform): config.json records the form a run
# chose, and a resumed run reuses it unless its config sets another, which then continues the same training, equal
# to an uninterrupted run up to float rounding rather than bit for bit.
FORM_FIELDS = frozenset(platform.FORM_FIELDS)


class DiskFullError(RuntimeError):
  """A write into the workdir (metrics, TensorBoard events, curves) failed: its file system is full."""


def disk_full_error(error: BaseException, workdir: str) -> DiskFullError | None:
  """The one-paragraph DiskFullError for `error` if a full disk caused it, else None."""
  if not checkpoints.is_disk_full(error):
    return None
  _, cause = checkpoints.write_failure(error)
  directory = os.path.join(workdir, CHECKPOINTS_DIR)
  steps = checkpoints.complete_steps(directory)
  kept = (f'The complete checkpoints in {directory} (steps {", ".join(map(str, steps))}) are untouched; free '
          f'space, then run the same command again to resume from step {steps[-1]}.' if steps else
          'No checkpoint was complete yet; free space and run the same command again to start over.')
  return DiskFullError(f'The disk holding {workdir} is full: a write failed ({cause}). {kept}')


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and checks that files can be written there; returns its absolute path (or URL).

  Raises ConfigError naming the problem (a file in the way, a read-only or missing parent) before anything runs.
  """
  workdir = storage.absolute(workdir)
  probe = f'{workdir}/.write-test-{os.getpid()}'
  try:
    storage.makedirs(workdir)
    with storage.open_file(probe, 'w') as f:
      f.write('ok')  # tf.io.gfile creates no object for a file left empty
    storage.remove(probe)
  except OSError as error:
    raise config_lib.ConfigError(
        f'--workdir={workdir} cannot be used: {error.strerror or error} ({error.filename or workdir}). Give a '
        'directory that can be created and written to (not a file, not under a file, not read-only).') from None
  except Exception as error:  # pylint: disable=broad-except  # tf.io.gfile's errors on gs:// are no OSErrors
    if not storage.is_cloud(workdir):
      raise
    raise config_lib.ConfigError(
        f'--workdir={workdir} cannot be used: {type(error).__name__}: {" ".join(str(error).split())[:300]}. Give '
        'a gs:// folder that these credentials may write to (role Storage Object User on the bucket).') from None
  return workdir


def read_config_json(path: str) -> dict:
  """A config.json, or ConfigError if it is unreadable (cut short by a crash, edited by hand)."""
  try:
    resolved = json.loads(storage.read_text(path))
    if not isinstance(resolved, dict):
      raise ValueError('not a JSON object')
  except ValueError as error:
    raise config_lib.ConfigError(
        f'{path} is not a valid config ({error}). It records the config of the run in that workdir: restore it '
        f'from a copy, or delete it to continue the run with the config given now.') from None
  return resolved


def record_config(config: ml_collections.ConfigDict, workdir: str, *, writer: bool = True) -> None:
  """Refuses to continue a run of another config in `workdir`; records the config of a new run.

  Fields that do not change the result (COSMETIC_FIELDS) or only how it is computed (FORM_FIELDS) may differ.
  Only the `writer` process writes.
  """
  path = f'{workdir}/{CONFIG_FILE}'
  resolved = json.loads(config.to_json_best_effort(sort_keys=True))
  if storage.exists(path):
    # A field added since the run started ran at its default.
    previous = config_lib.with_defaults(read_config_json(path))
    changed = sorted(k for k in set(previous) | set(resolved)
                     if k not in COSMETIC_FIELDS | FORM_FIELDS and previous.get(k) != resolved.get(k))
    if changed:
      details = '; '.join(f'{k}: {previous.get(k)!r} -> {resolved.get(k)!r}' for k in changed)
      raise config_lib.ConfigError(
          f'{workdir} holds a run with another config ({details}). Use a new --workdir for a new run, or delete '
          f'{path} to resume that run with the new config anyway.'
      )
    return
  if not writer:
    return
  storage.write_atomically(path, json.dumps(resolved, indent=2, sort_keys=True))
