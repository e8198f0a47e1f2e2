"""Tests of densenet_jax.input_pipeline on mock TFDS data, small image folders and scikit-learn digits."""

import contextlib
import itertools
import os
import re
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import pipeline as ip
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources


@contextlib.contextmanager
def mock_tfds(num_examples, as_dataset_fn=None):
  """TFDS mock data (real feature specs); `is_prepared` is forced since mock_data only bypasses download/prepare."""
  with tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset_fn), mock.patch.object(
      tfds.core.DatasetBuilder, 'is_prepared', return_value=True
  ):
    yield


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def raw_tfds_split(name, num_examples):
  """The mock split's uint8 images and labels, read directly through TFDS."""
  with mock_tfds(num_examples):
    examples = list(tfds.as_numpy(tfds.builder(name).as_dataset(split='train', shuffle_files=False)))
  return np.stack([ex['image'] for ex in examples]), np.array([ex['label'] for ex in examples])


def identify(images, raw_images, mean, std):
  """Index in raw_images of each normalized image (exact match after undoing the normalization)."""
  lookup = {r.tobytes(): i for i, r in enumerate(raw_images)}
  restored = np.round(images * np.array(std) + np.array(mean)).astype(np.uint8)
  return np.array([lookup[r.tobytes()] for r in restored], dtype=np.int64)


# ----------------------------------------------------------------------------------------------------------------
# General


def test_dataset_names():
  assert ip.DATASET_NAMES == (
      'cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012', 'image_folder', 'digits', 'synthetic'
  )


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError) as e:
    ip.get_dataset_info('cifar1O')
  for name in ip.DATASET_NAMES:
    assert name in str(e.value)
  with pytest.raises(ValueError, match='Unknown dataset'):
    ip.create_train_iterator('mnist', global_batch_size=8, seed=0, augment=False)


def test_check_batch_size():
  ip.check_batch_size(64, 8)
  with pytest.raises(ValueError, match=r'global_batch_size=60 is not divisible by the 8 devices.*56 or 64'):
    ip.check_batch_size(60, 8)
  with pytest.raises(ValueError, match='device'):
    ip.create_train_iterator('digits', global_batch_size=30, seed=0, augment=False, device_count=4)
  with pytest.raises(ValueError, match='process_count=4'):
    ip.create_eval_iterator('digits', 'test', global_batch_size=6, process_index=0, process_count=4, device_count=2)


@pytest.mark.parametrize('name', ['cifar10', 'svhn_cropped'])
def test_unprepared_tfds_dataset_says_how_to_build_it(tmp_path, name):
  with pytest.raises(FileNotFoundError) as e:
    ip.create_train_iterator(name, global_batch_size=8, seed=0, augment=False, data_dir=str(tmp_path))
  assert f'tfds build {name} --data_dir={tmp_path}' in str(e.value)
  assert 'download=True' in str(e.value)


