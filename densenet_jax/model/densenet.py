"""DenseNet (Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR 2017) in Flax.

Read this file to learn the architecture; it is the paper, written with Flax's own layers:

* `DenseLayer`: H_l = BN-ReLU-Conv3x3 producing k = `growth_rate` new channels from the concatenation
  [x_0, ..., x_(l-1)] of every earlier feature map of its block; with a bottleneck ("B") BN-ReLU-Conv1x1(4k) first.
* `DenseBlock`: L dense layers; its output concatenates the block input and all L new feature maps.
* `Transition`: BN-ReLU-Conv1x1 to floor(theta * m) channels (the compression "C"), then 2x2 average pooling.
* `DenseNet`: a stem (CIFAR: 3x3 conv; ImageNet: 7x7/2 conv, BN, ReLU, 3x3/2 max pool), blocks between transitions,
  BN-ReLU-global average pooling-fully connected.

Images are NHWC. With `memory_efficient=True` a dense layer keeps nothing for the backward pass and recomputes itself
from the earlier feature maps, which its block keeps anyway (Pleiss et al., 2017, keep its bottleneck output too), the
stem keeps only its conv's output, and gradients are summed layer by layer: memory grows linearly with depth, not
quadratically, for the bottleneck convs computed twice. layers.BatchNorm is Flax's, with Torch's running variance.

GPUs and TPUs compute with this form; the faster forms of forms/ compute the same function with the same variables
(tests/test_forms.py), and `DenseNet` hands its layers to one when its form attributes ask for it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.model import forms, layers
from densenet_jax.model.layers import BOTTLENECK_WIDTH, BatchNorm, conv_kernel_init, dense_kernel_init

Array = jax.Array
Dtype = Any

DROPOUT_MASK = 'dropout_mask'  # all that memory_efficient keeps of a dense layer for the backward pass


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout, as flax.linen.Dropout computes it, with a mask drawn from `key`; the identity without one."""
  if key is None:
    return x
  keep = checkpoint_name(jax.random.bernoulli(key, 1.0 - rate, x.shape), DROPOUT_MASK)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def max_pool(x: Array) -> Array:
  """3x3 max pooling, stride 2, padded by 1 (with -inf), as in the original code."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class _Module(nn.Module):
  """What every part of DenseNet shares: dtypes, BatchNorm grouping, and its BN-ReLU and convolutions."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  batch_norm_group_size: int | None = None

  def norm_relu(self, x: Array, train: bool, name: str) -> Array:
    # Every BatchNorm of DenseNet is followed by a ReLU.
    norm = BatchNorm(group_size=self.batch_norm_group_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     name=name)
    return nn.relu(norm(x, train))

  def conv(self, features: int, size: int, name: str, stride: int = 1) -> nn.Conv:
    # Bias-free; padded symmetrically as in Torch ('SAME' pads differently on even input sizes).
    return nn.Conv(features, (size, size), strides=stride, padding=size // 2, use_bias=False,
                   kernel_init=conv_kernel_init, dtype=self.dtype, param_dtype=self.param_dtype, name=name)


class DenseLayer(_Module):
  """k new channels from the concatenation of `features`: [BN-ReLU-Conv1x1(4k)-] BN-ReLU-Conv3x3(k)."""

  growth_rate: int = 12
  bottleneck: bool = False
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, features: Sequence[Array], train: bool, key: Array | None = None) -> Array:
    first_key, second_key = (None, None) if key is None else jax.random.split(key)
    x = jnp.concatenate(features, axis=-1)
    if self.bottleneck:
      x = self.conv(BOTTLENECK_WIDTH * self.growth_rate, 1, 'conv1')(self.norm_relu(x, train, 'norm1'))
      x = dropout(x, self.dropout_rate, first_key)
      return dropout(self.conv(self.growth_rate, 3, 'conv2')(self.norm_relu(x, train, 'norm2')), self.dropout_rate,
                     second_key)
    return dropout(self.conv(self.growth_rate, 3, 'conv1')(self.norm_relu(x, train, 'norm1')), self.dropout_rate,
                   first_key)


class DenseBlock(_Module):
  """`num_layers` dense layers; each reads every earlier feature map, the output concatenates them all."""

  num_layers: int = 6
  growth_rate: int = 12
  bottleneck: bool = False
  dropout_rate: float = 0.0
  memory_efficient: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    layer = DenseLayer
    if self.memory_efficient:  # train is static: argument 2, counting self
      policy = jax.checkpoint_policies.save_only_these_names(DROPOUT_MASK)
      layer = nn.remat(DenseLayer, policy=policy, static_argnums=(2,))
    keys = [None] * self.num_layers
    if train and self.dropout_rate:
      keys = list(jax.random.split(self.make_rng('dropout'), self.num_layers))
    shared = dict(growth_rate=self.growth_rate, bottleneck=self.bottleneck, dropout_rate=self.dropout_rate,
                  dtype=self.dtype, param_dtype=self.param_dtype, batch_norm_group_size=self.batch_norm_group_size)
    features = [x]
    for i in range(self.num_layers):
      features.append(layer(**shared, name=f'layer{i + 1}')(features, train, keys[i]))
      if self.memory_efficient:
        features = layers.sum_gradients_here(features)
    return jnp.concatenate(features, axis=-1)


class Transition(_Module):
  """BN-ReLU-Conv1x1 to `out_channels`, then 2x2 average pooling with stride 2."""

  out_channels: int = 0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self.norm_relu(x, train, 'norm')
    conv = self.conv(self.out_channels, 1, 'conv')
    if self.dropout_rate:
      key = self.make_rng('dropout') if train else None
      return nn.avg_pool(dropout(conv(x), self.dropout_rate, key), (2, 2), strides=(2, 2))
    # A 1x1 convolution and average pooling commute: pooling first does a quarter of the work.
    return conv(nn.avg_pool(x, (2, 2), strides=(2, 2)))


