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

from collections.abc import Iterator

import jax
import numpy as np

from densenet_jax.data import DATASET_NAMES, DatasetInfo, arrays, batching, folders, image_scan, imagenet
from densenet_jax.data import preprocessing as pp
from densenet_jax.data import sources
from densenet_jax.data.batching import check_batch_size

__all__ = ['DATASET_NAMES', 'DatasetInfo', 'check_batch_size', 'check_image_files', 'create_eval_iterator',
           'create_train_iterator', 'get_dataset_info']


def image_file_normalization(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) per channel on the 0-255 scale of an 8-bit image file: (pixel - mean) / std is what the eval
  pipeline feeds the model for an image of `dataset`.

  digits: a file's gray level 0..255 stands for the dataset's ink value 0..16 (value = level * 16 / 255), so the
  dataset's normalization is rescaled by 255 / 16.
  """
  _check_dataset(dataset, None, {})
  if dataset in ('imagenet2012', 'image_folder'):
    return tuple(255.0 * m for m in pp.IMAGENET_MEAN), tuple(255.0 * s for s in pp.IMAGENET_STD)
  recipe = arrays.RECIPES[dataset]
  if recipe.mean is None:
    raise ValueError(f'{dataset} images are generated, already normalized arrays: there are no image files of it.')
  scale = 255.0 / pp.DIGITS_MAX_VALUE if dataset == 'digits' else 1.0
  return tuple(m * scale for m in recipe.mean), tuple(s * scale for s in recipe.std)


def _check_dataset(dataset: str, image_size: int | None, synthetic_kwargs: dict) -> None:
  if dataset not in DATASET_NAMES:
    raise ValueError(f'Unknown dataset {dataset!r}; valid names: {", ".join(DATASET_NAMES)}.')
  if synthetic_kwargs and dataset != 'synthetic':
    raise TypeError(f'Arguments {sorted(synthetic_kwargs)} are only for dataset="synthetic", not {dataset!r}.')
  if image_size is not None and image_size < 1:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  recipe = arrays.RECIPES.get(dataset)
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



def check_image_files(
    dataset: str, splits, *, data_dir: str | None = None, process_index: int | None = None,
    process_count: int | None = None, progress: bool = False,
) -> dict | None:
  """Image folders: checks every file of `splits` by image_rule's rule before anything reads them; raises
  BadImageError listing the bad ones. Files found good are remembered (image_scan), so an unchanged folder is not
  read again. Returns what was done (None for the other datasets: TFDS data is validated when prepared).

  Every process must call it (multi-host: each checks its share of the files; see image_scan).
  """
  if dataset != 'image_folder':
    return None
  folder = sources.list_image_folder(data_dir)
  wanted = {split: folder.splits[split][0] for split in dict.fromkeys(splits) if split in folder.splits}
  return image_scan.check_splits(
      folder.root, wanted, progress=progress,
      process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count,
  )


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
  layout = batching.layout(global_batch_size, process_index, process_count, device_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  if dataset == 'imagenet2012':
    size = image_size or pp.IMAGENET_IMAGE_SIZE
    return imagenet.train_batches(data_dir, download, layout, seed, augment, start_step, size)
  if dataset == 'image_folder':
    return folders.train_batches(data_dir, layout, seed, augment, start_step, image_size or pp.IMAGENET_IMAGE_SIZE)
  lookup_args = (data_dir, download, synthetic_kwargs, image_size)
  return arrays.train_batches(dataset, layout, seed, augment, start_step, lookup_args)


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
  layout = batching.layout(global_batch_size, process_index, process_count, device_count)
  if ten_crop and dataset not in ('imagenet2012', 'image_folder'):
    raise ValueError(f'ten_crop is only defined for imagenet2012 and image_folder, not {dataset!r}.')
  size = image_size or pp.IMAGENET_IMAGE_SIZE
  if dataset == 'image_folder':
    return folders.eval_batches(data_dir, split, layout, size, ten_crop)
  info = get_dataset_info(dataset, data_dir=data_dir, image_size=image_size, **synthetic_kwargs)
  valid = ('train', *info.eval_splits)
  if split not in valid:
    raise ValueError(f'{dataset} has no split {split!r}; valid: {", ".join(valid)}.')
  if dataset == 'imagenet2012':
    return imagenet.eval_batches(data_dir, download, split, layout, size, ten_crop)
  return arrays.eval_batches(dataset, split, layout, (data_dir, download, synthetic_kwargs, image_size))

