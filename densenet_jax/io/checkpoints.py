"""Checkpoints with orbax: periodic, asynchronous, atomic; exact resume; variables for fine-tuning.

A training run keeps TrainStates (step, params, batch_stats, opt_state) in a CheckpointManager directory, one
`<step>/` each (workdir.py says where); converted weights are one standalone checkpoint of the variables.

Orbax writes each checkpoint into a temporary directory (`<step>.orbax-checkpoint-tmp*`) and renames it
when complete, so a run killed while saving leaves no half-written checkpoint behind: the next start warns
about the temporary directory, deletes it, and resumes from the last complete checkpoint. On gs://, where a
directory cannot be renamed atomically, orbax writes `<step>/` in place and marks it complete with a
`commit_success.txt` written last; a `<step>/` without it is the unfinished one. A failed write
(full disk, lost mount) raises CheckpointWriteError; it never deletes the complete checkpoints. Each complete
checkpoint gets checksums (integrity.py); one damaged later is set aside on restore, and the run resumes from the
newest intact one.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from densenet_jax.io import integrity, storage

INCOMPLETE_MARKER = '.orbax-checkpoint-tmp'  # in the name of a checkpoint whose write did not finish
COMMIT_FILE = 'commit_success.txt'  # on gs://: written last into a checkpoint whose write finished


def _orbax():
  """orbax.checkpoint, imported when a checkpoint is first read or written rather than with this module: inference,
  analysis and weight conversion import this module, and orbax (over 200 modules, tensorstore among them) is only
  needed once they open a checkpoint; the disk-full helpers here need none of it."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

  return ocp


class CheckpointWriteError(RuntimeError):
  """Writing a checkpoint failed (full disk, lost mount, permissions); the message says where and why."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint fails its checksums or cannot be read, and no intact one can replace it."""


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'


def _is_complete(step_dir: str) -> bool:
  if storage.is_cloud(step_dir):
    return storage.isfile(f'{step_dir}/{COMMIT_FILE}')
  return storage.isdir(step_dir)


def _step_names(directory: str) -> list[str]:
  if not storage.isdir(directory):
    return []
  return [name for name in storage.listdir(directory) if name.isdigit()]


def complete_steps(directory: str) -> list[int]:
  """The steps of the finished checkpoints in `directory`, read from the disk or the bucket."""
  return sorted(int(name) for name in _step_names(directory) if _is_complete(f'{directory}/{name}'))


def incomplete_checkpoints(directory: str) -> list[str]:
  """The names of the checkpoints in `directory` whose write did not finish."""
  if storage.is_cloud(directory):
    return sorted(name for name in _step_names(directory) if not _is_complete(f'{directory}/{name}'))
  if not storage.isdir(directory):
    return []
  return sorted(name for name in storage.listdir(directory) if INCOMPLETE_MARKER in name)


