"""Checks the image-folder files a run will read before it trains, and remembers the files found good.

What makes a file bad is image_rule's one rule. The files found good are remembered per image folder, as one 64-bit
hash per file of (rule version, path under the root, size, modification time): a new or changed file is checked
again, an unchanged one is not even read. Where (the first that can be written):
  ROOT/.densenet_jax-checked-images.npy
  $XDG_CACHE_HOME/densenet_jax/checked-images/<hash of ROOT>.npy   (default ~/.cache)
Both are read. Several processes (multi-host) share the work: process i checks the files at positions i, i + P,
i + 2P, ... of the sorted listing that it does not remember, and the processes exchange which files are bad, so
each of them stops with the same list and remembers the same files.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
import tqdm
from absl import logging

from densenet_jax.data import BadImageError, image_rule
from densenet_jax.io import storage

RULE_VERSION = 1  # raise when image_rule changes: the remembered results are then checked again
CACHE_NAME = '.densenet_jax-checked-images.npy'
USER_CACHE_SUBDIR = os.path.join('densenet_jax', 'checked-images')
CHUNK = 4096  # files handed to the threads at a time (bounds the memory of pending results)


def _local_size_and_mtime(path: str) -> tuple[int, int]:
  stat = os.stat(path)
  return stat.st_size, stat.st_mtime_ns


def file_keys(root: str, paths: Sequence[str], workers: int) -> np.ndarray:
  """uint64 [N]: the hash of (rule version, path relative to `root`, size, modification time) of each file."""
  if storage.is_cloud(root):  # one listing of the bucket, not a request per file
    relative = [path[len(root):].lstrip('/') for path in paths]
    listed = storage.cloud_file_stats(root)
    stats = [listed[name] for name in relative]
  else:
    relative = [os.path.relpath(path, root) for path in paths]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # stat is I/O: slow on network file systems
      stats = list(pool.map(_local_size_and_mtime, paths, chunksize=256))
  keys = np.empty(len(paths), np.uint64)
  for i, (name, (size, mtime)) in enumerate(zip(relative, stats)):
    text = f'{RULE_VERSION}\0{name}\0{size}\0{mtime}'
    keys[i] = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), 'little')
  return keys


def cache_locations(root: str) -> list[str]:
  """Where the files found good are remembered, in order of preference."""
  user_cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  where = storage.absolute(root)
  name = hashlib.sha256(where.rstrip('/').encode()).hexdigest()[:32] + '.npy'
  return [os.path.join(root, CACHE_NAME), os.path.join(user_cache, USER_CACHE_SUBDIR, name)]


def load_remembered(root: str) -> np.ndarray:
  """The keys of the files found good before (sorted); an unreadable cache file counts as empty."""
  found = [np.empty(0, np.uint64)]
  for path in cache_locations(root):
    try:
      if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path, 'rb') as f:
          found.append(np.load(io.BytesIO(f.read()), allow_pickle=False).astype(np.uint64).ravel())
    except (OSError, ValueError, tf.errors.OpError) as error:
      logging.warning('Ignoring the unreadable record of checked images %s (%s).', path, error)
  return np.unique(np.concatenate(found))


def _write_atomically(path: str, data: bytes) -> None:
  tf.io.gfile.makedirs(os.path.dirname(path))
  tmp = f'{path}.tmp-{uuid.uuid4().hex}'  # unique: several processes may write the same record at once
  try:
    with tf.io.gfile.GFile(tmp, 'wb') as f:
      f.write(data)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except BaseException:
    try:
      tf.io.gfile.remove(tmp)
    except (OSError, tf.errors.OpError):
      pass
    raise


def remember(root: str, keys: np.ndarray) -> str | None:
  """Stores `keys` at the first location that can be written; returns it, or None (with a warning)."""
  buffer = io.BytesIO()
  np.save(buffer, np.unique(keys.astype(np.uint64)), allow_pickle=False)
  for path in cache_locations(root):
    try:
      _write_atomically(path, buffer.getvalue())
      return path
    except (OSError, tf.errors.OpError) as error:
      logging.info('Cannot record the checked images in %s (%s).', path, error)
  logging.warning('Could not record which images of %s were checked anywhere (%s); the next run checks them '
                  'again.', root, ', '.join(cache_locations(root)))
  return None


def _all_gather(mask: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  return np.asarray(multihost_utils.process_allgather(mask))


def find_bad_files(
    root: str, paths: Sequence[str], *, process_index: int = 0, process_count: int = 1,
    gather: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = True, workers: int | None = None,
) -> tuple[list[tuple[str, str]], dict]:
  """The bad files among `paths` (under `root`) with their reasons, and what was done: {'files', 'checked',
  'remembered', 'record'}.

  With process_count > 1 every process must call this with the same paths: `gather` (default: JAX's all-gather
  across processes) takes each process's bool [N] of bad files and returns all of them, [P, N].
  """
  paths = list(paths)
  workers = workers or os.cpu_count() or 1
  keys = file_keys(root, paths, workers)
  known = np.isin(keys, load_remembered(root))
  mine = (np.arange(len(paths)) % process_count == process_index) & ~known
  todo = np.flatnonzero(mine)
  if len(todo):
    logging.info('Checking %d image files of %s for undecodable or truncated files (%d checked before).',
                 len(todo), root, int(known.sum()))
  reasons: dict[int, str] = {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool, tqdm.tqdm(
      total=len(todo), desc='Checking images', unit='file', disable=not progress or not len(todo)) as bar:
    for start in range(0, len(todo), CHUNK):
      chunk = todo[start:start + CHUNK]
      for i, reason in zip(chunk, pool.map(image_rule.file_problem, [paths[i] for i in chunk])):
        if reason is not None:
          reasons[int(i)] = reason
      bar.update(len(chunk))
  bad = np.zeros(len(paths), bool)
  bad[list(reasons)] = True
  if process_count > 1:
    bad = np.asarray((gather or _all_gather)(bad)).reshape(process_count, len(paths)).any(axis=0)
  for i in np.flatnonzero(bad):  # found by another process: its reason, read again here
    if int(i) not in reasons:
      reasons[int(i)] = image_rule.file_problem(paths[i]) or 'found bad by another process'
  record = None
  if not known.all():  # something was checked here or by another process
    record = remember(root, np.concatenate([load_remembered(root), keys[~bad]]))
  bad_files = [(paths[i], reasons[int(i)]) for i in np.flatnonzero(bad)]
  return bad_files, dict(files=len(paths), checked=len(todo), remembered=int(known.sum()), record=record)


def bad_files_message(root: str, splits: Sequence[str], total: int, bad: list[tuple[str, str]]) -> str:
  listing = '\n'.join(f'  {path}: {reason}' for path, reason in bad)
  return (
      f'{len(bad)} of the {total} image files this run reads in {root} ({" and ".join(splits)}) cannot be used: '
      'undecodable, or truncated before the end marker of their format (found before training; the rule is in '
      f'docs/data.md, Image folders):\n{listing}\nBad files are fatal (skipping them would change the batches '
      'and the evaluation set): delete or re-encode them, then run the same command again; only new or changed '
      'files are checked again.'
  )


def check_splits(root: str, split_paths: dict[str, Sequence[str]], **kwargs) -> dict:
  """find_bad_files over the files of the given splits; raises BadImageError listing every bad file."""
  paths = sorted({p for split in split_paths.values() for p in split})
  bad, done = find_bad_files(root, paths, **kwargs)
  if bad:
    raise BadImageError(bad_files_message(root, list(split_paths), len(paths), bad))
  return done
