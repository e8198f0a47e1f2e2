"""One writer per workdir: WORKDIR/.lock names the process that trains there.

Two runs in one workdir would overwrite each other's checkpoints and interleave their metrics. The lock is
created atomically (written to a file of its own, then hard-linked to `.lock`, which fails if it exists), so
its content is complete whenever it exists. A lock whose process is dead on this host (kill -9, power loss)
is stale and taken over with a warning; a lock of another host is trusted, since its process cannot be checked.
Local paths only.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

from absl import logging

from densenet_jax import config as config_lib

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


def _describe(holder: dict) -> str:
  started = holder.get('started')
  since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started)) if isinstance(started, (int, float)) else '?'
  return f'process {holder.get("pid", "?")} on host {holder.get("host", "?")}, started {since}'


def acquire(workdir: str) -> dict:
  """Takes WORKDIR/.lock for this process; returns what it records. Raises WorkdirBusy if a live process holds it."""
  path = os.path.join(workdir, LOCK_FILE)
  mine = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': time.time()}
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
      stale = (holder.get('host') == mine['host'] and isinstance(holder.get('pid'), int)
               and not _alive(holder['pid']))
      if not stale:
        raise WorkdirBusy(
            f'{workdir} is in use by another run ({_describe(holder)}; its lock is {path}). Two runs in one '
            'workdir would overwrite each other\'s checkpoints: wait for that run to end, or use another '
            f'--workdir. If that process is gone (another host died), delete {path}.')
      logging.warning('Taking over the lock %s of %s, which is no longer running.', path, _describe(holder))
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
  mine = acquire(workdir)
  try:
    yield
  finally:
    release(workdir, mine)