# How tensorstore (orbax's array writer) reports a failed write: a ValueError, not an OSError, carrying the errno.
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def write_failure(error: BaseException) -> tuple[int, str] | None:
  """(errno, one-line description) of the failed file write behind `error` (an OSError, or a tensorstore error that
  carries an OS error code, possibly wrapped by orbax's threads), or None if `error` is something else."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError) and error.errno is not None:
      return error.errno, str(error)
    match = _OS_ERROR_CODE.search(str(error))
    if match:
      return int(match.group(1)), _first_line(error)
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def is_disk_full(error: BaseException) -> bool:
  failure = write_failure(error)
  return failure is not None and failure[0] in DISK_FULL_ERRNOS


class Checkpointer:
  """Saves and restores training states of one directory (a thin layer over CheckpointManager).

  Opening one deletes the unfinished checkpoints of a crashed run (with a warning), so do not open it on
  the workdir of a run in progress; read such a workdir with loading.load_variables.
  """

  def __init__(self, directory: str, *, keep: int, asynchronous: bool = True):
    self.directory = storage.absolute(directory)
    self._saving: int | None = None  # the step being written in the background
    self._primary = jax.process_index() == 0  # the process that writes checksums and sets checkpoints aside
    self._failed = False
    incomplete = incomplete_checkpoints(self.directory)
    ocp = _orbax()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous,
        # Orbax keeps unfinished temporary directories unless told, and a new save of the same step
        # would collide with them. Only when there are some: the deletion runs in a background thread.
        cleanup_tmp_directories=bool(incomplete),
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    if incomplete:
      latest = self._manager.latest_step()
      resume = (f'resuming from step {latest}' if latest is not None
                else 'no complete checkpoint is left, starting from scratch')
      logging.warning(
          'Ignoring and deleting incomplete checkpoint(s) %s in %s: a run stopped while writing them '
          '(killed, out of memory or out of disk); %s.',
          ', '.join(incomplete), self.directory, resume,
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _raise_if_write_error(self, step: int | None, error: BaseException) -> None:
    """Raises CheckpointWriteError from `error` when a failed file write (disk full, lost mount) caused it."""
    failure = write_failure(error)
    if failure is None:
      return
    self._failed = True
    code, cause = failure
    what = 'the disk is full' if code in DISK_FULL_ERRNOS else 'the write failed'
    steps = complete_steps(self.directory)
    kept = (f'The complete checkpoints there (steps {", ".join(map(str, steps))}) are untouched; '
            f'free space or fix the directory, then run the same command again to resume from step '
            f'{steps[-1]}.' if steps else
            'There is no complete checkpoint there yet; free space or fix the directory and start again.')
    raise CheckpointWriteError(
        f'Could not write checkpoint {step if step is not None else "?"} in {self.directory}: {what} '
        f'({cause}). {kept}'
    ) from error

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as checkpoint `step` (returns before the write ends when asynchronous).

    Raises CheckpointWriteError if this write, or the previous one still running in the background,
    fails; older complete checkpoints are kept (they are only deleted after a newer one is complete).
    """
    self.wait()  # Report a failed background write under its own step.
    self._saving = step
    ocp = _orbax()
    try:
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except Exception as error:  # pylint: disable=broad-except
      self._raise_if_write_error(step, error)
      raise

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: latest) with the structure, dtypes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    ocp = _orbax()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def restore_latest_intact(self, template: Any) -> Any | None:
    """The newest checkpoint that matches its checksums and can be read, restored like `template`; None if there is
    no checkpoint. Damaged ones are set aside (`<step>.corrupt-<reason>`) with a warning naming them and why.

    Raises CheckpointCorruptError when there were checkpoints but none is intact.
    """
    set_aside = []
    for step in reversed(complete_steps(self.directory)):
      step_dir = f'{self.directory}/{step}'
      reason, detail = integrity.problem(step_dir), ''
      if reason is None:
        try:
          return self.restore(template, step)
        except Exception as error:  # pylint: disable=broad-except
          reason, detail = 'unreadable', f' ({_first_line(error)})'
      target = integrity.set_aside(step_dir, reason) if self._primary else step_dir
      set_aside.append(target)
      self._manager.reload()
      logging.warning('Checkpoint %s is damaged (%s%s): set aside as %s; trying the previous checkpoint.',
                      step_dir, reason, detail, target)
    if set_aside:
      raise CheckpointCorruptError(
          f'No intact checkpoint is left in {self.directory}: every one failed its checksums or could not be '
          f'read, and was set aside ({", ".join(p.rsplit("/", 1)[-1] for p in set_aside)}; nothing was deleted). '
          'Running the same command again starts the run over from step 0; to keep the work, restore the '
          'checkpoint directories from a backup, or fine-tune from one with --config.init_from.'
      )
    return None

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: whether JAX's preemption service asks every process to stop at `step`."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until the background write ends and records its checksums; raises CheckpointWriteError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # pylint: disable=broad-except
      self._raise_if_write_error(self._saving, error)
      raise
    if self._saving is not None and self._primary:
      step_dir = f'{self.directory}/{self._saving}'
      try:
        if _is_complete(step_dir):  # Overwrites checksums left by an earlier checkpoint of the same step.
          integrity.record(step_dir)
        integrity.remove_orphans(self.directory)
      except OSError as error:  # The checkpoint itself is complete: it stays, unverified.
        self._raise_if_write_error(self._saving, error)
        raise
    self._saving = None

  def close(self) -> None:
    """Waits for the last write (recording its checksums), then stops orbax's background threads."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as error:  # pylint: disable=broad-except
        if self._failed:  # Already reported by save() or wait().
          return
        self._raise_if_write_error(self._saving, error)
        raise


def save_variables(path: str, variables: Mapping[str, Any], *, metadata: Mapping[str, Any] | None = None,
                   overwrite: bool = False) -> str:
  """Writes {'params', 'batch_stats'} as a standalone orbax checkpoint (atomically); returns its path.

  `metadata` (JSON-serializable: model name, source file, ...) is stored as the checkpoint's custom metadata.
  An existing directory is an error unless `overwrite`.
  """
  path = storage.absolute(path)
  if storage.exists(path) and not overwrite:
    raise FileExistsError(f'{path} already exists; choose another output directory or overwrite it.')
  tree = {c: jax.device_get(variables.get(c, {})) for c in ('params', 'batch_stats')}
  with _orbax().StandardCheckpointer() as checkpointer:  # Leaving the block waits for the save to finish.
    checkpointer.save(path, tree, force=overwrite, custom_metadata=dict(metadata or {}))
  return path


def read_metadata(path: str) -> dict[str, Any]:
  """The custom metadata stored by save_variables (model, num_classes, source, ...), or {}."""
  with _orbax().StandardCheckpointer() as checkpointer:
    return dict(checkpointer.metadata(storage.absolute(path)).custom_metadata or {})


def load_variables(path: str) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} as numpy arrays from a checkpoint written by save_variables or from one step
  directory of a training run (loading.load_variables also takes a workdir)."""
  path = storage.absolute(path)
  item = path
  if storage.isdir(f'{path}/default'):  # a step directory written by CheckpointManager
    item = f'{path}/default'
  if not storage.isdir(item):
    raise FileNotFoundError(
        f'No checkpoint at {path}. Give a directory written by `python -m densenet_jax.weights '
        'convert`, a training workdir, or one of its checkpoints/<step> directories.'
    )
  reason = integrity.problem(path) if item != path else None  # a training checkpoint records checksums
  if reason is not None:
    raise CheckpointCorruptError(
        f'The checkpoint at {path} is damaged ({reason}: its files do not match the checksums written with it). '
        'Use another checkpoint of the run, e.g. the previous checkpoints/<step> directory.')
  checkpointer = _orbax().StandardCheckpointer()
  # Restore onto this process's first device, whatever device layout the checkpoint was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
        checkpointer.metadata(item).item_metadata,
    )
    restored = jax.device_get(checkpointer.restore(item, target))
  except Exception as error:  # pylint: disable=broad-except
    raise CheckpointCorruptError(
        f'The checkpoint at {path} cannot be read ({_first_line(error)}): a file of it is missing or damaged. '
        'Use another checkpoint, or convert or copy the weights again.') from error
  variables = {k: restored[k] for k in ('params', 'batch_stats') if k in restored}
  if 'params' not in variables:
    raise ValueError(f'The checkpoint at {path} holds no "params" (keys: {sorted(restored)}).')
  logging.info('Loaded variables from %s', item)
  return variables
