"""Checkpoints with orbax: periodic, asynchronous, atomic; exact resume; variables for fine-tuning.

Layout of a workdir:
    WORKDIR/checkpoints/<step>/   the latest `keep` training states (TrainState: step, params,
                                  batch_stats, opt_state)
    WORKDIR/best/<step>/          with keep_best_checkpoint: the state with the best eval accuracy

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a run killed
while saving leaves no half-written checkpoint behind: the next start resumes from the last complete one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINTS_DIR = 'checkpoints'
BEST_DIR = 'best'


class Checkpointer:
  """Saves and restores training states of one directory (a thin layer over CheckpointManager)."""

  def __init__(self, directory: str, *, keep: int, asynchronous: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=asynchronous
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Starts writing `state` as checkpoint `step` (returns before the write ends when asynchronous)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, template: Any, step: int | None = None) -> Any:
    """Restores checkpoint `step` (default: latest) with the structure, dtypes and shardings of `template`."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def reached_preemption(self, step: int) -> bool:
    """Multi-process runs: whether JAX's preemption service asks every process to stop at `step`."""
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_variables(path: str, variables: dict[str, Any]) -> None:
  """Writes {'params': ..., 'batch_stats': ...} as a standalone checkpoint (atomically)."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), variables)
  checkpointer.wait_until_finished()


def load_variables(path: str) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} as numpy arrays from a checkpoint written by save_variables,
  from one step directory of a training run, or from a training workdir (its latest checkpoint)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    manager = ocp.CheckpointManager(os.path.join(path, CHECKPOINTS_DIR))
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{path} is a workdir without any complete checkpoint.')
    path = os.path.join(path, CHECKPOINTS_DIR, str(step))
    manager.close()
  item = path
  if os.path.isdir(os.path.join(path, 'default')):  # a step directory written by CheckpointManager
    item = os.path.join(path, 'default')
  if not os.path.isdir(item):
    raise FileNotFoundError(
        f'No checkpoint at {path}. Give a directory written by `python -m densenet_jax.weights '
        'convert`, a training workdir, or one of its checkpoints/<step> directories.'
    )
  checkpointer = ocp.StandardCheckpointer()
  # Restore onto this process's first device, whatever device layout the checkpoint was saved from.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
      checkpointer.metadata(item).item_metadata,
  )
  restored = jax.device_get(checkpointer.restore(item, target))
  variables = {k: restored[k] for k in ('params', 'batch_stats') if k in restored}
  if 'params' not in variables:
    raise ValueError(f'The checkpoint at {path} holds no "params" (keys: {sorted(restored)}).')
  logging.info('Loaded variables from %s', item)
  return variables
