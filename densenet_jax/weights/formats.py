"""How PyTorch (torchvision / timm) and Keras applications name and lay out each Flax variable of a DenseNet.

A Format maps a Flax leaf path, e.g. ('block1', 'layer1', 'conv1', 'kernel'), to the source's key and layout; the
table is in convert.py's docstring.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from densenet_jax import model as model_lib
from densenet_jax.model import layers

Path = tuple[str, ...]
KERAS_BN_EPSILON = 1.001e-5  # Keras applications' BatchNormalization epsilon


class Format:
  """How one framework names and lays out each Flax leaf."""

  framework: str
  layer_pattern: re.Pattern  # matches the keys of a dense layer; groups: block, layer (framework numbering)
  block_offset: int  # framework block number - Flax block number

  def key(self, path: Path) -> str:
    raise NotImplementedError

  def source_shape(self, path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape

  def to_flax(self, path: Path, array: np.ndarray) -> np.ndarray:
    return array

  def flax_shape(self, path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape

  def check(self, model: model_lib.DenseNet) -> None:
    """Raises if this naming cannot describe `model`."""

  def classifier_keys(self) -> tuple[str, str]:
    return self.key(('classifier', 'kernel')), self.key(('classifier', 'bias'))

  def num_classes(self, source: Mapping[str, np.ndarray]) -> int | None:
    kernel = source.get(self.key(('classifier', 'kernel')))
    if kernel is None or np.ndim(kernel) != 2:
      return None
    return self.flax_shape(('classifier', 'kernel'), tuple(kernel.shape))[1]


class TorchFormat(Format):
  framework = 'PyTorch'
  layer_pattern = re.compile(r'^features\.denseblock(\d+)\.denselayer(\d+)\.')
  block_offset = 0
  _LEAVES = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean', 'var': 'running_var'}
  _TOP = {'stem_conv': 'features.conv0', 'stem_norm': 'features.norm0', 'final_norm': 'features.norm5',
          'classifier': 'classifier'}

  def key(self, path: Path) -> str:
    top, *rest, leaf = path
    if top in self._TOP:
      module = self._TOP[top]
    elif top.startswith('block'):
      module = f'features.dense{top}.dense{rest[0]}.{rest[1]}'  # block3/layer5/conv1
    else:
      module = f'features.{top}.{rest[0]}'  # transition2/norm
    return f'{module}.{self._LEAVES[leaf]}'

  # PyTorch convs are (out, in, kh, kw), Linear weights (out, in); Flax uses (kh, kw, in, out) and (in, out).
  def source_shape(self, path, shape):
    if len(shape) == 4:
      return (shape[3], shape[2], shape[0], shape[1])
    return tuple(reversed(shape))

  def flax_shape(self, path, shape):
    if len(shape) == 4:
      return (shape[2], shape[3], shape[1], shape[0])
    return tuple(reversed(shape))

  def to_flax(self, path, array):
    if array.ndim == 4:
      return np.transpose(array, (2, 3, 1, 0))
    return array.T if array.ndim == 2 else array


class KerasFormat(Format):
  framework = 'Keras'
  layer_pattern = re.compile(r'^conv(\d+)_block(\d+)_')
  block_offset = 1
  _LEAVES = {'kernel': 'kernel', 'scale': 'gamma', 'mean': 'moving_mean', 'var': 'moving_variance'}
  _TOP = {'stem_conv': 'conv1_conv', 'stem_norm': 'conv1_bn', 'final_norm': 'bn', 'classifier': 'predictions'}
  _LAYER = {'norm1': '0_bn', 'conv1': '1_conv', 'norm2': '1_bn', 'conv2': '2_conv'}

  def __init__(self, epsilons: Mapping[str, float] | None = None, default_epsilon: float = KERAS_BN_EPSILON):
    self.epsilons = dict(epsilons or {})  # per BN layer name
    self.default_epsilon = default_epsilon

  def check(self, model: model_lib.DenseNet) -> None:
    if not model.bottleneck or model.stem != 'imagenet':
      raise ValueError('Keras applications only has ImageNet DenseNet-BC models; there is no Keras naming for a '
                       f'DenseNet with {model_lib.describe(model)}.')

  def layer(self, module: Path) -> str:
    top, *rest = module
    if top in self._TOP:
      return self._TOP[top]
    number = int(re.fullmatch(r'[a-z]+(\d+)', top)[1]) + self.block_offset
    if top.startswith('block'):
      return f'conv{number}_{rest[0].replace("layer", "block")}_{self._LAYER[rest[1]]}'
    return f'pool{number}_{"bn" if rest[0] == "norm" else rest[0]}'

  def key(self, path: Path) -> str:
    leaf = path[-1]
    name = ('bias' if path[0] == 'classifier' else 'beta') if leaf == 'bias' else self._LEAVES[leaf]
    return f'{self.layer(path[:-1])}/{name}'

  def to_flax(self, path, array):
    if path[-1] != 'var':
      return array
    epsilon = self.epsilons.get(self.layer(path[:-1]), self.default_epsilon)
    return np.asarray(array, np.float64) + (epsilon - layers.BATCH_NORM_EPSILON)
