"""Input pipelines: datasets -> this host's share of each global batch, as numpy arrays.

Train batches are {'image': float32 [B/P, H, W, C], 'label': int32 [B/P]} (P = process count); eval batches add
'mask' (bool, False on padding). All TensorFlow / TFDS use of the project lives here and in `densenet_jax.data`;
TensorFlow is kept off the accelerators.

Order and randomness (see docs/data.md):
- Indexable datasets (cifar10, cifar100, svhn_cropped, digits, synthetic, image_folder): epoch e visits the
  training split in the pseudo-random permutation `index_shuffle(position, key(seed, e))`; global batch s holds
  positions [s*B, (s+1)*B) of its epoch and process i takes the i-th contiguous slice of it. Batches therefore
  do not depend on the number of processes, and step s is computed from s alone (resuming costs nothing).
- imagenet2012 (TFDS record files, no random access): process i reads examples [i*N/P, (i+1)*N/P) of the split,
  file order and a shuffle buffer seeded from (seed, epoch, i); resuming skips records before decoding.
- Augmentation draws come from stateless ops keyed by (seed, global step, position in the global batch).
"""

import dataclasses
import itertools
import math
from typing import Callable, Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import DATASET_NAMES, BadImageError, DatasetInfo
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources

IMAGENET_SHUFFLE_BUFFER = 10_000  # encoded JPEGs (~110 kB each) per host
# Independent random streams derived from the user's seed.
_ORDER_STREAM = 1
_AUGMENT_STREAM = 2
_SYNTHETIC_POOL_SEEDS = {'train': 1, 'test': 2}
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class _ArrayRecipe:
  """Normalization (on the stored scale) and "+"-style augmentation of a dataset held as arrays."""

  mean: tuple[float, ...] | None  # None: the stored images are float32 and already normalized
  std: tuple[float, ...] | None
  native_size: int | None
  pad: int = 0  # 0: the recipe has no augmentation
  flip: bool = False


_ARRAY_RECIPES = {
    'cifar10': _ArrayRecipe(pp.CIFAR10_MEAN, pp.CIFAR10_STD, 32, pp.CIFAR_PAD, flip=True),
    'cifar100': _ArrayRecipe(pp.CIFAR100_MEAN, pp.CIFAR100_STD, 32, pp.CIFAR_PAD, flip=True),
    'svhn_cropped': _ArrayRecipe(pp.SVHN_MEAN, pp.SVHN_STD, 32),
    'digits': _ArrayRecipe(
        (pp.DIGITS_MEAN * pp.DIGITS_MAX_VALUE,), (pp.DIGITS_STD * pp.DIGITS_MAX_VALUE,), 8, pp.DIGITS_PAD
    ),
    'synthetic': _ArrayRecipe(None, None, None),
}


def image_file_normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel on the 0-255 scale of an 8-bit image file: (pixel - mean) / std is what the eval
  pipeline feeds the model for an image of `dataset`.

  digits: a file's gray level 0..255 stands for the dataset's ink value 0..16 (value = level * 16 / 255), so the
  dataset's normalization is rescaled by 255 / 16.
  """
  _check_dataset(dataset, None, {})
  if dataset in ('imagenet2012', 'image_folder'):
    return tuple(255.0 * m for m in pp.IMAGENET_MEAN), tuple(255.0 * s for s in pp.IMAGENET_STD)
  recipe = _ARRAY_RECIPES[dataset]
  if recipe.mean is None:
    raise ValueError(f'{dataset} images are generated, already normalized arrays: there are no image files of it.')
  scale = 255.0 / pp.DIGITS_MAX_VALUE if dataset == 'digits' else 1.0
  return tuple(m * scale for m in recipe.mean), tuple(s * scale for s in recipe.std)


def check_batch_size(global_batch_size: int, device_count: int) -> None:
  """Raises a ValueError unless the global batch splits evenly over `device_count` devices."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if global_batch_size % device_count:
    lower = global_batch_size // device_count * device_count
    suggestions = ' or '.join(str(b) for b in (lower, lower + device_count) if b > 0)
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by the {device_count} devices: every device '
        f'must get the same number of examples. Use a multiple of {device_count} (e.g. {suggestions}).'
    )


