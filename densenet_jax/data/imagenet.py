"""imagenet2012 from TFDS record files: streamed, each process reading its own contiguous slice.
"""

import itertools
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import batching
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources

IMAGENET_SHUFFLE_BUFFER = 10_000  # encoded JPEGs (~110 kB each) per host


# ----------------------------------------------------------------------------------------------------------------
# imagenet2012 from TFDS record files: streamed, each process reading its own contiguous slice


def tfds_stream(builder, split, shuffle_seed=None):
  """Records with the JPEG bytes undecoded, in TFDS order (or file-shuffled with `shuffle_seed`)."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
  )


def tfds_host_slice(builder, split, layout):
  """(examples in the split, this process's sub-split spec, its size)."""
  num = int(tfds_stream(builder, split).cardinality())
  if num < 0:
    num = builder.info.splits[split].num_examples
  start, end = layout.index * num // layout.count, (layout.index + 1) * num // layout.count
  return num, f'{split}[{start}:{end}]', end - start


def train_batches(data_dir, download, layout, seed, augment, start_step, image_size):
  builder = sources.prepared_builder('imagenet2012', data_dir, download)
  num, host_split, host_num = tfds_host_slice(builder, 'train', layout)
  steps_per_epoch = batching.steps_per_epoch(num, layout.global_batch, 'imagenet2012 train')
  augment_key = batching.seed_key(seed, batching.AUGMENT_STREAM)
  start_epoch, start_offset = divmod(start_step, steps_per_epoch)

  @tf.function  # traced once, not once per epoch's pipeline
  def make_example(step, j, data, label):
    if augment:
      key = batching.example_key(augment_key, step, layout.global_positions(0, j))
      image = pp.imagenet_train_image(data, key, image_size)
    else:
      image = pp.imagenet_eval_image(data, image_size)
    return {'image': image, 'label': tf.cast(label, tf.int32)}

  def epoch_batches(epoch, skip_steps):
    epoch_seed = int(np.random.SeedSequence([seed, epoch, layout.index]).generate_state(1)[0])
    ds = tfds_stream(builder, host_split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(min(IMAGENET_SHUFFLE_BUFFER, host_num), seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * layout.local_batch).enumerate()
    ds = ds.skip(skip_steps * layout.local_batch)  # before decoding: resuming only reads records
    ds = ds.map(
        lambda k, ex: make_example(
            epoch * steps_per_epoch + k // layout.local_batch, k % layout.local_batch, ex['image'], ex['label']
        ),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )
    return batching.numpy_batches(ds.batch(layout.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

  def all_epochs():
    for epoch in itertools.count(start_epoch):
      yield from epoch_batches(epoch, start_offset if epoch == start_epoch else 0)

  return all_epochs()


def eval_batches(data_dir, download, split, layout, image_size, ten_crop):
  builder = sources.prepared_builder('imagenet2012', data_dir, download)
  num, host_split, host_num = tfds_host_slice(builder, split, layout)
  num_batches = math.ceil(math.ceil(num / layout.count) / layout.local_batch)

  def make_example(example):
    image = pp.imagenet_eval_image(example['image'], image_size, ten_crop)
    return {'image': image, 'label': tf.cast(example['label'], tf.int32), 'mask': tf.constant(True)}

  shape = (pp.NUM_EVAL_CROPS,) if ten_crop else ()
  padding = {
      'image': tf.zeros(shape + (image_size, image_size, 3)), 'label': tf.constant(0), 'mask': tf.constant(False)
  }
  ds = tf.data.Dataset.from_tensors(padding).repeat(num_batches * layout.local_batch - host_num)
  if host_num:
    examples = tfds_stream(builder, host_split).take(host_num)
    ds = examples.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).concatenate(ds)
  return batching.numpy_batches(ds.batch(layout.local_batch).prefetch(tf.data.AUTOTUNE))
