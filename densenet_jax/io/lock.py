"""One writer per workdir: WORKDIR/.lock names the process that trains there.

Two runs in one workdir would overwrite each other's checkpoints and interleave their metrics. The lock is
created atomically (written to a file of its own, then hard-linked to `.lock`, which fails if it exists), so
its content is complete whenever it exists. A lock whose process is dead on this host (kill -9, power loss)
is stale and taken over with a warning; a lock of another host is trusted, since its process cannot be checked.
A gs:// workdir has its own lock (cloud_lock.py): created only if absent, kept fresh by a heartbeat. What a lock
records, and the WorkdirBusy error both raise, are lock_record.py's.
"""

from __future__ import annotations

import contextlib
import json
import os

from absl import logging

from densenet_jax.io import cloud_lock, storage
from densenet_jax.io.lock_record import LOCK_FILE, WorkdirBusy, busy_message, dead_on_this_host, describe, this_process


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def acquire(workdir: str) -> dict:
  """Takes WORKDIR/.lock for this process; returns what it records. Raises WorkdirBusy if a live process holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  mine = this_process()
  tmp = f'{path}.{mine["pid"]}.tmp'
  with open(tmp, 'w') as f:
    json.dump(mine, f)
  try:
    for _ in range(3):
      try:
        os.link(tmp, path)
        return mine
      except FileExistsError:
        pass
      holder = _read(path)
      if not dead_on_this_host(holder):
        raise WorkdirBusy(busy_message(
            workdir, holder, path, f'If that process is gone (another host died), delete {path}.'))
      logging.warning('Taking over the lock %s of %s, which is no longer running.', path, describe(holder))
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    raise WorkdirBusy(f'Could not take the lock {path}: other processes keep taking it.')
  finally:
    os.remove(tmp)


def release(workdir: str, mine: dict) -> None:
  """Removes WORKDIR/.lock if it is still this process's."""
  path = os.path.join(workdir, LOCK_FILE)
  if _read(path) == mine:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


@contextlib.contextmanager
def held(workdir: str, *, enabled: bool = True):
  """The lock of `workdir` for the duration of the block (`enabled`: only process 0 of a multi-process run)."""
  if not enabled:
    yield
    return
  if storage.is_cloud(workdir):
    with cloud_lock.held(workdir):
      yield
    return
  mine = acquire(workdir)
  try:
    yield
  finally:
    release(workdir, mine)
