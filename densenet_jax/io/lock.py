"""One writer per workdir: WORKDIR/.lock names the process that trains there.

Two runs in one workdir would overwrite each other's checkpoints and interleave their metrics. The lock is
created atomically (written to a file of its own, then hard-linked to `.lock`, which fails if it exists), so
its content is complete whenever it exists. A lock whose process is dead on this host (kill -9, power loss)
is stale and taken over with a warning; a lock of another host is trusted, since its process cannot be checked.
A gs:// workdir has its own lock (cloud_lock.py): created only if absent, kept fresh by a heartbeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging

from densenet_jax import config as config_lib
from densenet_jax.io import storage

LOCK_FILE = '.lock'


class WorkdirBusy(config_lib.ConfigError):
  """Another process trains in the workdir; the message names it."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      holder = json.load(f)
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def describe(holder: dict) -> str:
  started = holder.get('started')
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)) if isinstance(started, (int, float)) else '?'
  return f'process {holder.get("pid", "?")} on host {holder.get("host", "?")}, started {since}'


def this_process() -> dict:
  """What a lock records about its holder."""
  return {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}


def dead_on_this_host(holder: dict) -> bool:
  """Whether `holder` names a process of this host that no longer runs."""
  return (holder.get('host') == socket.gethostname() and isinstance(holder.get('pid'), int)
          and not _alive(holder['pid']))


def busy_message(workdir: str, holder: dict, lock_path: str, remedy: str) -> str:
  return (f'{workdir} is in use by another run ({describe(holder)}; its lock is {lock_path}). Two runs in one '
          'workdir would overwrite each other\'s checkpoints: wait for that run to end, or use another '
          f'--workdir. {remedy}')


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
    from densenet_jax.io import cloud_lock  # pylint: disable=import-outside-toplevel  # it imports this module

    with cloud_lock.held(workdir):
      yield
    return
  mine = acquire(workdir)
  try:
    yield
  finally:
    release(workdir, mine)
