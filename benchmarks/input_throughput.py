"""Images per second of the input pipelines on mock data (no dataset needed).

  python -m benchmarks.input_throughput          # from the repository root; all pipelines, prints a table
  python -m benchmarks.input_throughput --seconds 5 --only cifar10_train_plus,imagenet_train

CIFAR-10 uses `tfds.testing.mock_data` (random 32x32 images with the real feature spec). ImageNet uses the same
mock with realistic records: JPEGs of 500x375 pixels (the typical ImageNet size) of smooth content plus noise,
~100 kB each at quality 95 (ImageNet's JPEGs average ~110 kB), so that decoding costs about what it costs on the
real data. Each measurement excludes the
first batch (tracing, shuffle buffer fill) and then times whole batches for `--seconds` (evaluation: at most
one pass).
"""

import argparse
import contextlib
import os
import platform
import time
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import pipeline as ip

JPEG_POOL = 128  # distinct encoded images, cycled
IMAGENET_MOCK_EXAMPLES = 12_800


def _realistic_jpegs(count, height=375, width=500, seed=0):
  rng = np.random.default_rng(seed)
  jpegs = []
  for _ in range(count):
    coarse = rng.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
    image = tf.image.resize(coarse, (height, width), method='bicubic')[0].numpy()
    image = np.clip(image + rng.normal(0, 9, image.shape), 0, 255).astype(np.uint8)
    jpegs.append(tf.io.encode_jpeg(image, quality=95).numpy())
  return jpegs


def _imagenet_as_dataset(jpegs):
  def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
    del self, split, decoders, read_config, shuffle_files, kwargs
    ds = tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(jpegs), 'label': tf.range(len(jpegs), dtype=tf.int64) % 1000,
        'file_name': tf.constant(['x.JPEG'] * len(jpegs)),
    })
    return ds.repeat().take(IMAGENET_MOCK_EXAMPLES)

  return as_dataset


def _measure(make_iterator, batch_size, seconds):
  """(images/s, batches timed, images per CPU-second) over whole batches after the first one, for `seconds` or until
  a one-pass iterator ends. The CPU time is this process's, all threads: images per CPU-second is what one core
  delivers, the figure that scales to a host with more cores and that other jobs on the machine barely change."""
  iterator = make_iterator()
  next(iterator)
  count, start, cpu_start = 0, time.perf_counter(), time.process_time()
  for _ in iterator:
    count += 1
    if time.perf_counter() - start >= seconds:
      break
  images = count * batch_size
  return images / (time.perf_counter() - start), count, images / (time.process_time() - cpu_start)


@contextlib.contextmanager
def _mocked(num_examples, as_dataset_fn=None):
  with tfds.testing.mock_data(num_examples=num_examples, as_dataset_fn=as_dataset_fn), mock.patch.object(
      tfds.core.DatasetBuilder, 'is_prepared', return_value=True
  ):
    yield


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seconds', type=float, default=20.0, help='timed seconds per pipeline')
  parser.add_argument('--only', default=None, help='comma-separated subset of the pipeline names')
  args = parser.parse_args()

  jpegs = _realistic_jpegs(JPEG_POOL)
  imagenet = _imagenet_as_dataset(jpegs)
  common = {'process_index': 0, 'process_count': 1, 'device_count': 1}
  pipelines = {  # name -> (mock examples, mock as_dataset_fn, global batch, iterator factory)
      'cifar10_train_plus': (5000, None, 64, lambda: ip.create_train_iterator(
          'cifar10', global_batch_size=64, seed=0, augment=True, **common)),
      'cifar10_eval': (5000, None, 500, lambda: ip.create_eval_iterator(
          'cifar10', 'test', global_batch_size=500, **common)),
      'imagenet_train': (1, imagenet, 256, lambda: ip.create_train_iterator(
          'imagenet2012', global_batch_size=256, seed=0, augment=True, **common)),
      'imagenet_eval': (1, imagenet, 256, lambda: ip.create_eval_iterator(
          'imagenet2012', 'validation', global_batch_size=256, **common)),
      'imagenet_eval_10crop': (1, imagenet, 64, lambda: ip.create_eval_iterator(
          'imagenet2012', 'validation', global_batch_size=64, ten_crop=True, **common)),
      'synthetic_224': (1, None, 256, lambda: ip.create_train_iterator(
          'synthetic', global_batch_size=256, seed=0, augment=False, **common)),
  }
  names = args.only.split(',') if args.only else list(pipelines)
  print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; '
        f'mean JPEG size {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB')
  print('| pipeline | global batch | batches timed | images/s | images per CPU-second |')
  print('|---|---|---|---|---|')
  for name in names:
    num_examples, as_dataset_fn, batch, factory = pipelines[name]
    with _mocked(num_examples, as_dataset_fn):
      rate, count, per_cpu_second = _measure(factory, batch, args.seconds)
    print(f'| {name} | {batch} | {count} | {rate:,.0f} | {per_cpu_second:,.0f} |', flush=True)


if __name__ == '__main__':
  main()
