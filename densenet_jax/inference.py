"""Class predictions for image files from a trained DenseNet (predict.py).

    predictor = load_predictor('workdirs/quickstart')     # a workdir, a checkpoints/<step> dir or converted weights
    results, errors = predict_files(predictor, ['digit.png', 'photos/'], top_k=5)
    results[0].top                                        # [(class index, class name, probability), ...]

The model, its input shape, the preprocessing and the class names come from what the checkpoint records: the
workdir's config.json, or for converted 1000-class weights the paper's ImageNet evaluation. Images go through the
eval pipeline's preprocessing (data/image_files.py), so a file of the evaluation set gets the prediction
evaluate.py computes for it.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax import model as model_lib
from densenet_jax.data import image_files, pipeline
from densenet_jax.io import loading, storage

IMAGENET_NAMES_FILE = 'imagenet_class_names.txt'  # torchvision's readable names, in sorted-synset order
CIFAR100_NAMES_FILE = 'cifar100_class_names.txt'  # the fine labels, in the dataset's (alphabetical) order
CIFAR10_NAMES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
DEFAULT_BATCH_SIZE = 32


def read_names_file(name: str) -> tuple[str, ...]:
  """One class name per line, from a file shipped in densenet_jax/data/."""
  text = importlib.resources.files('densenet_jax.data').joinpath(name).read_text(encoding='utf-8')
  return tuple(line.strip() for line in text.splitlines() if line.strip())


def _indices(num_classes: int) -> tuple[str, ...]:
  return tuple(str(i) for i in range(num_classes))


def class_names(config: Any, num_classes: int) -> tuple[str, ...]:
  """Readable names of the classes of the dataset `config` trained on; class indices where none are known."""
  dataset, names = config.dataset, None
  if dataset == 'imagenet2012':
    names = read_names_file(IMAGENET_NAMES_FILE)
  elif dataset in ('cifar10', 'cifar100'):
    # Prepared TFDS data records the names; without it TFDS only knows indices: use the shipped copy.
    shipped = CIFAR10_NAMES if dataset == 'cifar10' else read_names_file(CIFAR100_NAMES_FILE)
    try:
      names = pipeline.get_dataset_info(dataset, data_dir=config.data_dir).class_names
    except Exception as error:  # pylint: disable=broad-except  # TFDS metadata unreadable: names are cosmetic
      logging.info('No TFDS metadata for %s (%s); using the shipped class names.', dataset, error)
    if names is None or tuple(names) == _indices(len(shipped)):
      names = shipped
  elif dataset != 'synthetic':
    try:
      names = pipeline.get_dataset_info(dataset, data_dir=config.data_dir, image_size=config.image_size).class_names
    except (FileNotFoundError, OSError, ValueError) as error:  # an image folder moved or deleted since training
      logging.warning('Class names of %s unavailable (%s); printing class indices.', dataset, error)
  if names is None or len(names) != num_classes:
    return _indices(num_classes)
  return tuple(names)


def image_spec(config: Any, model: model_lib.DenseNet) -> image_files.ImageSpec:
  """The eval input of `config`'s dataset for `model`: shape and normalization."""
  if config.dataset in image_files.CENTER_CROP_DATASETS:
    size = config.image_size or image_files.pp.IMAGENET_IMAGE_SIZE
    shape = (size, size, model.input_channels)
  else:
    shape = pipeline.get_dataset_info(config.dataset, data_dir=config.data_dir,
                                      image_size=config.image_size).image_shape
  mean, std = pipeline.image_file_normalization(config.dataset)
  return image_files.ImageSpec(config.dataset, tuple(shape), tuple(mean), tuple(std))


@dataclasses.dataclass(frozen=True)
class Predictor:
  """A model with its weights, its eval input (spec) and its class names."""

  model: model_lib.DenseNet
  variables: Any
  spec: image_files.ImageSpec
  class_names: tuple[str, ...]

  @functools.cached_property
  def _apply(self) -> Callable:
    return jax.jit(self.model.apply)

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Float32 logits of a batch of preprocessed images (batch, H, W, C)."""
    return np.asarray(self._apply(self.variables, jnp.asarray(images, jnp.float32)))


def load_predictor(path: str) -> Predictor:
  """The Predictor of a training workdir, one of its checkpoints/<step> directories, or converted weights."""
  model, variables = loading.load_model(path)
  config = loading.run_config(path)
  variables = jax.tree.map(jnp.asarray, variables)
  return Predictor(model, variables, image_spec(config, model), class_names(config, model.num_classes))


@dataclasses.dataclass(frozen=True)
class Prediction:
  file: str
  top: list[tuple[int, str, float]]  # (class index, class name, probability), most probable first

  def to_json(self) -> dict[str, Any]:
    return {'file': self.file,
            'top': [{'class': c, 'name': name, 'probability': p} for c, name, p in self.top]}


def top_k(logits: np.ndarray, k: int, names: Sequence[str]) -> list[list[tuple[int, str, float]]]:
  """Per row of logits: the k most probable classes (ties: the lower index first) with softmax probabilities."""
  logits = np.asarray(logits, np.float64)
  probabilities = np.exp(logits - logits.max(axis=-1, keepdims=True))
  probabilities /= probabilities.sum(axis=-1, keepdims=True)
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [[(int(c), names[c], float(p[c])) for c in row] for row, p in zip(order, probabilities)]


def predict_arrays(predictor: Predictor, images: np.ndarray, *, top_k_classes: int = 5,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> list[list[tuple[int, str, float]]]:
  """top_k of preprocessed images, computed `batch_size` at a time (the last batch padded: one compilation)."""
  results = []
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    size = batch_size if len(images) > batch_size else len(chunk)  # one batch shape per call
    padded = np.concatenate([chunk, np.zeros((size - len(chunk), *chunk.shape[1:]), np.float32)])
    logits = predictor.logits(padded)[:len(chunk)]
    results.extend(top_k(logits, top_k_classes, predictor.class_names))
  return results


def predict_files(
    predictor: Predictor, paths: Sequence[str], *, top_k_classes: int = 5, batch_size: int = DEFAULT_BATCH_SIZE,
    on_error: Callable[[str], None] | None = None,
) -> tuple[list[Prediction], list[str]]:
  """Predictions for image files and the image files under folders; (predictions in file order, errors).

  A file that is missing or cannot be decoded is reported (`on_error` with one line, and in the returned errors)
  and skipped; the others are still predicted.
  """
  files, images, errors = [], [], []
  for path in image_files.list_image_files(list(paths)):
    try:
      images.append(image_files.read_image(path, predictor.spec))
      files.append(path)
    except image_files.UnreadableImageError as error:
      errors.append(str(error))
      if on_error:
        on_error(str(error))
  if not files:
    return [], errors
  tops = predict_arrays(predictor, np.stack(images), top_k_classes=top_k_classes, batch_size=batch_size)
  return [Prediction(f, t) for f, t in zip(files, tops)], errors


def format_prediction(prediction: Prediction) -> str:
  lines = [prediction.file]
  lines += [f'  {p:7.2%}  {name} ({c})' if name != str(c) else f'  {p:7.2%}  class {c}'
            for c, name, p in prediction.top]
  return '\n'.join(lines)


def write_json(path: str, predictor: Predictor, predictions: Sequence[Prediction], errors: Sequence[str]) -> None:
  spec = predictor.spec
  with storage.open_file(path, 'w') as f:
    json.dump({
        'input_shape': list(spec.image_shape), 'dataset': spec.dataset, 'preprocessing': spec.resize,
        'predictions': [p.to_json() for p in predictions], 'errors': list(errors),
    }, f, indent=2)
