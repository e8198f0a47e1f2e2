"""gs:// paths on a local GCS emulator (conftest.py): file operations, the workdir lock, image folders, errors."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from densenet_jax.io import cloud, cloud_lock, lock, storage


def test_file_operations_work_alike_on_gs_and_on_the_local_disk(gcs_bucket, tmp_path):
  _, bucket = gcs_bucket
  for root in (str(tmp_path / 'run'), f'gs://{bucket}/run'):
    storage.makedirs(f'{root}/sub/deeper')
    storage.write_atomically(f'{root}/a.json', '{"x": 1}')
    storage.write_atomically(f'{root}/sub/b.png', b'\x89PNG')
    storage.write_atomically(f'{root}/sub/deeper/c.txt', 'c')
    storage.append_text(f'{root}/log.jsonl', 'one\n')
    storage.append_text(f'{root}/log.jsonl', 'two\n')
    assert storage.read_text(f'{root}/log.jsonl') == 'one\ntwo\n', root
    assert storage.isdir(f'{root}/sub') and not storage.isfile(f'{root}/sub'), root
    assert storage.isfile(f'{root}/a.json') and not storage.isdir(f'{root}/a.json'), root
    folders, files = storage.scan(root)
    assert (sorted(folders), sorted(files)) == (['sub'], ['a.json', 'log.jsonl']), root
    assert sorted(storage.walk_files(root)) == ['a.json', 'log.jsonl', 'sub/b.png', 'sub/deeper/c.txt'], root
    storage.rename(f'{root}/sub', f'{root}/moved')
    assert sorted(storage.walk_files(f'{root}/moved')) == ['b.png', 'deeper/c.txt'], root
    assert not storage.exists(f'{root}/sub/b.png'), root
    storage.remove(f'{root}/a.json')
    assert not storage.exists(f'{root}/a.json'), root
    with pytest.raises(FileNotFoundError):
      storage.remove(f'{root}/a.json')
  assert storage.absolute(f'gs://{bucket}/run/') == f'gs://{bucket}/run'


def test_a_second_run_is_refused_naming_the_first_and_the_lock_is_released(gcs_bucket):
  emulator, bucket = gcs_bucket
  workdir = f'gs://{bucket}/run'
  with lock.held(workdir):
    holder = json.loads(emulator.download(bucket, 'run/.lock'))
    assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
    with pytest.raises(lock.WorkdirBusy, match=f'process {os.getpid()} on host {socket.gethostname()}') as error:
      cloud_lock.acquire(workdir)
    assert f'{workdir}/.lock' in str(error.value)
  assert emulator.list_objects(bucket) == []


def test_the_holder_refreshes_its_heartbeat_and_notices_a_takeover(gcs_bucket):
  emulator, bucket = gcs_bucket
  workdir = f'gs://{bucket}/run'
  with cloud_lock.held(workdir, heartbeat_seconds=0.2) as heartbeat:
    beats = [json.loads(emulator.download(bucket, 'run/.lock'))['heartbeat']]
    deadline = time.time() + 30
    while len(beats) < 3 and time.time() < deadline:  # each refresh must find its own previous version
      time.sleep(0.1)
      beat = json.loads(emulator.download(bucket, 'run/.lock'))['heartbeat']
      if beat != beats[-1]:
        beats.append(beat)
    assert len(beats) == 3 and beats == sorted(beats) and not heartbeat.lost
    emulator.upload(bucket, 'run/.lock', json.dumps({'host': 'elsewhere', 'pid': 1, 'heartbeat': time.time()}).encode())
    while not heartbeat.lost and time.time() < deadline:
      time.sleep(0.1)
    assert heartbeat.lost
  assert json.loads(emulator.download(bucket, 'run/.lock'))['host'] == 'elsewhere'  # not deleted: not ours


def test_a_stale_lock_is_taken_over_with_a_warning(gcs_bucket, caplog):
  emulator, bucket = gcs_bucket
  workdir = f'gs://{bucket}/run'
  silent = time.time() - cloud_lock.STALE_AFTER_SECONDS - 10
  emulator.upload(bucket, 'run/.lock', json.dumps(
      {'host': 'tpu-host-7', 'pid': 4242, 'started': silent - 100, 'heartbeat': silent}).encode())
  recent = {'host': 'tpu-host-7', 'pid': 4242, 'started': time.time(), 'heartbeat': time.time()}
  emulator.upload(bucket, 'other/.lock', json.dumps(recent).encode())
  with pytest.raises(lock.WorkdirBusy, match='process 4242 on host tpu-host-7'):
    cloud_lock.acquire(f'gs://{bucket}/other')
  with caplog.at_level('WARNING'):
    blob, mine = cloud_lock.acquire(workdir)
  assert 'process 4242 on host tpu-host-7' in caplog.text and 'Taking over' in caplog.text
  assert json.loads(emulator.download(bucket, 'run/.lock')) == mine
  blob.delete()


def test_the_lock_of_a_dead_process_of_this_host_is_taken_over_at_once(gcs_bucket):
  emulator, bucket = gcs_bucket
  finished = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  dead = {'host': socket.gethostname(), 'pid': int(finished.stdout), 'started': time.time(), 'heartbeat': time.time()}
  emulator.upload(bucket, 'run/.lock', json.dumps(dead).encode())
  blob, mine = cloud_lock.acquire(f'gs://{bucket}/run')
  assert mine['pid'] == os.getpid()
  blob.delete()


def _write_png(path, value, shape):
  import tensorflow as tf

  tf.io.write_file(path, tf.io.encode_png(np.full(shape, value, np.uint8)))


def test_an_image_folder_on_gs_gives_the_same_batches_as_on_the_local_disk(gcs_bucket, tmp_path):
  from densenet_jax.data import pipeline

  emulator, bucket = gcs_bucket
  for k, (split, cls) in enumerate([('train', 'ant')] * 3 + [('train', 'bee')] * 3 + [('val', 'ant'), ('val', 'bee')]):
    local = tmp_path / split / cls / f'{k}.png'
    local.parent.mkdir(parents=True, exist_ok=True)
    _write_png(str(local), 20 * k, (36 + k, 40, 3))
    emulator.upload(bucket, f'images/{split}/{cls}/{k}.png', local.read_bytes())
  roots = (str(tmp_path), f'gs://{bucket}/images')
  infos = [pipeline.get_dataset_info('image_folder', data_dir=root, image_size=32) for root in roots]
  assert infos[0].class_names == infos[1].class_names == ('ant', 'bee')
  assert infos[1].num_train_examples == 6
  batches = [list(pipeline.create_eval_iterator('image_folder', 'val', global_batch_size=2, data_dir=root,
                                                image_size=32)) for root in roots]
  train = [next(iter(pipeline.create_train_iterator('image_folder', global_batch_size=2, seed=0, augment=True,
                                                    data_dir=root, image_size=32))) for root in roots]
  for a, b in ((batches[0][0], batches[1][0]), (train[0], train[1])):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_a_missing_bucket_is_one_clear_paragraph(gcs_emulator_env):
  with pytest.raises(cloud.CloudStorageError, match='the bucket gs://no-such-bucket does not exist'):
    cloud.check_bucket('gs://no-such-bucket/run', '--workdir')


def test_missing_credentials_are_one_clear_paragraph(tmp_path, monkeypatch):
  for name in ('STORAGE_EMULATOR_HOST', 'GOOGLE_APPLICATION_CREDENTIALS', 'GOOGLE_CLOUD_PROJECT'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('CLOUDSDK_CONFIG', str(tmp_path))  # no gcloud login
  monkeypatch.setenv('GCE_METADATA_HOST', '127.0.0.1:9')  # no metadata server
  monkeypatch.setenv('GCE_METADATA_IP', '127.0.0.1:9')
  with pytest.raises(cloud.CloudStorageError, match='No Google Cloud credentials were found'):
    cloud.check_bucket('gs://bucket/run', '--workdir')


def test_a_missing_google_cloud_storage_package_is_one_clear_paragraph(monkeypatch):
  import google.cloud

  monkeypatch.setitem(sys.modules, 'google.cloud.storage', None)  # as if it were not installed
  monkeypatch.delattr(google.cloud, 'storage', raising=False)
  with pytest.raises(cloud.CloudStorageError, match='need the google-cloud-storage package'):
    cloud.check_bucket('gs://bucket/run', '--workdir')


def test_converted_weights_are_written_to_and_read_from_gs(gcs_bucket):
  from densenet_jax.io import checkpoints

  _, bucket = gcs_bucket
  variables = {'params': {'classifier': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)}},
               'batch_stats': {'norm': {'mean': np.ones(2, np.float32)}}}
  path = checkpoints.save_variables(f'gs://{bucket}/weights/', variables, metadata={'num_classes': 3})
  assert path == f'gs://{bucket}/weights'
  with pytest.raises(FileExistsError):
    checkpoints.save_variables(path, variables)
  assert checkpoints.read_metadata(path) == {'num_classes': 3}
  loaded = checkpoints.load_variables(path)
  np.testing.assert_array_equal(loaded['params']['classifier']['kernel'], variables['params']['classifier']['kernel'])
  np.testing.assert_array_equal(loaded['batch_stats']['norm']['mean'], variables['batch_stats']['norm']['mean'])


def test_an_unfinished_checkpoint_on_gs_is_ignored_and_deleted_with_a_warning(gcs_bucket, caplog):
  from densenet_jax.io import checkpoints

  emulator, bucket = gcs_bucket
  directory = f'gs://{bucket}/run/checkpoints'
  state = {'w': np.arange(4, dtype=np.float32)}
  checkpointer = checkpoints.Checkpointer(directory, keep=2)
  checkpointer.save(1, state)
  checkpointer.close()
  assert checkpoints.complete_steps(directory) == [1]
  assert checkpoints.integrity.problem(f'{directory}/1') is None and storage.isfile(f'{directory}/1.sha256.json')
  emulator.upload(bucket, 'run/checkpoints/2/default/part', b'a write killed before commit_success.txt')
  assert checkpoints.complete_steps(directory) == [1]
  assert checkpoints.incomplete_checkpoints(directory) == ['2']
  with caplog.at_level('WARNING'):
    checkpointer = checkpoints.Checkpointer(directory, keep=2)
  assert 'Ignoring and deleting incomplete checkpoint(s) 2' in caplog.text and 'resuming from step 1' in caplog.text
  restored = checkpointer.restore_latest_intact(state)
  np.testing.assert_array_equal(restored['w'], state['w'])
  checkpointer.close()
  assert not [name for name in emulator.list_objects(bucket) if name.startswith('run/checkpoints/2/')]
