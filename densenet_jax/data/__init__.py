"""Datasets by name and what the model needs to know about them; TensorFlow-free.

The input pipelines themselves (TFDS + tf.data) are in `densenet_jax.data.pipeline`, built on `sources` (where
images come from) and `preprocessing` (what is done to them).
"""

import dataclasses

DATASET_NAMES = ('cifar10', 'cifar100', 'svhn_cropped', 'imagenet2012', 'image_folder', 'digits', 'synthetic')
# Datasets whose recipe has no "+" augmentation (the paper trains SVHN without it): augment=True is a mistake.
WITHOUT_AUGMENTATION = ('svhn_cropped', 'synthetic')


class DataError(ValueError):
  """Data on disk that cannot be used as it is (an image folder without images, a bad image file); the message
  names the folder or the files and what to do, in one paragraph, like a ConfigError."""


class BadImageError(DataError):
  """An image file that cannot be decoded; the message lists the files (bad files are fatal)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the model and the training loop need to know about a dataset."""

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) the model sees
  num_train_examples: int  # examples in the training split actually used
  eval_splits: dict[str, int]  # split name -> examples
  class_names: tuple[str, ...] | None = None
