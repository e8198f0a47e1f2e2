"""Image folders (DATA_DIR/SPLIT/CLASS/*.jpg): indexable lists of files, decoded per example.
"""

import math

import numpy as np
import tensorflow as tf

from densenet_jax.data import batching, image_rule
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources

# ----------------------------------------------------------------------------------------------------------------
# Image folders: indexable lists of files, decoded per example


def split_files(data_dir, split):
  folder = sources.list_image_folder(data_dir, only_split=split)
  if split not in folder.splits:
    raise FileNotFoundError(
        f'Image folder {data_dir!r} has no {split!r} split folder (found: {", ".join(folder.split_names)}).'
    )
  return folder.splits[split]


def train_batches(data_dir, layout, seed, augment, start_step, image_size):
  paths, labels = split_files(data_dir, 'train')
  num = len(paths)
  steps_per_epoch = batching.steps_per_epoch(num, layout.global_batch, f'image folder {data_dir} train')
  order_key, augment_key = batching.seed_key(seed, batching.ORDER_STREAM), batching.seed_key(seed, batching.AUGMENT_STREAM)
  paths_var, labels_var = tf.Variable(paths, trainable=False), tf.Variable(labels, trainable=False)

  def indices(step, j):
    positions = layout.global_positions(step % steps_per_epoch, j)
    return batching.epoch_index(order_key, step // steps_per_epoch, positions, num)

  def make_example(k):
    step, j = k // layout.local_batch, k % layout.local_batch
    idx = indices(step, j)
    data = image_rule.checked(tf.io.read_file(tf.gather(paths_var, idx)))
    if augment:
      key = batching.example_key(augment_key, step, layout.global_positions(0, j))
      image = pp.imagenet_train_image(data, key, image_size)
    else:
      image = pp.imagenet_eval_image(data, image_size)
    return {'image': image, 'label': tf.gather(labels_var, idx)}

  def locate_bad_files(n):
    step = tf.constant(start_step + n, tf.int64)
    return image_rule.bad_files(paths[indices(step, tf.range(layout.local_batch, dtype=tf.int64)).numpy()])

  ds = tf.data.Dataset.range(start_step * layout.local_batch, batching.INT64_MAX)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(layout.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return batching.numpy_batches(ds, (paths_var, labels_var), locate_bad_files)


def eval_batches(data_dir, split, layout, image_size, ten_crop):
  paths, labels = split_files(data_dir, split)
  num = len(paths)
  paths_var, labels_var = tf.Variable(paths, trainable=False), tf.Variable(labels, trainable=False)

  def make_example(k):
    positions = layout.global_positions(k // layout.local_batch, k % layout.local_batch)
    idx = tf.minimum(positions, num - 1)
    data = image_rule.checked(tf.io.read_file(tf.gather(paths_var, idx)))
    image = pp.imagenet_eval_image(data, image_size, ten_crop)
    return batching.padded_eval_example(image, tf.gather(labels_var, idx), positions < num)

  def locate_bad_files(n):
    positions = layout.global_positions(n, np.arange(layout.local_batch))
    return image_rule.bad_files(paths[np.minimum(positions, num - 1)])

  num_batches = math.ceil(num / layout.global_batch)
  ds = tf.data.Dataset.range(num_batches * layout.local_batch)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(layout.local_batch).prefetch(tf.data.AUTOTUNE)
  return batching.numpy_batches(ds, (paths_var, labels_var), locate_bad_files)
