"""train.py as users run it: several devices, several processes, preemption and exact resume."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from benchmarks import kill_resume
from densenet_jax.io import checkpoints
from densenet_jax.io import loading
from densenet_jax.training import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Digits, a one-layer-per-block DenseNet-BC, batch 128: 11 steps per epoch.
TINY = kill_resume.TINY_RUN


def run_train(workdir, *flags, env=None, wait=True):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  command = [sys.executable, 'train.py', f'--workdir={workdir}', *TINY, *flags]
  process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  if not wait:
    return process
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output[-3000:]
  return output


def params_of(workdir):
  return loading.load_variables(str(workdir))['params']


def assert_same_params(a, b, **tolerance):
  import jax

  flat_a, flat_b = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, err_msg=jax.tree_util.keystr(path), **tolerance)


def test_four_devices_give_the_same_training_as_one(tmp_path):
  flags = ['--config.num_epochs=1', '--config.lr_boundaries_epochs=(0.5,)']
  run_train(tmp_path / 'one', *flags)
  run_train(tmp_path / 'four', *flags, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'})
  losses = [[r['train_loss'] for r in reporting.read_metrics(str(tmp_path / d)) if 'train_loss' in r]
            for d in ('one', 'four')]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
  assert_same_params(params_of(tmp_path / 'one'), params_of(tmp_path / 'four'), rtol=1e-3, atol=1e-5)


def test_sigterm_saves_and_a_restart_resumes_exactly(tmp_path):
  flags = ['--config.num_epochs=6', '--config.lr_boundaries_epochs=(3,)',
           '--config.checkpoint_every_epochs=100']
  run_train(tmp_path / 'uninterrupted', *flags)

  workdir = tmp_path / 'interrupted'
  process = run_train(workdir, *flags, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    steps = [r['step'] for r in reporting.read_metrics(str(workdir)) if 'train_loss' in r]
    if steps and steps[-1] >= 3:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output[-3000:]
  stopped_at = checkpoints.Checkpointer(str(workdir / 'checkpoints'), keep=3).latest_step()
  assert stopped_at is not None and stopped_at < 66, 'the run was not interrupted'
  assert 'preempted' in output

  output = run_train(workdir, *flags)
  assert 'step=66' in output
  resumed_steps = [r['step'] for r in reporting.read_metrics(str(workdir)) if 'train_loss' in r]
  assert resumed_steps == sorted(resumed_steps) and resumed_steps[-1] == 66
  assert_same_params(params_of(tmp_path / 'uninterrupted'), params_of(workdir), rtol=0, atol=0)


def test_a_second_run_takes_its_compiled_steps_from_the_cache(tmp_path):
  cache = tmp_path / 'cache'
  flags = ['--config.num_epochs=1', '--config.lr_boundaries_epochs=(0.5,)', f'--config.compilation_cache_dir={cache}']
  first = run_train(tmp_path / 'first', *flags)
  entries = sorted(os.listdir(cache))
  assert any(name.startswith('jit_train_step-') for name in entries), entries
  # Same model, batch and devices: the same keys, so the second run adds no key for a program the first run
  # cached, and trains the same. (JAX caches only programs that took a second or more to compile: one that
  # compiles in about a second, such as the initialization, may be cached by either run.)
  second = run_train(tmp_path / 'second', *flags)
  added = set(os.listdir(cache)) - set(entries)
  program = lambda entry: entry.rsplit('-', 2)[0]  # 'jit_train_step-<key>-cache' -> 'jit_train_step'
  assert not {program(entry) for entry in added} & {program(entry) for entry in entries}, (added, entries)
  assert set(entries) <= set(os.listdir(cache))
  assert first.strip().splitlines()[-1] == second.strip().splitlines()[-1]
