"""What a workdir's lock records about its holder, and the paragraph that names a busy workdir's holder.

The local lock (lock.py) and the gs:// one (cloud_lock.py) share this record and this error; each imports it from
here, so neither has to import the other.
"""

from __future__ import annotations

import os
import socket
import time

LOCK_FILE = '.lock'


class WorkdirBusy(RuntimeError):
  """Another process trains in the workdir; the message names it.

  Not a config error: the command is right, and it succeeds once the other run has ended.
  """


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


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
