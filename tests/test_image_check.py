"""Bad image files: the one rule (image_rule), the scan before training and its record (image_scan)."""

import io
import os
import threading
from unittest import mock

import numpy as np
import pytest
import sklearn.datasets
import tensorflow as tf

from densenet_jax.data import BadImageError, image_files, image_rule, image_scan
from densenet_jax.data import pipeline
from densenet_jax.data import preprocessing as pp
from densenet_jax.io import checkpoints
from densenet_jax.training import loop as training
from tests.test_train import tiny_config

PHOTO = sklearn.datasets.load_sample_image('china.jpg')[100:164, 200:280]  # a real photo, 64x80


def _pillow(image, fmt):
  from PIL import Image  # matplotlib's dependency

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, fmt)
  return buffer.getvalue()


def _with_thumbnail(jpeg):
  """`jpeg` with an EXIF-like APP1 segment holding a whole small JPEG (with its own end marker)."""
  thumbnail = tf.io.encode_jpeg(PHOTO[:16, :16]).numpy()
  app1 = b'\xff\xe1' + (len(thumbnail) + 8).to_bytes(2, 'big') + b'Exif\0\0' + thumbnail
  return jpeg[:2] + app1 + jpeg[2:]


GOOD = {
    'baseline JPEG': tf.io.encode_jpeg(PHOTO, quality=90).numpy(),
    'progressive JPEG': tf.io.encode_jpeg(PHOTO, progressive=True).numpy(),
    'JPEG with a thumbnail': _with_thumbnail(tf.io.encode_jpeg(PHOTO).numpy()),
    'PNG': tf.io.encode_png(PHOTO).numpy(),
    'GIF': _pillow(PHOTO, 'GIF'),
}


def _samples():
  """name -> (bytes, expected reason prefix or None)."""
  samples = {}
  for name, data in GOOD.items():
    samples[name] = (data, None)
    samples[f'{name} + trailing bytes'] = (data + b'\0trailer' * 8, None)
    samples[f'{name} - last byte'] = (data[:-1], image_rule.TRUNCATED)
    samples[f'{name} cut in half'] = (data[:len(data) // 2], image_rule.TRUNCATED)
  bmp = _pillow(PHOTO, 'BMP')
  samples['BMP'] = (bmp, None)
  samples['BMP + trailing bytes'] = (bmp + b'\0' * 8, 'cannot be decoded')  # TF's BMP decoder checks the size
  samples['BMP - last byte'] = (bmp[:-1], 'cannot be decoded')
  samples['text'] = (b'not an image at all', 'cannot be decoded')
  return samples


SAMPLES = _samples()


def test_the_rule_on_real_files():
  for name, (data, expected) in SAMPLES.items():
    reason = image_rule.problem(data)
    if expected is None:
      assert reason is None, (name, reason)
    else:
      assert reason is not None and reason.startswith(expected), (name, reason)
      assert '\n' not in reason and 'Detected at node' not in reason


def _accepts(decode, data):
  try:
    decode(tf.constant(data))
    return True
  except tf.errors.OpError:
    return False


def test_training_and_evaluation_decodes_refuse_exactly_what_the_rule_refuses():
  # Without the end-marker check TF's fused decode-and-crop (the training augmentation) returns a window of a
  # truncated baseline JPEG, and every decode accepts a GIF without its trailer.
  truncated = SAMPLES['baseline JPEG cut in half'][0]
  tf.image.decode_and_crop_jpeg(truncated, [0, 0, 8, 8], channels=3)  # no error
  tf.io.decode_image(SAMPLES['GIF - last byte'][0], expand_animations=False)  # no error
  key = tf.constant([0, 1], tf.int64)
  signature = [tf.TensorSpec([], tf.string)]
  # As folders.py reads a file in its tf.data pipelines: checked, then decoded (traced once, like a pipeline).
  evaluation = tf.function(lambda d: pp.decode_image(image_rule.checked(d)), input_signature=signature)
  training_crop = tf.function(lambda d: pp.decode_random_crop(image_rule.checked(d), key), input_signature=signature)
  for name, (data, expected) in SAMPLES.items():
    assert _accepts(evaluation, data) == (expected is None), name
    assert _accepts(training_crop, data) == (expected is None), name


def _folder(root, bad=True):
  """root/{train,val}/{a,b}: real JPEGs and PNGs, one JPEG with trailing bytes; with `bad`, a truncated JPEG and a
  truncated PNG in train. Returns the bad files."""
  for split in ('train', 'val'):
    for k, label in enumerate(('a', 'b')):
      os.makedirs(root / split / label)
      for i in range(4):
        image = np.roll(PHOTO, 7 * i + 3 * k, axis=1)[:40, :40]
        if i % 2:
          (root / split / label / f'{i}.png').write_bytes(tf.io.encode_png(image).numpy())
        else:
          (root / split / label / f'{i}.jpg').write_bytes(tf.io.encode_jpeg(image).numpy())
  with open(root / 'val' / 'a' / '0.jpg', 'ab') as f:
    f.write(b'\0camera trailer')
  if not bad:
    return []
  cut = [root / 'train' / 'a' / '2.jpg', root / 'train' / 'b' / '3.png']
  for path in cut:
    os.truncate(path, os.path.getsize(path) - 40)
  return [str(p) for p in cut]


def _image_folder_config(root):
  config = tiny_config(dataset='image_folder', batch_size=8, eval_split='val', augment=True, num_epochs=1,
                       lr_boundaries_epochs=())
  config.data_dir, config.image_size = str(root), 16
  return config


def test_a_run_stops_before_training_listing_every_bad_file(tmp_path):
  bad = _folder(tmp_path / 'images')
  with mock.patch.object(training.model_lib, 'from_config', side_effect=AssertionError('built a model')):
    with pytest.raises(BadImageError) as error:
      training.train_and_evaluate(_image_folder_config(tmp_path / 'images'), str(tmp_path / 'run'))
  message = str(error.value)
  assert message.startswith(f'2 of the 16 image files this run reads in {tmp_path / "images"} (train and val)')
  for path in bad:
    assert f'{path}: truncated: the' in message
  assert 'JPEG data ends before its end marker' in message and 'PNG data ends before its IEND chunk' in message
  assert '0.jpg: ' not in message  # trailing bytes after the end marker are fine
  assert 'delete or re-encode them' in message
  assert not checkpoints.complete_steps(str(tmp_path / 'run' / 'checkpoints'))


def _count_decodes():
  return mock.patch.object(image_rule, 'problem', side_effect=image_rule.problem)


def test_the_files_found_good_are_not_read_again(tmp_path):
  root = tmp_path / 'images'
  bad = _folder(root)
  splits = ('train', 'val')
  with _count_decodes() as decoded, pytest.raises(BadImageError):
    pipeline.check_image_files('image_folder', splits, data_dir=str(root))
  assert decoded.call_count == 16
  for path in bad:
    os.remove(path)
  with _count_decodes() as decoded, pytest.raises(BadImageError) as error:  # the bad files, re-encoded badly
    tf.io.write_file(bad[0], b'still not a JPEG')
    pipeline.check_image_files('image_folder', splits, data_dir=str(root))
  assert decoded.call_count == 1 and 'cannot be decoded' in str(error.value)  # only the new file is read
  os.remove(bad[0])
  with _count_decodes() as decoded:
    done = pipeline.check_image_files('image_folder', splits, data_dir=str(root))
  assert decoded.call_count == 0
  assert done == dict(files=14, checked=0, remembered=14, record=None)
  assert os.path.isfile(root / image_scan.CACHE_NAME)
  path = root / 'val' / 'b' / '1.png'
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))  # a changed file is checked again
  with _count_decodes() as decoded:
    assert pipeline.check_image_files('image_folder', splits, data_dir=str(root))['checked'] == 1
  assert decoded.call_count == 1


