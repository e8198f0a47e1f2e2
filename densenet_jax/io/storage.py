"""File operations on local paths and on Google Cloud Storage URLs (gs://bucket/...) alike.

Local paths keep the behaviour of the os module: writes that must never be seen half done go to a temporary file
renamed over the target. gs:// URLs go through etils.epath (tf.io.gfile when TensorFlow is installed, else
fsspec/gcsfs), like orbax's own files; there an object only becomes visible once its upload has finished, so a
plain write is already atomic, and there is no rename to rely on. Listings of gs:// directories use
google-cloud-storage: one paged request per directory tree, where tf.io.gfile.walk would ask about every entry
(a million requests for an ImageNet folder).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from densenet_jax.io import cloud
from densenet_jax.io.cloud import CLOUD_PREFIX, is_cloud, split_url  # for callers: paths need only this module


def absolute(path: str | os.PathLike) -> str:
  """An absolute local path, or the gs:// URL itself without a trailing slash (os.path.abspath would mangle it)."""
  path = os.fspath(path)
  if is_cloud(path):
    return path.rstrip('/') if len(path) > len(CLOUD_PREFIX) else path
  return os.path.abspath(path)


def _epath(path: str):
  from etils import epath  # pylint: disable=import-outside-toplevel

  return epath.Path(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_cloud(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_cloud(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_cloud(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """The names of the entries of the directory `path` (not their paths)."""
  if is_cloud(path):
    return [child.name for child in _epath(path).iterdir()]
  return os.listdir(path)


def _blobs(directory: str, *, recursive: bool):
  """(object names relative to `directory`, immediate sub-folder names) of a gs:// directory."""
  bucket, name = split_url(absolute(directory))
  prefix = f'{name}/' if name else ''
  listing = cloud.storage_client().list_blobs(bucket, prefix=prefix, delimiter=None if recursive else '/')
  # Folder markers ('a/b/', written by tf.io.gfile.makedirs) are not files.
  files = [blob.name[len(prefix):] for blob in listing if not blob.name.endswith('/')]
  folders = [p[len(prefix):].strip('/') for p in listing.prefixes]  # filled once the pages have been read
  return files, folders


def scan(directory: str) -> tuple[list[str], list[str]]:
  """(sub-directory names, file names) directly in `directory`, unsorted."""
  if is_cloud(directory):
    files, folders = _blobs(directory, recursive=False)
    return folders, files
  entries = list(os.scandir(directory))
  return [e.name for e in entries if e.is_dir()], [e.name for e in entries if e.is_file()]


def makedirs(path: str) -> None:
  if is_cloud(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def remove(path: str) -> None:
  """Deletes the file `path`; FileNotFoundError if there is none."""
  if is_cloud(path):
    if not _epath(path).exists():
      raise FileNotFoundError(path)
    _epath(path).unlink()
  else:
    os.remove(path)


def rename(source: str, target: str) -> None:
  """Renames a file or directory. On gs:// this copies every object and deletes the originals (not atomic)."""
  if is_cloud(source) or is_cloud(target):
    _epath(source).rename(target)
  else:
    os.rename(source, target)


def open_file(path: str, mode: str = 'r'):
  return _epath(path).open(mode) if is_cloud(path) else open(path, mode)


def read_text(path: str) -> str:
  with open_file(path) as f:
    return f.read()


def write_atomically(path: str, data: str | bytes) -> None:
  """Writes `data` to `path` so that readers see the old content or the new one, never a part."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  if is_cloud(path):  # An object appears when its upload has finished.
    with open_file(path, mode) as f:
      f.write(data)
    return
  tmp = path + '.tmp'
  try:
    with open(tmp, mode) as f:
      f.write(data)
    os.replace(tmp, path)
  except OSError:
    if os.path.exists(tmp):  # e.g. cut short by a full disk: leave no half-written file behind
      os.remove(tmp)
    raise


def append_text(path: str, text: str) -> None:
  """Appends `text` to the file `path`, creating it if needed.

  GCS objects cannot be appended to: the object is rewritten with the new text at its end (metrics logs are
  small). gcsfs would silently overwrite on mode 'a', so this never relies on it.
  """
  if not is_cloud(path):
    with open(path, 'a') as f:
      f.write(text)
    return
  previous = read_text(path) if exists(path) else ''
  write_atomically(path, previous + text)


def walk_files(directory: str) -> Iterator[str]:
  """The path of every file under `directory`, relative to it, in no particular order."""
  if is_cloud(directory):
    yield from _blobs(directory, recursive=True)[0]
    return
  for root, _, files in os.walk(directory):
    for name in files:
      yield os.path.relpath(os.path.join(root, name), directory)


def cloud_file_stats(directory: str) -> dict[str, tuple[int, int]]:
  """{path relative to the gs:// `directory`: (size in bytes, last update in ns)} of every object under it, from one
  paged listing (a stat per object would be a request per file)."""
  bucket, name = split_url(absolute(directory))
  prefix = f'{name}/' if name else ''
  return {blob.name[len(prefix):]: (blob.size, int(blob.updated.timestamp() * 1e9))
          for blob in cloud.storage_client().list_blobs(bucket, prefix=prefix) if not blob.name.endswith('/')}


def walk_order(relative_path: str) -> tuple:
  """Sort key giving os.walk's top-down order with sorted names: a folder's files, then each sub-folder in turn."""
  *folders, name = relative_path.split('/')
  return (*((1, f) for f in folders), (0, name))
