"""Where the examples come from: TFDS builders, image folders, scikit-learn digits, synthetic pools.

Each loader returns examples in a fixed, documented order; the pipelines in `densenet_jax.input_pipeline`
decide who reads which index when.
"""

import dataclasses
import os

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax.data import DataError
from densenet_jax.io import storage

# Split sizes of the TFDS datasets (used before the data is prepared; afterwards the TFDS metadata counts).
TFDS_SPLIT_SIZES = {
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'svhn_cropped': {'train': 73_257, 'extra': 531_131, 'test': 26_032},
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
}
# SVHN validation (6,000 images, as in Sermanet et al. 2012 / Goodfellow et al. 2013): the first 400 images of
# each class in the order of TFDS's `train` split and the first 200 of each class in the order of `extra`.
SVHN_VALIDATION_PER_CLASS = {'train': 400, 'extra': 200}
SVHN_NUM_CLASSES = 10
# scikit-learn digits: 36 images of each digit (360) are the test split, the other 1,437 the training split.
# Per class, in class order, a legacy `np.random.RandomState(DIGITS_SPLIT_SEED)` (frozen across NumPy versions)
# permutes the indices of that class in `load_digits()` order; the first 36 go to test.
DIGITS_TEST_PER_CLASS = 36
DIGITS_SPLIT_SEED = 0
# Image folders: files with these extensions (case-insensitive) are images; other files are ignored.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Synthetic data: a pool of random images (made when the iterator is created) indexed by example % pool size.
SYNTHETIC_POOL_SIZE = 64
SYNTHETIC_DEFAULTS = {
    'num_classes': 1000,
    'image_shape': (224, 224, 3),
    'num_train_examples': 1_281_167,
    'num_eval_examples': 50_000,
}

_IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


@dataclasses.dataclass(frozen=True)
class Arrays:
  """A split held in memory: uint8 images [N, H, W, C] and int32 labels [N]."""

  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """An image folder's listing: per split, sorted file paths and their labels."""

  root: str
  class_names: tuple[str, ...]
  split_names: tuple[str, ...]  # every sub-folder of root
  splits: dict[str, tuple[np.ndarray, np.ndarray]]  # listed split -> (paths [N] str, labels [N] int32)


# ----------------------------------------------------------------------------------------------------------------
# TFDS


def tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  return tfds.builder(name, data_dir=data_dir)


def _not_prepared_message(name: str, builder: tfds.core.DatasetBuilder) -> str:
  root = os.fspath(builder.data_dir_root)
  message = (
      f'TFDS dataset {name!r} is not prepared in data_dir={root} (looked for {builder.data_dir}) and this '
      'pipeline does not download by default.\n'
  )
  if name == 'imagenet2012':
    manual_dir = os.path.join(root, 'downloads', 'manual')
    return message + (
        f'ImageNet cannot be downloaded automatically. Get {" and ".join(_IMAGENET_TARS)} from '
        f'https://image-net.org/download-images (registration required), put both tar files in {manual_dir}/ '
        f'and run (no internet needed):\n  tfds build imagenet2012 --data_dir={root} --manual_dir={manual_dir}\n'
        'or call the pipeline once with download=True. An extracted copy (train/CLASS/*.JPEG, val/CLASS/*.JPEG) '
        "can be used instead with dataset='image_folder'."
    )
  return message + (
      f'On a machine with internet access run:\n  tfds build {name} --data_dir={root}\n'
      f'(then copy {root}/{name} here if needed), or call the pipeline with download=True.'
  )


def prepared_builder(name: str, data_dir: str | None, download: bool) -> tfds.core.DatasetBuilder:
  """A TFDS builder whose data is on disk; raises (without touching the network) unless `download`."""
  builder = tfds_builder(name, data_dir)
  if builder.is_prepared():
    return builder
  if not download:
    raise FileNotFoundError(_not_prepared_message(name, builder))
  builder.download_and_prepare()
  return builder