def test_unprepared_imagenet_names_the_tar_files(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    ip.create_eval_iterator('imagenet2012', 'validation', global_batch_size=8, data_dir=str(tmp_path))
  message = str(e.value)
  manual_dir = os.path.join(str(tmp_path), 'downloads', 'manual')
  assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
  assert f'tfds build imagenet2012 --data_dir={tmp_path} --manual_dir={manual_dir}' in message


def test_argument_errors():
  with pytest.raises(ValueError, match='image_size must be None or 32'):
    ip.get_dataset_info('cifar10', image_size=224)
  with pytest.raises(ValueError, match='ten_crop'):
    ip.create_eval_iterator('digits', 'test', global_batch_size=8, ten_crop=True)
  with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
    ip.create_eval_iterator('digits', 'validation', global_batch_size=8)
  with pytest.raises(ValueError, match='fewer than global_batch_size=2048'):
    ip.create_train_iterator('digits', global_batch_size=2048, seed=0, augment=False)
  with pytest.raises(TypeError, match='only for dataset="synthetic"'):
    ip.get_dataset_info('digits', num_classes=3)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR on mock data

CIFAR_N = 24
CIFAR_B = 8  # 3 steps per epoch


@pytest.fixture(scope='module', params=['cifar10', 'cifar100'])
def cifar(request):
  name = request.param
  images, labels = raw_tfds_split(name, CIFAR_N)
  recipe = {'cifar10': (pp.CIFAR10_MEAN, pp.CIFAR10_STD), 'cifar100': (pp.CIFAR100_MEAN, pp.CIFAR100_STD)}[name]
  return name, images, labels, recipe


def cifar_train(name, n_steps, **kwargs):
  kwargs = {'global_batch_size': CIFAR_B, 'seed': 0, 'augment': False, **kwargs}
  with mock_tfds(CIFAR_N):
    return take(ip.create_train_iterator(name, **kwargs), n_steps)


def test_cifar_info(cifar):
  name = cifar[0]
  info = ip.get_dataset_info(name)
  assert info.num_classes == {'cifar10': 10, 'cifar100': 100}[name]
  assert (info.image_shape, info.num_train_examples, info.eval_splits) == ((32, 32, 3), 50_000, {'test': 10_000})


def test_cifar_train_is_normalized_epoch_permutation(cifar):
  name, raw_images, raw_labels, (mean, std) = cifar
  batches = cifar_train(name, 6)
  for b in batches:
    assert b['image'].shape == (CIFAR_B, 32, 32, 3) and b['image'].dtype == np.float32
    assert b['label'].shape == (CIFAR_B,) and b['label'].dtype == np.int32
  images = np.concatenate([b['image'] for b in batches])
  ids = identify(images, raw_images, mean, std)
  np.testing.assert_allclose(images, (raw_images[ids] - np.array(mean)) / np.array(std), atol=1e-5)
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in batches]), raw_labels[ids])
  epoch0, epoch1 = ids[:CIFAR_N], ids[CIFAR_N:]
  assert sorted(epoch0) == sorted(epoch1) == list(range(CIFAR_N))  # each epoch is a permutation
  assert list(epoch0) != list(epoch1) and list(epoch0) != list(range(CIFAR_N))
  other_seed = identify(np.concatenate([b['image'] for b in cifar_train(name, 3, seed=1)]), raw_images, mean, std)
  assert list(other_seed) != list(epoch0)


def test_cifar_augmentation_is_pad_crop_flip_of_the_same_example(cifar):
  name, raw_images, raw_labels, (mean, std) = cifar
  plain = cifar_train(name, 3)
  augmented = cifar_train(name, 3, augment=True)
  flips, shifts = 0, 0
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p['label'], a['label'])
    for x, y in zip(p['image'], a['image']):
      padded = np.pad(x, [(4, 4), (4, 4), (0, 0)])  # zero = the channel mean after normalization
      matches = [
          (dy, dx, flip)
          for dy in range(9) for dx in range(9) for flip in (False, True)
          if np.array_equal((padded[:, ::-1] if flip else padded)[dy:dy + 32, dx:dx + 32], y)
      ]
      assert matches, 'augmented image is not a padded crop/flip of the original'
      flips += matches[0][2]
      shifts += matches[0][:2] != (4, 4)
  assert 0 < flips < CIFAR_N and shifts > CIFAR_N // 2
  assert_batches_equal(augmented, cifar_train(name, 3, augment=True))
  other = cifar_train(name, 3, augment=True, seed=1)
  assert not np.array_equal(np.stack([b['image'] for b in other]), np.stack([b['image'] for b in augmented]))


def test_cifar_resume_equals_continued_iterator(cifar):
  name = cifar[0]
  full = cifar_train(name, 8, augment=True, seed=3)
  for start in (1, 4):  # inside the first epoch, and in the second one
    assert_batches_equal(cifar_train(name, 8 - start, augment=True, seed=3, start_step=start), full[start:])