def _check_dataset(dataset: str, image_size: int | None, synthetic_kwargs: dict) -> None:
  if dataset not in DATASET_NAMES:
    raise ValueError(f'Unknown dataset {dataset!r}; valid names: {", ".join(DATASET_NAMES)}.')
  if synthetic_kwargs and dataset != 'synthetic':
    raise TypeError(f'Arguments {sorted(synthetic_kwargs)} are only for dataset="synthetic", not {dataset!r}.')
  if image_size is not None and image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  recipe = _ARRAY_RECIPES.get(dataset)
  if recipe and recipe.native_size and image_size not in (None, recipe.native_size):
    raise ValueError(
        f'{dataset} images are {recipe.native_size}x{recipe.native_size}; image_size must be None or '
        f'{recipe.native_size}, got {image_size}.'
    )


def get_dataset_info(
    dataset: str, *, data_dir: str | None = None, image_size: int | None = None, **synthetic_kwargs
) -> DatasetInfo:
  """Shapes, class count and split sizes; reads no image data (image folders are listed).

  TFDS split sizes come from the prepared dataset's metadata, or the published sizes if not prepared yet.
  `synthetic_kwargs` (dataset='synthetic' only): num_classes, image_shape, num_train_examples, num_eval_examples.
  """
  _check_dataset(dataset, image_size, synthetic_kwargs)
  if dataset in ('cifar10', 'cifar100'):
    builder = sources.tfds_builder(dataset, data_dir)
    names = sources.tfds_class_names(builder)
    return DatasetInfo(
        dataset, len(names), (32, 32, 3), sources.tfds_split_size(builder, dataset, 'train'),
        {'test': sources.tfds_split_size(builder, dataset, 'test')}, names,
    )
  if dataset == 'svhn_cropped':
    builder = sources.tfds_builder(dataset, data_dir)
    size = lambda split: sources.tfds_split_size(builder, dataset, split)
    num_validation = sum(sources.SVHN_VALIDATION_PER_CLASS.values()) * sources.SVHN_NUM_CLASSES
    return DatasetInfo(
        dataset, sources.SVHN_NUM_CLASSES, (32, 32, 3), size('train') + size('extra') - num_validation,
        {'validation': num_validation, 'test': size('test')}, tuple(str(i) for i in range(10)),
    )
  if dataset == 'imagenet2012':
    builder = sources.tfds_builder(dataset, data_dir)
    size = image_size or pp.IMAGENET_IMAGE_SIZE
    names = sources.tfds_class_names(builder)
    return DatasetInfo(
        dataset, len(names), (size, size, 3), sources.tfds_split_size(builder, dataset, 'train'),
        {'validation': sources.tfds_split_size(builder, dataset, 'validation')}, names,
    )
  if dataset == 'image_folder':
    folder = sources.list_image_folder(data_dir)
    size = image_size or pp.IMAGENET_IMAGE_SIZE
    counts = {split: len(paths) for split, (paths, _) in folder.splits.items()}
    return DatasetInfo(
        dataset, len(folder.class_names), (size, size, 3), counts.pop('train', 0), counts, folder.class_names
    )
  if dataset == 'digits':
    index = sources.digits_split_indices()
    return DatasetInfo(
        dataset, 10, (8, 8, 1), len(index['train']), {'test': len(index['test'])}, tuple(str(i) for i in range(10))
    )
  spec = sources.synthetic_spec(image_size, **synthetic_kwargs)
  return DatasetInfo(
      dataset, spec['num_classes'], spec['image_shape'], spec['num_train_examples'],
      {'test': spec['num_eval_examples']},
  )


# ----------------------------------------------------------------------------------------------------------------
# Who reads what


@dataclasses.dataclass(frozen=True)
class _Layout:
  """This process's place in the global batch."""

  index: int
  count: int
  global_batch: int

  @property
  def local_batch(self) -> int:
    return self.global_batch // self.count

  def global_positions(self, batch, j):
    """Positions (in the epoch / split order) of elements `j` of this process's share of global batch `batch`."""
    return batch * self.global_batch + self.index * self.local_batch + j


def _layout(global_batch_size, process_index, process_count, device_count) -> _Layout:
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  check_batch_size(global_batch_size, jax.device_count() if device_count is None else device_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {index} and {count}.')
  if global_batch_size % count:
    raise ValueError(
        f'global_batch_size={global_batch_size} is not divisible by process_count={count}: each process loads '
        'the same number of examples per batch.'
    )
  return _Layout(index, count, global_batch_size)


def _steps_per_epoch(num_examples: int, global_batch_size: int, what: str) -> int:
  if num_examples < global_batch_size:
    raise ValueError(f'{what} has {num_examples} examples, fewer than global_batch_size={global_batch_size}.')
  return num_examples // global_batch_size


def _seed_key(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, stream], tf.int64)


