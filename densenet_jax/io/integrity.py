"""Checksums of complete checkpoints, so that a damaged one is found before anything trains from it.

Orbax makes a checkpoint appear atomically (temporary directory then rename; on gs:// a commit_success.txt written
last) but cannot tell whether its files were damaged afterwards (a bad disk, a truncated copy, a file deleted by
hand). When a write has finished, the sha256 of every file of `<step>/` is recorded beside it in
`<step>.sha256.json`, itself written atomically. A
checkpoint without that file was written by an older release, or the run was killed in the moment between the
end of the write and the checksums: it is unverified, and read as it is.

A checkpoint that fails verification is set aside as `<step>.corrupt-<reason>`, never deleted.
"""

from __future__ import annotations

import hashlib
import json

from densenet_jax.io import storage

SIDECAR_SUFFIX = '.sha256.json'
SET_ASIDE_MARKER = '.corrupt-'  # no underscore: orbax would read `name_<digits>` as a step


def sidecar(step_dir: str) -> str:
  return storage.absolute(step_dir) + SIDECAR_SUFFIX


def digests(directory: str) -> dict[str, str]:
  """{path relative to `directory`: sha256 hex digest} of every file under `directory`."""
  result = {}
  for name in storage.walk_files(directory):
    sha = hashlib.sha256()
    with storage.open_file(f'{directory}/{name}', 'rb') as f:
      for chunk in iter(lambda: f.read(1 << 20), b''):
        sha.update(chunk)
    result[name] = sha.hexdigest()
  return result


def record(step_dir: str) -> None:
  """Writes the checksums of the complete checkpoint `step_dir` (atomically: a crash leaves none or all)."""
  storage.write_atomically(sidecar(step_dir), json.dumps({'sha256': digests(step_dir)}, indent=0, sort_keys=True))


def has_checksums(step_dir: str) -> bool:
  return storage.isfile(sidecar(step_dir))


def problem(step_dir: str) -> str | None:
  """Why the checkpoint `step_dir` cannot be trusted ('empty', 'missing-files', 'changed-files', 'bad-checksums'),
  or None: it matches its checksums, or it has none (unverified)."""
  if not storage.isdir(step_dir) or next(storage.walk_files(step_dir), None) is None:
    return 'empty'
  if not has_checksums(step_dir):
    return None
  try:
    expected = json.loads(storage.read_text(sidecar(step_dir)))['sha256']
  except (OSError, ValueError, KeyError, TypeError):
    return 'bad-checksums'
  found = digests(step_dir)
  if set(expected) - set(found):
    return 'missing-files'
  if any(found[name] != digest for name, digest in expected.items()):
    return 'changed-files'
  return None


def set_aside(step_dir: str, reason: str) -> str:
  """Renames `step_dir` (and its checksums) to `<step>.corrupt-<reason>[-n]`; returns the new path."""
  base = f'{storage.absolute(step_dir)}{SET_ASIDE_MARKER}{reason}'
  target, n = base, 1
  while storage.exists(target):
    n += 1
    target = f'{base}-{n}'
  storage.rename(step_dir, target)
  if has_checksums(step_dir):
    storage.rename(sidecar(step_dir), sidecar(target))
  return target


def remove_orphans(directory: str) -> None:
  """Deletes the checksums of checkpoints that orbax has deleted (keep_checkpoints)."""
  for name in storage.listdir(directory):
    if name.endswith(SIDECAR_SUFFIX) and SET_ASIDE_MARKER not in name:
      if not storage.isdir(f'{directory}/{name[:-len(SIDECAR_SUFFIX)]}'):
        storage.remove(f'{directory}/{name}')