def test_a_read_only_image_folder_keeps_its_record_in_the_user_cache(tmp_path, monkeypatch):
  root = tmp_path / 'images'
  _folder(root, bad=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  write = image_scan._write_atomically

  def read_only_root(path, data):
    if path.startswith(str(root)):  # root ignores permissions: simulate what a user gets
      raise PermissionError(13, 'Permission denied', path)
    write(path, data)

  with mock.patch.object(image_scan, '_write_atomically', read_only_root):
    done = pipeline.check_image_files('image_folder', ('train', 'val'), data_dir=str(root))
  assert done['record'] == image_scan.cache_locations(str(root))[1]
  assert done['record'].startswith(str(tmp_path / 'cache' / 'densenet_jax' / 'checked-images'))
  with _count_decodes() as decoded:
    assert pipeline.check_image_files('image_folder', ('train', 'val'), data_dir=str(root))['checked'] == 0
  assert decoded.call_count == 0


def test_two_processes_check_half_of_the_files_each_and_agree(tmp_path):
  root = tmp_path / 'images'
  bad = _folder(root)
  paths = [str(p) for p in sorted(root.glob('*/*/*.*'))]
  barrier, shared, results = threading.Barrier(2), [None, None], [None, None]

  def process(i):
    def all_gather(mask):  # what JAX's all-gather across processes returns: every process's mask
      shared[i] = mask
      barrier.wait()
      return np.stack(shared)

    results[i] = image_scan.find_bad_files(str(root), paths, process_index=i, process_count=2, gather=all_gather,
                                           progress=False)

  threads = [threading.Thread(target=process, args=(i,)) for i in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=120)
  assert results[0][0] == results[1][0] and [p for p, _ in results[0][0]] == sorted(bad)
  assert results[0][1]['checked'] == results[1][1]['checked'] == 8  # each its half of the 16 files
  assert all(reason.startswith('truncated') for _, reason in results[0][0])


def test_predict_applies_the_same_rule(tmp_path):
  spec = image_files.ImageSpec('image_folder', (16, 16, 3), (0, 0, 0), (1, 1, 1))
  for name in ('GIF', 'GIF - last byte', 'baseline JPEG + trailing bytes', 'baseline JPEG cut in half'):
    data, expected = SAMPLES[name]
    path = tmp_path / 'image'
    path.write_bytes(data)
    if expected is None:
      assert image_files.read_image(str(path), spec).shape == (16, 16, 3)
    else:
      with pytest.raises(image_files.UnreadableImageError, match=expected):
        image_files.read_image(str(path), spec)