class DenseNet(_Module):
  """A DenseNet for images of shape (batch, height, width, input_channels).

  Attributes:
    block_sizes: number of dense layers in each block.
    growth_rate: k, the channels each dense layer adds.
    num_classes: outputs of the classifier.
    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    stem_channels: output channels of the stem conv (16 for plain CIFAR DenseNets, 2k otherwise).
    bottleneck: BN-ReLU-Conv1x1(4k) before each 3x3 conv (the "B" of DenseNet-BC).
    compression: theta; a transition maps m channels to floor(theta * m) (the "C").
    dropout_rate: dropout after every conv except the stem's, in train mode only.
    batch_norm_group_size: examples per BatchNorm statistics group in training; None: the whole (global) batch.
    input_channels: channels the input images must have (checked, with a clear message).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`.
    memory_efficient: recompute each dense layer, and the stem's BN-ReLU-max pool, in the backward pass.
    kernels, layers_per_scan, dropout_masks: a faster form (forms/): 'xla' or 'cpu' kernels, 0 or n layers per
      `jax.lax.scan` (needs memory_efficient), 'jax' or 'elementwise' dropout masks; defaults: this file's form.
  """

  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_classes: int = 1000
  stem: Literal['cifar', 'imagenet'] = 'imagenet'
  stem_channels: int = 64
  bottleneck: bool = True
  compression: float = 0.5
  dropout_rate: float = 0.0
  input_channels: int = 3
  memory_efficient: bool = False
  kernels: str = 'xla'
  layers_per_scan: int = 0
  dropout_masks: str = 'jax'

  @property
  def stem_stride(self) -> int:
    """Input pixels per pixel of the stem's output: 7x7/2 conv then 3x3/2 max pool, or the CIFAR stem's 3x3/1 conv."""
    return 4 if self.stem == 'imagenet' else 1

  @property
  def min_input_size(self) -> int:
    """Smallest height/width that leaves at least one pixel in the last block."""
    return self.stem_stride * 2 ** (len(self.block_sizes) - 1)

  @property
  def stage_names(self) -> tuple[str, ...]:
    """The feature maps `features=True` returns, in network order: stem, block1, transition1, ..., blockB."""
    n = len(self.block_sizes)
    return ('stem', *(name for b in range(1, n) for name in (f'block{b}', f'transition{b}')), f'block{n}')

  def _check_input(self, x: Array) -> None:
    expected = f'(batch, height, width, {self.input_channels})'
    if x.ndim != 4:
      raise ValueError(
          f'DenseNet expects a batch of NHWC images of shape {expected}, got an array of rank {x.ndim} with shape '
          f'{tuple(x.shape)}. Add a batch axis for a single image (x[None]) and put channels last.')
    if x.shape[-1] != self.input_channels:
      raise ValueError(
          f'DenseNet expects {self.input_channels} input channels (shape {expected}), got shape {tuple(x.shape)}. '
          f'Images must be channels-last (NHWC); for other channel counts build the model with '
          f'input_channels={x.shape[-1]}.')
    if min(x.shape[1:3]) < self.min_input_size:
      raise ValueError(
          f'Input images of size {x.shape[1]}x{x.shape[2]} are too small for this DenseNet: with the {self.stem} '
          f'stem and {len(self.block_sizes)} blocks, height and width must be at least {self.min_input_size}.')

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, features: bool = False) -> Array | dict[str, Array]:
    """Float32 logits of shape (batch, num_classes).

    With `features=True`, instead, the feature maps after the stem and after every dense block and transition,
    in network order ('stem', 'block1', 'transition1', ..., 'blockB'), and 'pre_logits': the globally pooled
    final features the classifier reads; the classifier is not applied (backbone weights need none).
    """
    self._check_input(x)
    shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, batch_norm_group_size=self.batch_norm_group_size)
    if forms.is_default(self):
      block, transition, stem_pool = (functools.partial(DenseBlock, memory_efficient=self.memory_efficient),
                                      Transition, max_pool)
    else:
      block, transition, stem_pool = forms.parts(self)
    x = jnp.asarray(x, self.dtype)
    stages = {}

    if self.stem == 'imagenet':
      x = self.conv(self.stem_channels, 7, 'stem_conv', stride=2)(x)

      def norm_pool(model: DenseNet, x: Array) -> Array:
        return stem_pool(model.norm_relu(x, train, 'stem_norm'))

      if self.memory_efficient and forms.is_default(self):  # the largest activations: keep the conv's output only
        norm_pool = nn.remat(norm_pool)
      x = norm_pool(self, x)
    else:
      x = self.conv(self.stem_channels, 3, 'stem_conv')(x)
    stages['stem'] = x

    for b, num_layers in enumerate(self.block_sizes):
      x = block(num_layers=num_layers, growth_rate=self.growth_rate, bottleneck=self.bottleneck,
                dropout_rate=self.dropout_rate, name=f'block{b + 1}', **shared)(x, train)
      stages[f'block{b + 1}'] = x
      if b + 1 < len(self.block_sizes):
        x = transition(out_channels=math.floor(self.compression * x.shape[-1]), dropout_rate=self.dropout_rate,
                       name=f'transition{b + 1}', **shared)(x, train)
        stages[f'transition{b + 1}'] = x

    pooled = jnp.mean(self.norm_relu(x, train, 'final_norm'), axis=(1, 2))
    if features:
      return {**stages, 'pre_logits': pooled}
    logits = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros,
                      dtype=self.dtype, param_dtype=self.param_dtype, name='classifier')(pooled)
    return jnp.asarray(logits, jnp.float32)
