"""Image files given by a user (not a dataset) -> the model's eval input, with the pipeline's eval preprocessing.

    spec = ImageSpec('imagenet2012', (224, 224, 3), mean, std)
    image = read_image('cat.jpg', spec)      # float32 (224, 224, 3), as evaluate.py feeds the model

ImageNet and image folders: the eval pipeline's own function (shorter side resized to 256 for 224, bicubic, center
crop, normalization). The small datasets (digits, CIFAR, SVHN) store arrays, not files; a file is read as follows:
decoded to the model's channels (color -> gray with the ITU-R 601 weights for digits; gray -> color by repeating),
resized to the model's input size if it is another size (averaging pixel areas when shrinking, bilinear when
enlarging), then normalized with the
dataset's mean and std on the 0-255 scale (pipeline.image_file_normalization). A digits file is a bright digit on a
dark background, like the dataset; its gray level 0..255 stands for the dataset's value 0..16.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf

from densenet_jax.data import image_rule
from densenet_jax.data import preprocessing as pp
from densenet_jax.io import storage

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')  # what TensorFlow decodes; GIF: the first frame
CENTER_CROP_DATASETS = ('imagenet2012', 'image_folder')


class UnreadableImageError(ValueError):
  """A file that is missing or cannot be decoded as an image; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  """What the model expects: the dataset whose eval preprocessing applies, (H, W, C), and normalization."""

  dataset: str
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]  # per channel, on the 0-255 scale of an 8-bit image
  std: tuple[float, ...]

  @property
  def resize(self) -> str:
    if self.dataset in CENTER_CROP_DATASETS:
      return f'shorter side to {pp.eval_resize_size(self.image_shape[0])} (bicubic), center crop'
    return 'to the input size if different: area averaging when shrinking, bilinear when enlarging'


def list_image_files(paths: list[str]) -> list[str]:
  """Files named directly (whatever their extension), and the image files under folders (recursively, sorted).
  Local or gs://."""
  files = []
  for path in paths:
    if storage.isdir(path):
      found = [os.path.join(path, name) for name in storage.walk_files(path)
               if name.lower().endswith(IMAGE_EXTENSIONS)]
      files.extend(sorted(found))
    else:
      files.append(path)
  return files


def _one_line(error: tf.errors.OpError) -> str:
  """The decoder's own words: without TF's '{{function_node ...}}' prefix, its '[Op:DecodeImage]' and the ' name: '
  that eager TensorFlow appends for the op's name, empty for the unnamed ops used here."""
  message = re.sub(r'\{\{[^}]*\}\}\s*', '', error.message)
  message = re.sub(r'\s*\[Op:\w+\]', '', message)
  message = re.sub(r'\s+name:\s*$', '', message)
  return ' '.join(message.split())


def _decode(data: tf.Tensor, channels: int) -> tf.Tensor:
  """uint8 or float32 [H, W, channels]."""
  if channels == 3:
    return pp.decode_image(data)
  if channels != 1:
    raise ValueError(f'Image files give 1 or 3 channels, the model takes {channels}.')
  image = tf.io.decode_image(data, expand_animations=False)
  if image.shape[-1] <= 2:  # gray, gray + alpha
    return image[..., :1]
  weights = tf.constant(pp.GRAYSCALE_WEIGHTS, tf.float32)
  return tf.reduce_sum(tf.cast(image[..., :3], tf.float32) * weights, axis=-1, keepdims=True)


def preprocess(data: tf.Tensor, spec: ImageSpec) -> tf.Tensor:
  """Encoded image bytes -> float32 [H, W, C], normalized: the model's eval input."""
  height, width, channels = spec.image_shape
  if spec.dataset in CENTER_CROP_DATASETS:
    if height != width:
      raise ValueError(f'ImageNet-style evaluation crops squares; the model input is {height}x{width}.')
    return pp.imagenet_eval_image(data, height)
  image = tf.cast(_decode(data, channels), tf.float32)
  if tuple(image.shape[:2]) != (height, width):
    shrink = image.shape[0] >= height and image.shape[1] >= width
    image = tf.image.resize(image, (height, width), method='area' if shrink else 'bilinear')
  return pp.normalize(image, spec.mean, spec.std)


def read_image(path: str, spec: ImageSpec) -> np.ndarray:
  """The model input for one image file; raises UnreadableImageError with a one-line reason."""
  if not storage.exists(path):
    raise UnreadableImageError(f'{path}: no such file')
  if storage.isdir(path):
    raise UnreadableImageError(f'{path}: a folder')
  try:
    data = tf.io.read_file(path)
    reason = image_rule.stream_problem(data.numpy())  # the rule training applies (image_rule)
    if reason is not None:
      raise UnreadableImageError(f'{path}: {reason}')
    return preprocess(data, spec).numpy()
  except tf.errors.OpError as error:
    raise UnreadableImageError(f'{path}: {_one_line(error)}') from None