def tfds_split_size(builder: tfds.core.DatasetBuilder, name: str, split: str) -> int:
  """Examples in a TFDS split: from the prepared metadata, else the known size."""
  if split in builder.info.splits:
    return builder.info.splits[split].num_examples
  return TFDS_SPLIT_SIZES[name][split]


def tfds_class_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
  return tuple(builder.info.features['label'].names)


def _as_arrays(builder: tfds.core.DatasetBuilder, split: str) -> Arrays:
  """Decodes a whole TFDS split into memory, in TFDS's stored order."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)), num_parallel_calls=tf.data.AUTOTUNE)
  chunks = list(ds.batch(4096).as_numpy_iterator())
  if not chunks:
    raise ValueError(f'TFDS split {builder.name}:{split} is empty.')
  return Arrays(np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]))


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
  """Boolean mask of the first `per_class` examples of each class, in order; raises if a class is short."""
  mask = np.zeros(len(labels), bool)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)[:per_class]
    if len(members) < per_class:
      raise ValueError(f'Class {c} has only {len(members)} examples, fewer than the {per_class} to hold out.')
    mask[members] = True
  return mask


def _svhn_validation(builder: tfds.core.DatasetBuilder) -> Arrays:
  """The 6,000 held-out SVHN images, read without decoding more of train/extra than needed."""
  images, labels = [], []
  for split, per_class in SVHN_VALIDATION_PER_CLASS.items():
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32))).batch(1024)
    counts = np.zeros(SVHN_NUM_CLASSES, int)
    for data, label in ds.as_numpy_iterator():
      for d, y in zip(data, label):
        if counts[y] < per_class:
          counts[y] += 1
          images.append(tf.io.decode_png(d, channels=3).numpy())
          labels.append(y)
      if (counts == per_class).all():
        break
    else:
      raise ValueError(f'SVHN {split!r} has fewer than {per_class} images of some class: {counts.tolist()}.')
  return Arrays(np.stack(images), np.array(labels, np.int32))


def load_tfds_arrays(name: str, split: str, data_dir: str | None, download: bool) -> Arrays:
  """cifar10/cifar100/svhn_cropped split in memory; SVHN 'train' is train + extra minus the validation images."""
  builder = prepared_builder(name, data_dir, download)
  if name != 'svhn_cropped' or split == 'test':
    return _as_arrays(builder, split)
  if split == 'validation':
    return _svhn_validation(builder)
  parts = []
  for part, per_class in SVHN_VALIDATION_PER_CLASS.items():
    arrays = _as_arrays(builder, part)
    keep = ~first_per_class(arrays.labels, per_class, SVHN_NUM_CLASSES)
    parts.append(Arrays(arrays.images[keep], arrays.labels[keep]))
  return Arrays(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


# ----------------------------------------------------------------------------------------------------------------
# scikit-learn digits


def digits_split_indices() -> dict[str, np.ndarray]:
  """The fixed stratified split of `sklearn.datasets.load_digits()`: sorted indices per split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  labels = datasets.load_digits().target
  rng = np.random.RandomState(DIGITS_SPLIT_SEED)
  test = []
  for c in range(10):
    members = np.flatnonzero(labels == c)
    test.append(members[rng.permutation(len(members))[:DIGITS_TEST_PER_CLASS]])
  test = np.sort(np.concatenate(test))
  return {'train': np.setdiff1d(np.arange(len(labels)), test), 'test': test}


