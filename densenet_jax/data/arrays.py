"""Datasets held as arrays (cifar10, cifar100, svhn_cropped, digits, synthetic): indexable, so every step's batch is
computed from the step alone.
"""

import dataclasses
import math
import tensorflow as tf

from densenet_jax.data import batching
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources

SYNTHETIC_POOL_SEEDS = {'train': 1, 'test': 2}


@dataclasses.dataclass(frozen=True)
class ArrayRecipe:
  """Normalization (on the stored scale) and "+"-style augmentation of a dataset held as arrays."""

  mean: tuple[float, ...] | None  # None: the stored images are float32 and already normalized
  std: tuple[float, ...] | None
  native_size: int | None
  pad: int = 0  # 0: the recipe has no augmentation
  flip: bool = False


RECIPES = {
    'cifar10': ArrayRecipe(pp.CIFAR10_MEAN, pp.CIFAR10_STD, 32, pp.CIFAR_PAD, flip=True),
    'cifar100': ArrayRecipe(pp.CIFAR100_MEAN, pp.CIFAR100_STD, 32, pp.CIFAR_PAD, flip=True),
    'svhn_cropped': ArrayRecipe(pp.SVHN_MEAN, pp.SVHN_STD, 32),
    'digits': ArrayRecipe(
        (pp.DIGITS_MEAN * pp.DIGITS_MAX_VALUE,), (pp.DIGITS_STD * pp.DIGITS_MAX_VALUE,), 8, pp.DIGITS_PAD
    ),
    'synthetic': ArrayRecipe(None, None, None),
}





# ----------------------------------------------------------------------------------------------------------------
# Indexable datasets held as arrays


def open_split(dataset, split, data_dir, download, synthetic_kwargs, image_size):
  """(num_examples, lookup(indices) -> (images, int32 labels), variables to keep alive)."""
  if dataset == 'synthetic':
    spec = sources.synthetic_spec(image_size, **synthetic_kwargs)
    num = spec['num_train_examples'] if split == 'train' else spec['num_eval_examples']
    pool = tf.Variable(sources.synthetic_pool(spec['image_shape'], SYNTHETIC_POOL_SEEDS[split]), trainable=False)
    label_key = tf.constant([SYNTHETIC_POOL_SEEDS[split], 0], tf.int64)

    def lookup(idx):
      labels = tf.random.experimental.index_shuffle(idx, label_key, tf.constant(num - 1, tf.int64))
      return tf.gather(pool, idx % sources.SYNTHETIC_POOL_SIZE), tf.cast(labels % spec['num_classes'], tf.int32)

    return num, lookup, (pool,)
  if dataset == 'digits':
    arrays = sources.load_digits_arrays(split)
  else:
    arrays = sources.load_tfds_arrays(dataset, split, data_dir, download)
  # Variables, not constants: a captured constant would be copied into the serialized tf.data graph (SVHN: 1.8 GB).
  images = tf.Variable(arrays.images, trainable=False)
  labels = tf.Variable(arrays.labels, trainable=False)
  return len(arrays.labels), lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)), (images, labels)


def train_batches(dataset, layout, seed, augment, start_step, lookup_args):
  recipe = RECIPES[dataset]
  if augment and not recipe.pad:
    raise ValueError(f'{dataset} has no data augmentation in the recipe; use augment=False.')
  num, lookup, keep_alive = open_split(dataset, 'train', *lookup_args)
  steps_per_epoch = batching.steps_per_epoch(num, layout.global_batch, f'{dataset} train')
  order_key, augment_key = batching.seed_key(seed, batching.ORDER_STREAM), batching.seed_key(seed, batching.AUGMENT_STREAM)
  own = slice(layout.index * layout.local_batch, (layout.index + 1) * layout.local_batch)

  def make_batch(step):
    positions = layout.global_positions(step % steps_per_epoch, tf.range(layout.local_batch, dtype=tf.int64))
    images, labels = lookup(batching.epoch_index(order_key, step // steps_per_epoch, positions, num))
    if augment:
      draws = tf.random.stateless_uniform(
          [layout.global_batch, 3], tf.random.experimental.stateless_fold_in(augment_key, step)
      )
      images = pp.random_pad_crop_flip(
          images, draws[own], pad=recipe.pad, flip=recipe.flip, mean=recipe.mean, std=recipe.std
      )
    elif recipe.mean is not None:
      images = pp.normalize(images, recipe.mean, recipe.std)
    return {'image': images, 'label': labels}

  ds = tf.data.Dataset.range(start_step, batching.INT64_MAX)
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return batching.numpy_batches(ds.prefetch(tf.data.AUTOTUNE), keep_alive)


def eval_batches(dataset, split, layout, lookup_args):
  recipe = RECIPES[dataset]
  num, lookup, keep_alive = open_split(dataset, split, *lookup_args)

  def make_batch(batch):
    positions = layout.global_positions(batch, tf.range(layout.local_batch, dtype=tf.int64))
    mask = positions < num
    images, labels = lookup(tf.minimum(positions, num - 1))
    if recipe.mean is not None:
      images = pp.normalize(images, recipe.mean, recipe.std)
    return {
        'image': tf.where(mask[:, None, None, None], images, 0.0),
        'label': tf.where(mask, labels, 0),
        'mask': mask,
    }

  ds = tf.data.Dataset.range(math.ceil(num / layout.global_batch))
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return batching.numpy_batches(ds.prefetch(tf.data.AUTOTUNE), keep_alive)
