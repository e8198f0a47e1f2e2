"""A run whose workdir is on a real, small file system that fills up (a tmpfs mounted in a private mount namespace)."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from densenet_jax.io import checkpoints, integrity
from densenet_jax.training import reporting
from tests.test_train_processes import ROOT, TINY, params_of

# Checkpoints of this tiny model take ~160 KiB each. With 700 KiB of the 1 MiB file system filled beforehand, the
# checkpoint of epoch 1 fits and the disk is full while the run writes the next one.
SIZE_KIB, FILLER_KIB = 1024, 700
FLAGS = ['--config.num_epochs=3', '--config.lr_boundaries_epochs=(2,)', '--config.checkpoint_every_epochs=1']

SCRIPT = '''
set -u
mount -t tmpfs -o size={size}k tmpfs "$MNT"
fallocate -l {filler}k "$MNT/filler" || head -c {filler}k /dev/zero > "$MNT/filler"
"$PYTHON" train.py --workdir="$MNT/run" "$@" > "$OUT/first.out" 2> "$OUT/first.err"
echo $? > "$OUT/first.rc"
cp -a "$MNT/run" "$OUT/after_failure"
rm "$MNT/filler"
"$PYTHON" train.py --workdir="$MNT/run" "$@" > "$OUT/second.out" 2> "$OUT/second.err"
echo $? > "$OUT/second.rc"
cp -a "$MNT/run" "$OUT/after_resume"
'''


def _namespace_command():
  """How to get a private mount namespace here: as root directly, otherwise as root of a new user namespace."""
  if shutil.which('unshare') is None:
    return None
  if os.geteuid() == 0:
    return ['unshare', '--mount', '--propagation', 'private']
  return ['unshare', '--user', '--map-root-user', '--mount', '--propagation', 'private']


def _can_mount(prefix, directory):
  os.makedirs(directory, exist_ok=True)
  probe = subprocess.run([*prefix, 'sh', '-c', f'mount -t tmpfs -o size=64k tmpfs "{directory}"'],
                         capture_output=True, text=True)
  return probe.returncode == 0, (probe.stderr or probe.stdout).strip()


def test_a_full_disk_stops_the_run_with_one_paragraph_and_a_rerun_after_freeing_space_ends_exactly(tmp_path):
  prefix = _namespace_command()
  if prefix is None:
    pytest.skip('unshare (util-linux) is not installed: cannot mount a small file system')
  mounted, why = _can_mount(prefix, tmp_path / 'probe')
  if not mounted:
    pytest.skip(f'cannot mount a tmpfs in a private mount namespace (not root, and user namespaces refused): {why}')
  cache = f'--config.compilation_cache_dir={tmp_path / "cache"}'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'MNT': str(tmp_path / 'mnt'), 'OUT': str(tmp_path),
         'PYTHON': sys.executable}
  reference = subprocess.run([sys.executable, 'train.py', f'--workdir={tmp_path / "reference"}', *TINY, *FLAGS,
                              cache], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert reference.returncode == 0, reference.stderr[-3000:]
  os.makedirs(tmp_path / 'mnt')
  script = SCRIPT.format(size=SIZE_KIB, filler=FILLER_KIB)
  subprocess.run([*prefix, 'bash', '-c', script, 'full-disk', *TINY, *FLAGS, cache], cwd=ROOT, env=env,
                 check=True, timeout=1200)

  first_err = (tmp_path / 'first.err').read_text()
  assert (tmp_path / 'first.rc').read_text().strip() == '1', first_err[-3000:]
  assert 'Traceback' not in first_err and len(first_err.strip().splitlines()) == 1, first_err[-3000:]
  assert first_err.startswith(('Checkpoint error: ', 'Disk full: ')) and 'is full' in first_err, first_err
  kept = checkpoints.complete_steps(str(tmp_path / 'after_failure' / 'checkpoints'))
  assert kept, 'no checkpoint was complete before the disk filled: the filler is too large'
  assert kept[-1] < 33, 'the run ended before the disk filled: the filler is too small'
  for step in kept:
    step_dir = str(tmp_path / 'after_failure' / 'checkpoints' / str(step))
    # The newest may have filled the disk while its checksums were written: it then stays, unverified
    # (docs/faults.md). Every older one has them.
    assert integrity.has_checksums(step_dir) or step == kept[-1], step
    assert integrity.problem(step_dir) is None
    checkpoints.load_variables(step_dir)

  second_err = (tmp_path / 'second.err').read_text()
  assert (tmp_path / 'second.rc').read_text().strip() == '0', second_err[-3000:]
  resumed = (tmp_path / 'second.out').read_text().strip().splitlines()[-1]
  assert resumed == reference.stdout.strip().splitlines()[-1]
  after = tmp_path / 'after_resume'
  assert checkpoints.complete_steps(str(after / 'checkpoints'))[-1] == 33
  steps = [r['step'] for r in reporting.read_metrics(str(after)) if 'train_loss' in r]
  assert steps == list(range(1, 34))
  for x, y in zip(jax.tree.leaves(params_of(after)), jax.tree.leaves(params_of(tmp_path / 'reference'))):
    np.testing.assert_array_equal(x, y)