def load_digits_arrays(split: str) -> Arrays:
  """Digits split: uint8 images [N, 8, 8, 1] with the raw values 0..16, int32 labels."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  index = digits_split_indices()[split]
  return Arrays(digits.images[index, :, :, None].astype(np.uint8), digits.target[index].astype(np.int32))


# ----------------------------------------------------------------------------------------------------------------
# Image folders


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
  return sorted(name for name in storage.scan(path)[0] if not name.startswith('.'))


def _images_under(path: str) -> list[str]:
  """The image files under `path`, in os.walk's order with sorted names (a folder's files, then its sub-folders)."""
  found = [name for name in storage.walk_files(path) if _is_image(name.rsplit('/', 1)[-1])]
  return [os.path.join(path, name) for name in sorted(found, key=storage.walk_order)]


def list_image_folder(root: str | None, only_split: str | None = None) -> ImageFolder:
  """Lists root/SPLIT/CLASS/**/*.{jpg,jpeg,png} (all splits, or only `only_split`).

  Classes are the sorted union of the class folder names of all splits, so labels agree between splits.
  """
  layout = "expected root/SPLIT/CLASS/image.jpg, e.g. root/train/cat/1.jpg and root/val/cat/2.png"
  if root is None:
    raise ValueError(f"dataset='image_folder' needs data_dir=<root of the image folder> ({layout}).")
  if not storage.isdir(root):
    raise FileNotFoundError(f'Image folder root {root!r} does not exist or is not a directory ({layout}).')
  split_names = _subdirs(root)
  if not split_names:
    raise DataError(f'Image folder {root!r} has no split folders ({layout}).')
  class_names = sorted({c for s in split_names for c in _subdirs(os.path.join(root, s))})
  label_of = {c: i for i, c in enumerate(class_names)}
  splits = {}
  for split in split_names if only_split is None else [s for s in split_names if s == only_split]:
    split_dir = os.path.join(root, split)
    loose = sorted(f for f in storage.scan(split_dir)[1] if _is_image(f))
    if loose:
      raise DataError(
          f'{split_dir} holds images directly ({loose[0]!r}, ...); images must be in class sub-folders ({layout}).'
      )
    paths, labels, empty = [], [], []
    for c in _subdirs(split_dir):
      images = _images_under(os.path.join(split_dir, c))
      if not images:
        empty.append(os.path.join(split_dir, c))
      paths.extend(images)
      labels.extend([label_of[c]] * len(images))
    if not paths:  # The error alone: a warning per empty class folder would only come before it.
      raise DataError(
          f'Split folder {split_dir} contains no images ({", ".join(IMAGE_EXTENSIONS)} files in class '
          f'sub-folders; {layout}). Put the images of this split in its class folders, or remove the folder.'
      )
    for class_dir in empty:
      logging.warning('Class folder %s has no images.', class_dir)
    splits[split] = (np.array(paths), np.array(labels, np.int32))
  return ImageFolder(root=root, class_names=tuple(class_names), split_names=tuple(split_names), splits=splits)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic


def synthetic_spec(image_size: int | None, **kwargs) -> dict:
  """The synthetic dataset's parameters: SYNTHETIC_DEFAULTS overridden by kwargs and image_size (H = W)."""
  unknown = set(kwargs) - set(SYNTHETIC_DEFAULTS)
  if unknown:
    raise TypeError(
        f'Unknown synthetic dataset argument(s) {sorted(unknown)}; valid: {sorted(SYNTHETIC_DEFAULTS)}.'
    )
  spec = {**SYNTHETIC_DEFAULTS, **kwargs}
  spec['image_shape'] = tuple(int(d) for d in spec['image_shape'])
  if image_size is not None:
    spec['image_shape'] = (image_size, image_size, spec['image_shape'][2])
  if len(spec['image_shape']) != 3 or min(spec['image_shape']) < 1:
    raise ValueError(f'Synthetic image_shape must be (H, W, C) with positive sizes, got {spec["image_shape"]}.')
  for key in ('num_classes', 'num_train_examples', 'num_eval_examples'):
    if int(spec[key]) < 1:
      raise ValueError(f'Synthetic {key} must be positive, got {spec[key]}.')
  return spec


def synthetic_pool(image_shape, seed: int) -> np.ndarray:
  """SYNTHETIC_POOL_SIZE float32 images, uniform in [-1, 1), already normalized (no work per batch but a copy)."""
  return tf.random.stateless_uniform((SYNTHETIC_POOL_SIZE, *image_shape), seed=[seed, 0], minval=-1.0).numpy()
