"""The lock of a gs:// workdir: the object WORKDIR/.lock, created only if absent, kept fresh by a heartbeat.

A bucket has no hard links and another host's process id cannot be checked, so:
- The lock is taken with a conditional write (if_generation_match=0): GCS lets exactly one of several writers
  create the object, and the others are refused with the holder (host, pid, start time) named.
- The holder rewrites the lock every HEARTBEAT_SECONDS, each time only if it is still its own version of the
  object (if_generation_match), so it notices a takeover.
- A lock whose heartbeat is older than STALE_AFTER_SECONDS (by the clock of the host that looks; hosts of one
  cloud agree within seconds) is stale: its holder died or lost its network. A lock of a process of this host that
  no longer runs is stale at once. A stale lock is deleted, again only if it is still the version that was read,
  and taken over with a warning.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

from absl import logging

from densenet_jax.io import cloud, lock_record, storage

HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 300.0  # five missed heartbeats


def _blob(workdir: str):
  bucket, name = storage.split_url(f'{workdir}/{lock_record.LOCK_FILE}')
  return cloud.storage_client().bucket(bucket).blob(name)


def _holder(blob) -> dict:
  try:
    holder = json.loads(blob.download_as_bytes(if_generation_match=blob.generation))
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _is_stale(holder: dict, blob, stale_after: float) -> bool:
  beat = holder.get('heartbeat')
  last = beat if isinstance(beat, (int, float)) else blob.updated.timestamp()
  return time.time() - last > stale_after or lock_record.dead_on_this_host(holder)


def acquire(workdir: str, *, stale_after: float = STALE_AFTER_SECONDS):
  """Takes the lock of the gs:// `workdir`; returns (the lock's blob, what it records).

  Raises lock_record.WorkdirBusy naming the holder if a live run holds it.
  """
  from google.api_core import exceptions as api_errors  # pylint: disable=import-outside-toplevel

  blob = _blob(workdir)
  url = f'{workdir}/{lock_record.LOCK_FILE}'
  mine = lock_record.this_process()
  mine['heartbeat'] = mine['started']
  for _ in range(3):
    try:
      blob.upload_from_string(json.dumps(mine), content_type='application/json', if_generation_match=0)
      return blob, mine
    except api_errors.PreconditionFailed:
      pass
    current = blob.bucket.get_blob(blob.name)
    if current is None:  # released in the meantime
      continue
    try:
      holder = _holder(current)
    except (api_errors.NotFound, api_errors.PreconditionFailed):  # released or refreshed in the meantime
      continue
    if not _is_stale(holder, current, stale_after):
      raise lock_record.WorkdirBusy(lock_record.busy_message(
          workdir, holder, url,
          f'A lock whose heartbeat is older than {stale_after:.0f} s is taken over; if that run is gone, '
          f'wait that long or delete {url}.'))
    logging.warning('Taking over the lock %s of %s, which stopped refreshing it (or no longer runs).',
                    url, lock_record.describe(holder))
    with contextlib.suppress(api_errors.NotFound, api_errors.PreconditionFailed):
      current.delete(if_generation_match=current.generation)
  raise lock_record.WorkdirBusy(f'Could not take the lock {url}: other processes keep taking it.')


class Heartbeat:
  """Rewrites the lock every `every` seconds in a background thread, while it is still this process's."""

  def __init__(self, blob, record: dict, *, every: float = HEARTBEAT_SECONDS):
    self._blob, self._record, self._every = blob, dict(record), every
    self._generation = blob.generation
    self._stopped = threading.Event()
    self.lost = False  # set when another run took the lock over
    self._thread = threading.Thread(target=self._run, name='workdir-lock-heartbeat', daemon=True)

  def start(self) -> Heartbeat:
    self._thread.start()
    return self

  def _run(self) -> None:
    from google.api_core import exceptions as api_errors  # pylint: disable=import-outside-toplevel

    while not self._stopped.wait(self._every):
      self._record['heartbeat'] = time.time()
      try:
        self._blob.upload_from_string(json.dumps(self._record), content_type='application/json',
                                      if_generation_match=self._generation)
        self._generation = self._blob.generation
      except (api_errors.PreconditionFailed, api_errors.NotFound):
        self.lost = True
        logging.error('The lock gs://%s/%s was taken over or deleted by another run: two runs may now write to '
                      'this workdir. Stop one of them.', self._blob.bucket.name, self._blob.name)
        return
      except Exception as error:  # pylint: disable=broad-except  # a network hiccup: try again at the next beat
        logging.warning('Could not refresh the workdir lock: %s', error)

  def stop(self) -> None:
    self._stopped.set()
    self._thread.join()

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still this process's version."""
    from google.api_core import exceptions as api_errors  # pylint: disable=import-outside-toplevel

    self.stop()
    if not self.lost:
      with contextlib.suppress(api_errors.NotFound, api_errors.PreconditionFailed):
        self._blob.delete(if_generation_match=self._generation)


@contextlib.contextmanager
def held(workdir: str, *, heartbeat_seconds: float = HEARTBEAT_SECONDS, stale_after: float = STALE_AFTER_SECONDS):
  """The lock of the gs:// `workdir` for the duration of the block, refreshed in the background."""
  blob, mine = acquire(workdir, stale_after=stale_after)
  heartbeat = Heartbeat(blob, mine, every=heartbeat_seconds).start()
  try:
    yield heartbeat
  finally:
    heartbeat.release()