def _epoch_index(order_key, epoch, position, num_examples):
  """Example index at `position` of epoch `epoch`'s permutation of [0, num_examples)."""
  return tf.random.experimental.index_shuffle(
      position, tf.random.experimental.stateless_fold_in(order_key, epoch), tf.constant(num_examples - 1, tf.int64)
  )


def _example_key(augment_key, step, position_in_batch):
  return tf.random.experimental.stateless_fold_in(
      tf.random.experimental.stateless_fold_in(augment_key, step), position_in_batch
  )


def _numpy_batches(ds: tf.data.Dataset, keep_alive=(), locate_bad_files: Callable | None = None) -> Iterator:
  """Yields `ds` as numpy; a decoding failure becomes a ValueError naming the files (bad files are fatal)."""
  # `keep_alive` stays referenced by this generator's frame: the variables the dataset's functions read must
  # outlive it.
  batches = ds.as_numpy_iterator()
  for n in itertools.count():
    try:
      batch = next(batches)
    except StopIteration:
      return
    except tf.errors.OpError as e:
      bad = locate_bad_files(n) if locate_bad_files else []
      if not bad:
        raise
      listing = '\n'.join(f'  {path}: {error}' for path, error in bad)
      raise BadImageError(
          f'Could not decode {len(bad)} image file(s):\n{listing}\nBad files are fatal (skipping them would change '
          'the batches and the evaluation set): delete or re-encode them.'
      ) from e
    yield batch


# ----------------------------------------------------------------------------------------------------------------
# Indexable datasets held as arrays


def _array_lookup(dataset, split, data_dir, download, synthetic_kwargs, image_size):
  """(num_examples, lookup(indices) -> (images, int32 labels), variables to keep alive)."""
  if dataset == 'synthetic':
    spec = sources.synthetic_spec(image_size, **synthetic_kwargs)
    num = spec['num_train_examples'] if split == 'train' else spec['num_eval_examples']
    pool = tf.Variable(sources.synthetic_pool(spec['image_shape'], _SYNTHETIC_POOL_SEEDS[split]), trainable=False)
    label_key = tf.constant([_SYNTHETIC_POOL_SEEDS[split], 0], tf.int64)

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