def test_cifar_hosts_read_disjoint_slices_of_the_global_batch(cifar):
  name, raw_images, _, (mean, std) = cifar
  single = cifar_train(name, 3, augment=True, process_index=0, process_count=1)
  hosts = [cifar_train(name, 3, augment=True, process_index=i, process_count=2) for i in range(2)]
  for step in range(3):
    for key in ('image', 'label'):
      assert hosts[0][step][key].shape[0] == CIFAR_B // 2
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), single[step][key]
      )
  plain = [cifar_train(name, 3, process_index=i, process_count=2) for i in range(2)]
  ids = [identify(np.concatenate([b['image'] for b in h]), raw_images, mean, std) for h in plain]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(np.concatenate(ids)) == list(range(CIFAR_N))


@pytest.mark.parametrize('process_count,batch', [(1, 16), (2, 16), (3, 6)])
def test_cifar_eval_sees_every_example_once(cifar, process_count, batch):
  name, raw_images, raw_labels, (mean, std) = cifar
  seen, num_batches = [], set()
  with mock_tfds(CIFAR_N):
    for i in range(process_count):
      batches = list(ip.create_eval_iterator(
          name, 'test', global_batch_size=batch, process_index=i, process_count=process_count
      ))
      again = list(ip.create_eval_iterator(
          name, 'test', global_batch_size=batch, process_index=i, process_count=process_count
      ))
      assert_batches_equal(batches, again)  # deterministic
      num_batches.add(len(batches))
      for b in batches:
        assert b['mask'].dtype == bool and b['image'].shape == (batch // process_count, 32, 32, 3)
        assert not b['image'][~b['mask']].any()
        ids = identify(b['image'][b['mask']], raw_images, mean, std)
        np.testing.assert_array_equal(b['label'][b['mask']], raw_labels[ids])
        seen.extend(ids)
  assert len(num_batches) == 1  # the same number of batches on every process
  assert sorted(seen) == list(range(CIFAR_N))


# ----------------------------------------------------------------------------------------------------------------
# SVHN on mock data. The held-out counts are scaled down (400 / 200 per class -> 4 / 2) to keep the mock small.

SVHN_N = 100
SVHN_HELD_OUT = {'train': 4, 'extra': 2}


@pytest.fixture(scope='module')
def svhn_raw():
  return raw_tfds_split('svhn_cropped', SVHN_N)


def test_svhn_info():
  info = ip.get_dataset_info('svhn_cropped')
  assert info.num_train_examples == 73_257 + 531_131 - 6_000 == 598_388
  assert info.eval_splits == {'validation': 6_000, 'test': 26_032}
  assert sources.SVHN_VALIDATION_PER_CLASS == {'train': 400, 'extra': 200}


def test_svhn_splits_scaling_and_held_out_images(svhn_raw, monkeypatch):
  raw_images, raw_labels = svhn_raw
  monkeypatch.setattr(sources, 'SVHN_VALIDATION_PER_CLASS', SVHN_HELD_OUT)
  with mock_tfds(SVHN_N):
    assert ip.get_dataset_info('svhn_cropped').eval_splits['validation'] == 60
    validation = list(ip.create_eval_iterator('svhn_cropped', 'validation', global_batch_size=32))
    train_eval = list(ip.create_eval_iterator('svhn_cropped', 'train', global_batch_size=64))
    (train,) = take(ip.create_train_iterator('svhn_cropped', global_batch_size=64, seed=0, augment=False), 1)
    with pytest.raises(ValueError, match='no data augmentation'):
      ip.create_train_iterator('svhn_cropped', global_batch_size=64, seed=0, augment=True)
  assert train['image'].shape == (64, 32, 32, 3)
  assert 0.0 <= train['image'].min() and train['image'].max() <= 1.0
  np.testing.assert_allclose(train['image'] * 255, np.round(train['image'] * 255), atol=1e-3)  # pixels / 255
  val_labels = np.concatenate([b['label'][b['mask']] for b in validation])
  assert len(val_labels) == 60
  # Mock 'train' and 'extra' hold the same examples: 4 + 2 of each class are held out.
  np.testing.assert_array_equal(np.bincount(val_labels, minlength=10), [6] * 10)
  train_labels = np.concatenate([b['label'][b['mask']] for b in train_eval])
  assert len(train_labels) == 2 * SVHN_N - 60
  np.testing.assert_array_equal(
      np.bincount(train_labels, minlength=10), 2 * np.bincount(raw_labels, minlength=10) - 6
  )
  # The held-out images are the first 4 of each class of 'train' in TFDS order (then the first 2 of 'extra').
  first_train = np.flatnonzero(sources.first_per_class(raw_labels, 4, 10))
  first_extra = np.flatnonzero(sources.first_per_class(raw_labels, 2, 10))
  val_images = np.concatenate([b['image'][b['mask']] for b in validation])
  np.testing.assert_allclose(val_images * 255, raw_images[np.concatenate([first_train, first_extra])], atol=1e-3)
  # Training examples are the others, train first then extra, in order (an eval pass is in split order).
  rest = np.concatenate([np.delete(raw_images, first_train, 0), np.delete(raw_images, first_extra, 0)])
  train_images = np.concatenate([b['image'][b['mask']] for b in train_eval])
  np.testing.assert_allclose(train_images * 255, rest, atol=1e-3)


def test_first_per_class():
  labels = np.array([1, 0, 1, 1, 0, 2, 2, 0])
  np.testing.assert_array_equal(sources.first_per_class(labels, 2, 3), [1, 1, 1, 0, 1, 1, 1, 0])
  with pytest.raises(ValueError, match='Class 2 has only 2'):
    sources.first_per_class(labels, 3, 3)


# ----------------------------------------------------------------------------------------------------------------
# ImageNet (TFDS) on mock data


IMAGENET_N = 12
SIZE = 48  # small crops keep the tests fast; the recipe is the same as at 224


def imagenet_train(n_steps, **kwargs):
  kwargs = {'global_batch_size': 4, 'seed': 0, 'augment': True, 'image_size': SIZE, **kwargs}
  with mock_tfds(IMAGENET_N):
    return take(ip.create_train_iterator('imagenet2012', **kwargs), n_steps)


def test_imagenet_info():
  info = ip.get_dataset_info('imagenet2012')
  assert (info.num_classes, info.image_shape) == (1000, (224, 224, 3))
  assert (info.num_train_examples, info.eval_splits) == (1_281_167, {'validation': 50_000})
  assert info.class_names[0] == 'n01440764'


def test_imagenet_train_shapes_determinism_and_resume():
  batches = imagenet_train(5)  # 3 steps per epoch: crosses an epoch boundary
  for b in batches:
    assert b['image'].shape == (4, SIZE, SIZE, 3) and b['image'].dtype == np.float32
    assert b['label'].dtype == np.int32 and ((0 <= b['label']) & (b['label'] < 1000)).all()
    assert np.isfinite(b['image']).all() and -4 < b['image'].mean() < 4
  assert_batches_equal(imagenet_train(2), batches[:2])
  assert_batches_equal(imagenet_train(2, start_step=3), batches[3:])
  assert_batches_equal(imagenet_train(3, start_step=2), batches[2:])
  other = imagenet_train(3, seed=1)
  assert not all(np.array_equal(a['image'], b['image']) for a, b in zip(batches, other))
  epoch_labels = sorted(np.concatenate([b['label'] for b in batches[:3]]))
  assert epoch_labels == sorted(np.concatenate([b['label'] for b in other]))  # the same examples
  plain = imagenet_train(3, augment=False)
  assert sorted(np.concatenate([b['label'] for b in plain])) == epoch_labels


def test_imagenet_eval_single_and_ten_crop():
  with mock_tfds(IMAGENET_N):
    single = list(ip.create_eval_iterator('imagenet2012', 'validation', global_batch_size=8, image_size=SIZE))
    ten = list(ip.create_eval_iterator(
        'imagenet2012', 'validation', global_batch_size=8, image_size=SIZE, ten_crop=True
    ))
  assert [b['image'].shape for b in single] == [(8, SIZE, SIZE, 3)] * 2
  assert [b['image'].shape for b in ten] == [(8, 10, SIZE, SIZE, 3)] * 2
  assert sum(b['mask'].sum() for b in single) == IMAGENET_N
  for s, t in zip(single, ten):
    np.testing.assert_array_equal(s['mask'], t['mask'])
    np.testing.assert_array_equal(s['label'], t['label'])
    np.testing.assert_allclose(t['image'][:, 0], s['image'], atol=1e-6)  # crop 0 is the center crop
    assert not t['image'][~t['mask']].any()


def test_color_augmentation_matches_fb_resnet_torch_sequence():
  image = np.random.default_rng(0).uniform(0, 255, (9, 7, 3)).astype(np.float32)
  gray_weights = np.array(pp.GRAYSCALE_WEIGHTS)
  orders = set()
  for seed in range(8):
    key = tf.constant([seed, 11], tf.int64)
    jitter, order, lighting = (t.numpy() for t in pp.color_draws(key))
    orders.add(tuple(order))
    x = image / 255.0  # reference: fb.resnet.torch transforms.lua, one step at a time
    for t in order:
      gray = (x @ gray_weights)[..., None]
      other = [0.0, gray.mean(), gray][t]
      x = jitter[t] * x + (1 - jitter[t]) * other
    x = x + np.array(pp.IMAGENET_PCA_EIGVEC) @ (lighting * np.array(pp.IMAGENET_PCA_EIGVAL))
    expected = (x - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
    np.testing.assert_allclose(pp.color_augment_and_normalize(tf.constant(image), key), expected, atol=1e-4)
    assert np.all(np.abs(jitter - 1) <= 0.4) and np.any(jitter != 1)
  assert len(orders) > 2


@pytest.mark.parametrize('height,width', [(375, 500), (64, 48), (600, 20)])
def test_random_sized_crop_window(height, width):
  windows = np.array([
      pp.sample_crop_window(tf.constant([k, 5], tf.int64), height, width).numpy() for k in range(60)
  ])
  y, x, h, w = windows.T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  area = h * w / (height * width)
  side = min(height, width)
  fallback = (h == side) & (w == side)
  ok = ~fallback
  # Rounding to whole pixels moves area and aspect ratio a little outside the nominal ranges on small images.
  assert (area[ok] >= 0.08 * 0.8).all() and (area[ok] <= 1.0).all()
  aspect = np.maximum(w / h, h / w)[ok]
  assert (aspect <= 4 / 3 * 1.25).all()
  if height == 600:  # 600 x 20: no 8%-100% window with aspect in [3/4, 4/3] fits -> central square
    assert fallback.all() and (y == (height - side + 1) // 2).all()
  else:
    assert ok.mean() > 0.8 and len(set(map(tuple, windows))) > 50


def _indexed_imagenet(num_examples):
  """A mock `_as_dataset` that honors 'split[a:b]' and makes example k a flat PNG of value 10 * k."""

  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del self, decoders, read_config, shuffle_files, kwargs
    match = re.fullmatch(r'(\w+)(?:\[(\d+):(\d+)\])?', str(split))
    start, end = (int(match[2]), int(match[3])) if match[2] else (0, num_examples)
    pngs = [tf.io.encode_png(np.full((30 + k, 40, 3), 10 * k, np.uint8)).numpy() for k in range(start, end)]
    return tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(pngs, tf.string) if pngs else tf.zeros([0], tf.string),
        'label': tf.range(start, end, dtype=tf.int64),
        'file_name': tf.constant([f'{k}.JPEG' for k in range(start, end)], tf.string),
    })

  return as_dataset


def _flat_value(image):
  """The uint8 value of a flat normalized ImageNet image."""
  return int(np.round(((image * np.array(pp.IMAGENET_STD) + np.array(pp.IMAGENET_MEAN)) * 255).mean()))


@pytest.mark.parametrize('num_examples,process_count,batch', [(21, 2, 4), (20, 4, 8)])
def test_imagenet_hosts_read_disjoint_slices_and_eval_sees_each_once(num_examples, process_count, batch):
  fake = _indexed_imagenet(num_examples)
  seen_eval, num_batches, seen_train = [], set(), []
  steps = num_examples // batch
  with mock_tfds(num_examples, as_dataset_fn=fake):
    for i in range(process_count):
      kwargs = {'global_batch_size': batch, 'image_size': SIZE, 'process_index': i, 'process_count': process_count}
      batches = list(ip.create_eval_iterator('imagenet2012', 'validation', **kwargs))
      num_batches.add(len(batches))
      for b in batches:
        values = [_flat_value(x) for x in b['image'][b['mask']]]
        np.testing.assert_array_equal(np.array(values) // 10, b['label'][b['mask']])
        seen_eval.extend(b['label'][b['mask']])
      train = take(ip.create_train_iterator('imagenet2012', seed=0, augment=False, **kwargs), steps)
      host = np.concatenate([b['label'] for b in train])
      lo, hi = i * num_examples // process_count, (i + 1) * num_examples // process_count
      assert ((lo <= host) & (host < hi)).all() and len(set(host)) == len(host)  # its own slice, no repeats
      seen_train.extend(host)
  assert len(num_batches) == 1
  assert sorted(seen_eval) == list(range(num_examples))
  assert len(set(seen_train)) == len(seen_train) == steps * batch


# ----------------------------------------------------------------------------------------------------------------
# Image folders

FOLDER = {  # split -> class -> number of images (mixed PNG / JPEG)
    'train': {'dog': 3, 'ant': 4, 'cat': 2},
    'val': {'cat': 2, 'dog': 1, 'ant': 2},
}


def _write_image(path, value, shape):
  image = np.full(shape, value, np.uint8)
  image[..., 2] = 128
  encode = tf.io.encode_jpeg if path.endswith('.jpg') else tf.io.encode_png
  tf.io.write_file(path, encode(image, quality=100) if path.endswith('.jpg') else encode(image))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """root/split/class/k.{png,jpg}: flat images of red value 10 * (k + 1). Returns root, {k: (split, class)}."""
  root = tmp_path_factory.mktemp('folder')
  files = {}
  k = 0
  for split, classes in FOLDER.items():
    for cls, count in classes.items():
      os.makedirs(root / split / cls)
      for _ in range(count):
        path = str(root / split / cls / f'{k:02d}.{"jpg" if k % 2 else "png"}')
        _write_image(path, 10 * (k + 1), (40 + 3 * k, 60 - 2 * k, 3))
        files[k] = (split, cls)
        k += 1
  (root / 'train' / 'ant' / 'notes.txt').write_text('not an image; ignored')
  return str(root), files


def _red(image):
  return int(np.round(((image[..., 0] * pp.IMAGENET_STD[0] + pp.IMAGENET_MEAN[0]) * 255).mean() / 10))


def test_image_folder_info(image_folder):
  root, _ = image_folder
  info = ip.get_dataset_info('image_folder', data_dir=root, image_size=32)
  assert info.class_names == ('ant', 'cat', 'dog')
  assert (info.num_classes, info.image_shape) == (3, (32, 32, 3))
  assert (info.num_train_examples, info.eval_splits) == (9, {'val': 5})


@pytest.mark.parametrize('split,process_count', [('val', 1), ('train', 2)])
def test_image_folder_eval_labels_and_exactly_once(image_folder, split, process_count):
  root, files = image_folder
  classes = ('ant', 'cat', 'dog')
  seen, num_batches = [], set()
  for i in range(process_count):
    batches = list(ip.create_eval_iterator(
        'image_folder', split, global_batch_size=4, data_dir=root, image_size=32,
        process_index=i, process_count=process_count,
    ))
    num_batches.add(len(batches))
    for b in batches:
      assert b['image'].shape == (4 // process_count, 32, 32, 3)
      for image, label in zip(b['image'][b['mask']], b['label'][b['mask']]):
        k = _red(image) - 1
        assert files[k][0] == split and classes[label] == files[k][1]
        seen.append(k)
  assert len(num_batches) == 1
  assert sorted(seen) == sorted(k for k, (s, _) in files.items() if s == split)


def test_image_folder_train(image_folder):
  root, files = image_folder

  def train(n, **kwargs):
    kwargs = {'global_batch_size': 4, 'seed': 0, 'augment': True, 'data_dir': root, 'image_size': 32, **kwargs}
    return take(ip.create_train_iterator('image_folder', **kwargs), n)

  batches = train(5)  # 2 steps per epoch
  assert all(b['image'].shape == (4, 32, 32, 3) and b['label'].dtype == np.int32 for b in batches)
  assert_batches_equal(batches, train(5))
  assert_batches_equal(train(2, start_step=3), batches[3:])
  hosts = [train(2, process_index=i, process_count=2) for i in range(2)]
  for step in range(2):
    np.testing.assert_array_equal(np.concatenate([h[step]['image'] for h in hosts]), batches[step]['image'])
  plain = train(2, augment=False)
  ks = [_red(x) - 1 for b in plain for x in b['image']]
  assert len(set(ks)) == 8 and all(files[k][0] == 'train' for k in ks)
  assert [('ant', 'cat', 'dog')[y] for b in plain for y in b['label']] == [files[k][1] for k in ks]


def test_ten_crop_positions(tmp_path):
  # 64 x 80 image, image_size 56 -> resize target 64: no resampling, so crops can be checked exactly.
  image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)
  os.makedirs(tmp_path / 'val' / 'a')
  tf.io.write_file(str(tmp_path / 'val' / 'a' / 'x.png'), tf.io.encode_png(image))
  (batch,) = ip.create_eval_iterator(
      'image_folder', 'val', global_batch_size=1, data_dir=str(tmp_path), image_size=56, ten_crop=True
  )
  normalized = (image / 255.0 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
  expected = []
  for img in (normalized, normalized[:, ::-1]):
    for y, x in ((4, 12), (0, 0), (0, 24), (8, 0), (8, 24)):  # center, corners
      expected.append(img[y:y + 56, x:x + 56])
  np.testing.assert_allclose(batch['image'][0], np.stack(expected), atol=1e-4)


def test_image_folder_errors(tmp_path):
  def first_batch(split='train', root=tmp_path):
    return next(ip.create_eval_iterator('image_folder', split, global_batch_size=2, data_dir=str(root)))

  with pytest.raises(ValueError, match='needs data_dir'):
    ip.get_dataset_info('image_folder')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    first_batch(root=tmp_path / 'nope')
  with pytest.raises(ValueError, match='has no split folders'):
    first_batch()
  os.makedirs(tmp_path / 'train' / 'a')
  (tmp_path / 'train' / 'a' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r'train contains no images'):
    first_batch()
  _write_image(str(tmp_path / 'train' / 'a' / 'ok.png'), 50, (20, 20, 3))
  with pytest.raises(FileNotFoundError, match="no 'val' split folder"):
    first_batch('val')
  _write_image(str(tmp_path / 'train' / 'loose.png'), 50, (20, 20, 3))
  with pytest.raises(ValueError, match='must be in class sub-folders'):
    first_batch()
  os.remove(tmp_path / 'train' / 'loose.png')
  (tmp_path / 'train' / 'a' / 'bad.jpg').write_bytes(b'definitely not a jpeg')
  jpeg = tf.io.encode_jpeg(np.zeros((50, 50, 3), np.uint8)).numpy()
  (tmp_path / 'train' / 'a' / 'cut.jpg').write_bytes(jpeg[: len(jpeg) // 2])
  with pytest.raises(ValueError, match=r'(?s)Could not decode 2 image file\(s\).*bad\.jpg.*cut\.jpg.*fatal'):
    first_batch()
  train = ip.create_train_iterator(
      'image_folder', global_batch_size=3, seed=0, augment=True, data_dir=str(tmp_path), image_size=16
  )
  with pytest.raises(ValueError, match='Could not decode'):
    next(train)


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def test_digits_split_is_fixed_and_stratified():
  index = sources.digits_split_indices()
  assert (len(index['train']), len(index['test'])) == (1437, 360)
  assert index['test'][:12].tolist() == [3, 7, 13, 19, 36, 38, 43, 48, 53, 55, 60, 62]
  assert int(index['test'].sum()) == 312284
  assert not set(index['train']) & set(index['test'])
  assert sorted(np.concatenate([index['train'], index['test']])) == list(range(1797))
  test = sources.load_digits_arrays('test')
  np.testing.assert_array_equal(np.bincount(test.labels), [36] * 10)
  info = ip.get_dataset_info('digits')
  assert (info.image_shape, info.num_train_examples, info.eval_splits) == ((8, 8, 1), 1437, {'test': 360})


def test_digits_normalization_and_translation():
  batches = list(ip.create_eval_iterator('digits', 'train', global_batch_size=500))
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  assert images.shape == (1437, 8, 8, 1) and sum(b['mask'].sum() for b in batches) == 1437
  assert abs(images.mean()) < 1e-3 and abs(images.std() - 1) < 1e-3  # DIGITS_MEAN / DIGITS_STD are train stats
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  np.testing.assert_array_equal(labels, sources.load_digits_arrays('train').labels)

  plain = take(ip.create_train_iterator('digits', global_batch_size=32, seed=5, augment=False), 2)
  moved = take(ip.create_train_iterator('digits', global_batch_size=32, seed=5, augment=True), 2)
  shifts = set()
  for p, m in zip(plain, moved):
    np.testing.assert_array_equal(p['label'], m['label'])
    for x, y in zip(p['image'], m['image']):
      padded = np.pad(x, [(1, 1), (1, 1), (0, 0)])
      found = [(dy, dx) for dy in range(3) for dx in range(3) if np.array_equal(padded[dy:dy + 8, dx:dx + 8], y)]
      assert found, 'augmented digit is not a translation by at most one pixel'
      shifts.add(found[0])
  assert len(shifts) > 4


# ----------------------------------------------------------------------------------------------------------------
# Synthetic


def test_synthetic():
  kwargs = {'num_classes': 7, 'image_shape': (12, 10, 2), 'num_train_examples': 40, 'num_eval_examples': 9}
  info = ip.get_dataset_info('synthetic', **kwargs)
  assert (info.num_classes, info.image_shape, info.num_train_examples, info.eval_splits) == (
      7, (12, 10, 2), 40, {'test': 9}
  )
  batches = take(ip.create_train_iterator('synthetic', global_batch_size=8, seed=0, augment=False, **kwargs), 6)
  assert all(b['image'].shape == (8, 12, 10, 2) and b['image'].dtype == np.float32 for b in batches)
  labels = np.concatenate([b['label'] for b in batches])
  assert ((0 <= labels) & (labels < 7)).all() and len(set(labels)) > 3
  images = np.concatenate([b['image'] for b in batches])
  assert -1 <= images.min() < -0.9 and 0.9 < images.max() <= 1
  again = take(ip.create_train_iterator('synthetic', global_batch_size=8, seed=0, augment=False, **kwargs), 6)
  assert_batches_equal(batches, again)
  evals = list(ip.create_eval_iterator('synthetic', 'test', global_batch_size=4, **kwargs))
  assert len(evals) == 3 and sum(b['mask'].sum() for b in evals) == 9
  assert ip.get_dataset_info('synthetic', image_size=64).image_shape == (64, 64, 3)
  with pytest.raises(TypeError, match='Unknown synthetic'):
    ip.get_dataset_info('synthetic', num_clases=3)
  with pytest.raises(ValueError, match='no data augmentation'):
    ip.create_train_iterator('synthetic', global_batch_size=8, seed=0, augment=True, **kwargs)
