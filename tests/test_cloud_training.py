"""train.py and evaluate.py with --workdir=gs://... on the local GCS emulator (conftest.py), as users run them."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from densenet_jax.io import loading
from densenet_jax.io import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Digits, a one-layer-per-block DenseNet-BC, batch 128: 11 steps per epoch (as in test_train_processes.py).
TINY = [
    f'--config={ROOT}/configs/quickstart.py',
    '--config.architecture.depth=10',
    '--config.architecture.growth_rate=4',
    '--config.batch_size=128',
    '--config.log_every_steps=1',
    '--config.progress_bar=False',
]
# Given once each: ml_collections joins the values of a tuple field given twice.
TWO_EPOCHS = ['--config.num_epochs=2', '--config.lr_boundaries_epochs=(1,)', '--config.eval_every_epochs=1',
              '--config.checkpoint_every_epochs=100']
TOTAL_STEPS = 22


def start(script, cwd, env, *flags):
  """A script of the repository run from `cwd` (so that anything written to a relative path would land there)."""
  return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *flags], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process):
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output[-3000:]
  return output


def train_steps(emulator, bucket, name):
  try:
    text = emulator.download(bucket, f'{name}/{workdir_lib.METRICS_FILE}').decode()
  except OSError:  # not written yet
    return []
  return [json.loads(line)['step'] for line in text.splitlines() if 'train_loss' in line]


def test_a_gs_workdir_resumes_after_sigterm_like_a_local_run_and_is_evaluated(gcs_bucket, tmp_path):
  emulator, bucket = gcs_bucket
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  cache = [f'--config.compilation_cache_dir={tmp_path / "cache"}']  # the runs share their compiled steps
  local = finish(start('train.py', cwd, env, f'--workdir={tmp_path / "local"}', *TINY, *TWO_EPOCHS, *cache))

  workdir = f'gs://{bucket}/run'
  process = start('train.py', cwd, env, f'--workdir={workdir}', *TINY, *TWO_EPOCHS, *cache)
  deadline = time.time() + 300
  while time.time() < deadline and process.poll() is None:
    if train_steps(emulator, bucket, 'run')[-1:] >= [3]:
      process.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  assert 'preempted' in finish(process)
  objects = emulator.list_objects(bucket)
  stopped_at = [int(name.split('/')[2]) for name in objects if name.endswith('/commit_success.txt')
                and name.count('/') == 3]
  assert len(stopped_at) == 1 and 3 <= stopped_at[0] < TOTAL_STEPS, objects

  resumed = finish(start('train.py', cwd, env, f'--workdir={workdir}', *TINY, *TWO_EPOCHS, *cache))
  assert resumed.strip().splitlines()[-1] == local.strip().splitlines()[-1]  # step=22 and the same metrics
  steps = train_steps(emulator, bucket, 'run')
  assert steps == list(range(1, TOTAL_STEPS + 1))
  local_params = loading.load_variables(str(tmp_path / 'local'))['params']
  _, cloud_variables = loading.load_model(workdir)  # as notebooks and analysis read a run
  cloud_params = cloud_variables['params']
  assert jax.tree.structure(local_params) == jax.tree.structure(cloud_params)
  for x, y in zip(jax.tree.leaves(local_params), jax.tree.leaves(cloud_params)):
    np.testing.assert_array_equal(x, y)

  objects = set(emulator.list_objects(bucket))
  for name in ('config.json', 'metrics.jsonl', 'error_curves.png', f'checkpoints/{TOTAL_STEPS}/commit_success.txt',
               f'checkpoints/{TOTAL_STEPS}.sha256.json'):
    assert f'run/{name}' in objects, sorted(objects)
  assert any(name.startswith('run/tensorboard/events.out.tfevents') for name in objects), sorted(objects)
  assert 'run/.lock' not in objects

  evaluated = finish(start('evaluate.py', cwd, env, f'--workdir={workdir}'))
  final = dict(item.split('=') for item in local.strip().splitlines()[-1].split())
  assert f'eval_accuracy={final["eval_accuracy"]}' in evaluated, evaluated[-2000:]
  assert os.listdir(cwd) == []  # nothing was written locally under the workdir's name
  assert not os.path.exists(os.path.join(ROOT, 'gs:')) and not os.path.exists(os.path.join(ROOT, bucket))


def test_a_missing_bucket_stops_train_py_with_one_paragraph(gcs_emulator_env, tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), '--workdir=gs://no-such-bucket/run', *TINY, *TWO_EPOCHS],
      cwd=tmp_path, env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Cloud storage error: --workdir=gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist' in (
      result.stderr)
  assert 'Traceback' not in result.stderr
  assert os.listdir(tmp_path) == []


def test_train_py_trains_and_evaluates_on_an_image_folder_on_gs(gcs_bucket, tmp_path):
  import tensorflow as tf

  emulator, bucket = gcs_bucket
  for split in ('train', 'val'):
    for label in ('a', 'b'):
      for i in range(4):
        image = np.full((36, 36, 3), 40 * i + (120 if label == 'b' else 0), np.uint8)
        emulator.upload(bucket, f'images/{split}/{label}/{i}.png', tf.io.encode_png(image).numpy())
  output = finish(start('train.py', tmp_path, {**os.environ, 'JAX_PLATFORMS': 'cpu'},
                        f'--workdir={tmp_path / "run"}', *TINY, '--config.dataset=image_folder',
                        f'--config.data_dir=gs://{bucket}/images', '--config.image_size=32',
                        '--config.eval_split=val', '--config.batch_size=8', '--config.augment=False',
                        '--config.num_epochs=1', '--config.lr_boundaries_epochs=(0.5,)'))
  final = output.strip().splitlines()[-1]
  assert final.startswith('step=1 ') and 'eval_accuracy=' in final, output[-2000:]
  assert sorted(os.listdir(tmp_path)) == ['run']