def _array_train(dataset, layout, seed, augment, start_step, lookup_args):
  recipe = _ARRAY_RECIPES[dataset]
  if augment and not recipe.pad:
    raise ValueError(f'{dataset} has no data augmentation in the recipe; use augment=False.')
  num, lookup, keep_alive = _array_lookup(dataset, 'train', *lookup_args)
  steps_per_epoch = _steps_per_epoch(num, layout.global_batch, f'{dataset} train')
  order_key, augment_key = _seed_key(seed, _ORDER_STREAM), _seed_key(seed, _AUGMENT_STREAM)
  own = slice(layout.index * layout.local_batch, (layout.index + 1) * layout.local_batch)

  def make_batch(step):
    positions = layout.global_positions(step % steps_per_epoch, tf.range(layout.local_batch, dtype=tf.int64))
    images, labels = lookup(_epoch_index(order_key, step // steps_per_epoch, positions, num))
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

  ds = tf.data.Dataset.range(start_step, _INT64_MAX)
  ds = ds.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return _numpy_batches(ds.prefetch(tf.data.AUTOTUNE), keep_alive)


def _array_eval(dataset, split, layout, lookup_args):
  recipe = _ARRAY_RECIPES[dataset]
  num, lookup, keep_alive = _array_lookup(dataset, split, *lookup_args)

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
  return _numpy_batches(ds.prefetch(tf.data.AUTOTUNE), keep_alive)


# ----------------------------------------------------------------------------------------------------------------
# Image folders: indexable lists of files, decoded per example


def _folder_split(data_dir, split):
  folder = sources.list_image_folder(data_dir, only_split=split)
  if split not in folder.splits:
    raise FileNotFoundError(
        f'Image folder {data_dir!r} has no {split!r} split folder (found: {", ".join(folder.split_names)}).'
    )
  return folder.splits[split]


def _folder_train(data_dir, layout, seed, augment, start_step, image_size):
  paths, labels = _folder_split(data_dir, 'train')
  num = len(paths)
  steps_per_epoch = _steps_per_epoch(num, layout.global_batch, f'image folder {data_dir} train')
  order_key, augment_key = _seed_key(seed, _ORDER_STREAM), _seed_key(seed, _AUGMENT_STREAM)
  paths_var, labels_var = tf.Variable(paths, trainable=False), tf.Variable(labels, trainable=False)

  def indices(step, j):
    positions = layout.global_positions(step % steps_per_epoch, j)
    return _epoch_index(order_key, step // steps_per_epoch, positions, num)

  def make_example(k):
    step, j = k // layout.local_batch, k % layout.local_batch
    idx = indices(step, j)
    data = tf.io.read_file(tf.gather(paths_var, idx))
    if augment:
      key = _example_key(augment_key, step, layout.global_positions(0, j))
      image = pp.imagenet_train_image(data, key, image_size)
    else:
      image = pp.imagenet_eval_image(data, image_size)
    return {'image': image, 'label': tf.gather(labels_var, idx)}

  def locate_bad_files(n):
    step = tf.constant(start_step + n, tf.int64)
    return sources.find_undecodable(paths[indices(step, tf.range(layout.local_batch, dtype=tf.int64)).numpy()])

  ds = tf.data.Dataset.range(start_step * layout.local_batch, _INT64_MAX)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(layout.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds, (paths_var, labels_var), locate_bad_files)


def _padded_eval_example(image, label, valid):
  return {'image': tf.where(valid, image, tf.zeros_like(image)), 'label': tf.where(valid, label, 0), 'mask': valid}


def _folder_eval(data_dir, split, layout, image_size, ten_crop):
  paths, labels = _folder_split(data_dir, split)
  num = len(paths)
  paths_var, labels_var = tf.Variable(paths, trainable=False), tf.Variable(labels, trainable=False)

  def make_example(k):
    positions = layout.global_positions(k // layout.local_batch, k % layout.local_batch)
    idx = tf.minimum(positions, num - 1)
    image = pp.imagenet_eval_image(tf.io.read_file(tf.gather(paths_var, idx)), image_size, ten_crop)
    return _padded_eval_example(image, tf.gather(labels_var, idx), positions < num)

  def locate_bad_files(n):
    positions = layout.global_positions(n, np.arange(layout.local_batch))
    return sources.find_undecodable(paths[np.minimum(positions, num - 1)])

  num_batches = math.ceil(num / layout.global_batch)
  ds = tf.data.Dataset.range(num_batches * layout.local_batch)
  ds = ds.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(layout.local_batch).prefetch(tf.data.AUTOTUNE)
  return _numpy_batches(ds, (paths_var, labels_var), locate_bad_files)


# ----------------------------------------------------------------------------------------------------------------
# imagenet2012 from TFDS record files: streamed, each process reading its own contiguous slice


def _tfds_stream(builder, split, shuffle_seed=None):
  """Records with the JPEG bytes undecoded, in TFDS order (or file-shuffled with `shuffle_seed`)."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  return builder.as_dataset(
      split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
      decoders={'image': tfds.decode.SkipDecoding()},
  )


def _tfds_host_slice(builder, split, layout):
  """(examples in the split, this process's sub-split spec, its size)."""
  num = int(_tfds_stream(builder, split).cardinality())
  if num < 0:
    num = builder.info.splits[split].num_examples
  start, end = layout.index * num // layout.count, (layout.index + 1) * num // layout.count
  return num, f'{split}[{start}:{end}]', end - start


def _imagenet_train(data_dir, download, layout, seed, augment, start_step, image_size):
  builder = sources.prepared_builder('imagenet2012', data_dir, download)
  num, host_split, host_num = _tfds_host_slice(builder, 'train', layout)
  steps_per_epoch = _steps_per_epoch(num, layout.global_batch, 'imagenet2012 train')
  augment_key = _seed_key(seed, _AUGMENT_STREAM)
  start_epoch, start_offset = divmod(start_step, steps_per_epoch)

  @tf.function  # traced once, not once per epoch's pipeline
  def make_example(step, j, data, label):
    if augment:
      key = _example_key(augment_key, step, layout.global_positions(0, j))
      image = pp.imagenet_train_image(data, key, image_size)
    else:
      image = pp.imagenet_eval_image(data, image_size)
    return {'image': image, 'label': tf.cast(label, tf.int32)}

  def epoch_batches(epoch, skip_steps):
    epoch_seed = int(np.random.SeedSequence([seed, epoch, layout.index]).generate_state(1)[0])
    ds = _tfds_stream(builder, host_split, shuffle_seed=epoch_seed)
    ds = ds.shuffle(min(IMAGENET_SHUFFLE_BUFFER, host_num), seed=epoch_seed, reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * layout.local_batch).enumerate()
    ds = ds.skip(skip_steps * layout.local_batch)  # before decoding: resuming only reads records
    ds = ds.map(
        lambda k, ex: make_example(
            epoch * steps_per_epoch + k // layout.local_batch, k % layout.local_batch, ex['image'], ex['label']
        ),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
    )
    return _numpy_batches(ds.batch(layout.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))

  def all_epochs():
    for epoch in itertools.count(start_epoch):
      yield from epoch_batches(epoch, start_offset if epoch == start_epoch else 0)

  return all_epochs()


def _imagenet_eval(data_dir, download, split, layout, image_size, ten_crop):
  builder = sources.prepared_builder('imagenet2012', data_dir, download)
  num, host_split, host_num = _tfds_host_slice(builder, split, layout)
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
    examples = _tfds_stream(builder, host_split).take(host_num)
    ds = examples.map(make_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).concatenate(ds)
  return _numpy_batches(ds.batch(layout.local_batch).prefetch(tf.data.AUTOTUNE))


# ----------------------------------------------------------------------------------------------------------------
# Public entry points


def create_train_iterator(
    dataset: str,
    *,
    global_batch_size: int,
    seed: int,
    augment: bool,
    data_dir: str | None = None,
    image_size: int | None = None,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
    download: bool = False,
    **synthetic_kwargs,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's share of the training batches.

  Epoch e is a permutation of the training split determined by (seed, e) (imagenet2012: and the process layout);
  steps_per_epoch = num_train_examples // global_batch_size, the remainder of each epoch is dropped. Batch s of
  an iterator created with start_step=s0 equals batch s0 + s of one created with start_step=0.

  Args:
    dataset: one of DATASET_NAMES.
    global_batch_size: examples per step over all processes; divisible by the device and process counts.
    seed: seeds the example order and the augmentation.
    augment: the dataset's augmentation ("+" for CIFAR, translation for digits, the fb.resnet.torch recipe for
      imagenet2012 / image_folder; svhn_cropped and synthetic have none and raise if asked).
    data_dir: TFDS data directory (None: TFDS default), or the root of an image folder.
    image_size: crop size for imagenet2012 / image_folder (default 224), H = W for synthetic.
    start_step: global step to resume from.
    process_index, process_count, device_count: default to jax.process_index(), process_count(), device_count().
    download: let TFDS download and prepare a missing dataset (needs internet; imagenet2012 needs the manual tar
      files). By default a missing dataset raises FileNotFoundError saying what to do.
    **synthetic_kwargs: dataset='synthetic' only; see get_dataset_info.
  """
  _check_dataset(dataset, image_size, synthetic_kwargs)
  layout = _layout(global_batch_size, process_index, process_count, device_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if dataset == 'imagenet2012':
    size = image_size or pp.IMAGENET_IMAGE_SIZE
    return _imagenet_train(data_dir, download, layout, seed, augment, start_step, size)
  if dataset == 'image_folder':
    return _folder_train(data_dir, layout, seed, augment, start_step, image_size or pp.IMAGENET_IMAGE_SIZE)
  lookup_args = (data_dir, download, synthetic_kwargs, image_size)
  return _array_train(dataset, layout, seed, augment, start_step, lookup_args)


def create_eval_iterator(
    dataset: str,
    split: str,
    *,
    global_batch_size: int,
    data_dir: str | None = None,
    image_size: int | None = None,
    ten_crop: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
    download: bool = False,
    **synthetic_kwargs,
) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` (a key of DatasetInfo.eval_splits, or 'train'), without augmentation.

  Every example is seen exactly once over all processes; the last batches are padded with mask=False examples
  (zero image, label 0) so that every process yields the same number of batches. With ten_crop=True
  (imagenet2012 / image_folder) 'image' is [B, 10, H, W, C]. Other arguments as in create_train_iterator.
  """
  _check_dataset(dataset, image_size, synthetic_kwargs)
  layout = _layout(global_batch_size, process_index, process_count, device_count)
  if ten_crop and dataset not in ('imagenet2012', 'image_folder'):
    raise ValueError(f'ten_crop is only defined for imagenet2012 and image_folder, not {dataset!r}.')
  size = image_size or pp.IMAGENET_IMAGE_SIZE
  if dataset == 'image_folder':
    return _folder_eval(data_dir, split, layout, size, ten_crop)
  info = get_dataset_info(dataset, data_dir=data_dir, image_size=image_size, **synthetic_kwargs)
  valid = ('train', *info.eval_splits)
  if split not in valid:
    raise ValueError(f'{dataset} has no split {split!r}; valid: {", ".join(valid)}.')
  if dataset == 'imagenet2012':
    return _imagenet_eval(data_dir, download, split, layout, size, ten_crop)
  return _array_eval(dataset, split, layout, (data_dir, download, synthetic_kwargs, image_size))
