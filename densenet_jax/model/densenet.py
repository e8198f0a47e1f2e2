"""DenseNet (Huang et al., CVPR 2017) as Flax Linen modules: read this file to learn the architecture.

* `DenseLayer`: the variables of one dense layer, and `dense_layer.dense_layer` applied to them: BN-ReLU-Conv3x3,
  or with a bottleneck BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k). The unrolled, the rematerialized
  (`memory_efficient`) and the scanned (`layers_per_scan`, scanned_block.py) blocks all compute that function.
* `DenseBlock`: grows its input by `growth_rate` channels per layer with `jnp.concatenate`.
* `Transition`: BN-ReLU-Conv1x1 with compression, then 2x2 average pooling.
* `DenseNet`: a CIFAR stem (one 3x3 conv) or an ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool), dense
  blocks separated by transitions, and a BN-ReLU-global-average-pool-Dense head.

Images are NHWC. `memory_efficient=True` recomputes concat -> BN -> ReLU -> first conv of every dense layer in the
backward pass (Pleiss et al., 2017), so the activations kept for the backward pass grow linearly, not
quadratically, with depth. How the convolutions are written for the compiler is a named set of kernels.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.model import kernels as kernel_sets
from densenet_jax.model import layers, scanned_block
from densenet_jax.model.dense_layer import (BOTTLENECK_OUTPUT, BOTTLENECK_WIDTH, DROPOUT_MASK, LayerSpec, dense_layer,
                                           dropout, keep_mask)
from densenet_jax.model.layers import BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, Moments

Array = jax.Array
Dtype = Any
Params = dict[str, Any]


# He initialization with fan-out, from a normal distribution: N(0, sqrt(2 / (kh * kw * out_channels))).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the original code.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


# ----------------------------------------------------------------------------------------------
# Modules: each owns its variables and applies the functions above.


class _Module(nn.Module):
  """Shared attributes and constructors, so every module builds BatchNorm and convolutions alike."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  batch_norm_group_size: int | None = None

  def batch_norm(self, channels: int, name: str) -> layers.BatchNorm:
    return layers.BatchNorm(channels, BATCH_NORM_MOMENTUM, self.param_dtype, name=name)

  def norm_relu(self, features: Sequence[Array], train: bool, name: str, batch_moments=None) -> Array:
    # Every BatchNorm of DenseNet is followed by a ReLU.
    norm = self.batch_norm(sum(f.shape[-1] for f in features), name)
    return layers.batch_norm_relu(norm, features, train, epsilon=BATCH_NORM_EPSILON, dtype=self.dtype,
                                  batch_moments=batch_moments, group_size=self.batch_norm_group_size)

  def conv_kernel(self, name: str, kernel: int, in_channels: int, out_channels: int) -> Array:
    # The variable of nn.Conv(use_bias=False): {name: {'kernel': (kh, kw, in, out)}}.
    return ConvKernel((kernel, kernel, in_channels, out_channels), self.param_dtype, name=name)()


class ConvKernel(nn.Module):
  """The kernel of a bias-free convolution, under the name nn.Conv gives it; the caller convolves."""

  shape: tuple[int, int, int, int]
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> Array:
    return self.param('kernel', conv_kernel_init, self.shape, self.param_dtype)


class DenseLayer(_Module):
  """The variables of one dense layer (norm1, conv1, and with a bottleneck norm2, conv2) and `dense_layer`.

  It takes the *list* of feature maps of the block so far and, in training, their batch moments: the layer
  normalizes and concatenates them in one pass, which `memory_efficient` recomputes in the backward pass.
  """

  spec: LayerSpec | None = None
  memory_efficient: bool = False

  @nn.compact
  def __call__(self, features: Sequence[Array], feature_moments: Sequence[Moments] | None, train: bool,
               key: Array | None) -> Array:
    spec = self.spec
    width = sum(f.shape[-1] for f in features)
    norm1 = self.batch_norm(width, 'norm1')
    params = {'norm1': norm1.params()}
    if spec.bottleneck:
      params['conv1'] = {'kernel': self.conv_kernel('conv1', 1, width, BOTTLENECK_WIDTH * spec.growth_rate)}
      norm2 = self.batch_norm(BOTTLENECK_WIDTH * spec.growth_rate, 'norm2')
      params['norm2'] = norm2.params()
      params['conv2'] = {'kernel': self.conv_kernel('conv2', 3, BOTTLENECK_WIDTH * spec.growth_rate,
                                                    spec.growth_rate)}
    else:
      params['conv1'] = {'kernel': self.conv_kernel('conv1', 3, width, spec.growth_rate)}

    if train:
      stats = Moments(*(jnp.concatenate(m, axis=-1) for m in zip(*feature_moments)))
      count = layers.examples_per_channel(features[0], self.batch_norm_group_size)
      norm1.update(stats, count)
      bottleneck_stats = None
    else:
      stats = norm1.running()
      bottleneck_stats = norm2.running() if spec.bottleneck else None

    def layer(params, features, stats, bottleneck_stats, key):
      x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
      return dense_layer(spec, params, x, stats, bottleneck_stats, key)

    if self.memory_efficient:
      # Keep only the bottleneck output (and the packed dropout masks) for the backward pass and recompute the
      # normalized concatenation from the layer inputs (which the block keeps alive anyway): linear instead of
      # quadratic memory.
      layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_only_these_names(BOTTLENECK_OUTPUT,
                                                                                          DROPOUT_MASK))
    new, used_bottleneck_stats = layer(params, tuple(features), stats, bottleneck_stats, key)
    if train and spec.bottleneck:
      norm2.update(jax.tree.map(jax.lax.stop_gradient, used_bottleneck_stats), count)
    return new


class DenseBlock(_Module):
  """`num_layers` dense layers; the output concatenates the input and every layer's output.

  With `layers_per_scan` = n > 0 the block is computed n layers at a time under `jax.lax.scan`
  (scanned_block.py): the same variables and function, compiled once per group of n layers.
  """

  num_layers: int = 6
  growth_rate: int = 12
  bottleneck: bool = False
  dropout_rate: float = 0.0
  memory_efficient: bool = False
  layers_per_scan: int = 0
  kernels: str = 'xla'
  dropout_masks: str = 'jax'

  def layer_spec(self) -> LayerSpec:
    return LayerSpec(self.growth_rate, self.bottleneck, self.dropout_rate, self.dtype,
                     kernel_sets.resolve(self.kernels), batch_norm_group_size=self.batch_norm_group_size,
                     dropout_masks=self.dropout_masks)

  def layer_keys(self, train: bool) -> list[Array | None]:
    """One dropout key per layer, split from one block key: the same in the unrolled and scanned forms."""
    if not train or self.dropout_rate == 0.0:
      return [None] * self.num_layers
    return list(jax.random.split(self.make_rng('dropout'), self.num_layers))

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    spec = self.layer_spec()
    keys = self.layer_keys(train)
    if self.layers_per_scan and not self.is_initializing():
      return self._scanned(spec, x, train, keys)
    features = [x]
    # A channel's batch statistics are the same for every layer that reads it: computed once.
    group_size = self.batch_norm_group_size
    feature_moments = [layers.moments(x, group_size)] if train else None
    for i in range(self.num_layers):
      new = DenseLayer(spec=spec, memory_efficient=self.memory_efficient, dtype=self.dtype,
                       param_dtype=self.param_dtype, batch_norm_group_size=group_size, name=f'layer{i + 1}')(features, feature_moments, train, keys[i])
      new = spec.kernels.new_feature(new)
      features.append(new)
      if train:
        feature_moments.append(layers.moments(new, group_size))
    return jnp.concatenate(features, axis=-1)

  def _scanned(self, spec: LayerSpec, x: Array, train: bool, keys: list[Array | None]) -> Array:
    # The same variables, created by the unrolled layers at init, computed by scanned_block.py.
    block = scanned_block.BlockSpec(x.shape[-1], self.num_layers, self.layers_per_scan, spec)
    names = [f'layer{i + 1}' for i in range(self.num_layers)]
    params = [self.variables['params'][name] for name in names]
    running = [self.variables['batch_stats'][name] for name in names]
    if not train:
      return scanned_block.evaluate(block, x, params, running)
    output, batch = scanned_block.train(block, x, params, keys)
    count = layers.examples_per_channel(x, self.batch_norm_group_size)
    # Like every BatchNorm, a train-mode call needs mutable=['batch_stats'] (flax raises otherwise).
    for name, layer_running, layer_batch in zip(names, running, batch):
      self.put_variable('batch_stats', name, {
          norm: layers.updated_running(Moments(**layer_running[norm]), stats, count, BATCH_NORM_MOMENTUM)._asdict()
          for norm, stats in layer_batch.items()
      })
    return output


class Transition(_Module):
  """BN-ReLU-Conv1x1 to `out_channels`, then 2x2 average pooling with stride 2."""

  out_channels: int = 0
  dropout_rate: float = 0.0
  kernels: str = 'xla'
  dropout_masks: str = 'jax'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    kernels = kernel_sets.resolve(self.kernels)
    kernel = self.conv_kernel('conv', 1, x.shape[-1], self.out_channels).astype(self.dtype)
    x = self.norm_relu([x], train, 'norm')
    if self.dropout_rate:
      x = kernels.conv1x1(x, kernel)
      keep = keep_mask(self.make_rng('dropout'), self.dropout_rate, x.shape, self.dropout_masks) if train else None
      return nn.avg_pool(dropout(x, self.dropout_rate, keep, kernels), (2, 2), strides=(2, 2))
    # A 1x1 convolution and average pooling commute: pooling first does a quarter of the work.
    return kernels.conv1x1(nn.avg_pool(x, (2, 2), strides=(2, 2)), kernel)


Stem = Literal['cifar', 'imagenet']


class DenseNet(_Module):
  """A DenseNet for images of shape (batch, height, width, input_channels).

  Attributes:
    block_sizes: number of dense layers in each block.
    growth_rate: k, the channels each dense layer adds.
    num_classes: outputs of the classifier.
    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    stem_channels: output channels of the stem conv (16 for plain CIFAR DenseNets, 2k otherwise).
    bottleneck: use BN-ReLU-Conv1x1(4k) before each 3x3 conv (the "B" of DenseNet-BC).
    compression: theta; a transition maps m channels to floor(theta * m) (the "C").
    dropout_rate: dropout after every conv except the stem's, in train mode only.
    memory_efficient: recompute concat-BN-ReLU-conv of each dense layer in the backward pass.
    layers_per_scan: 0 writes every dense layer out; n > 0 computes each dense block n layers at a time under
      jax.lax.scan, each layer reading its group's widest input through zero-padded parameters
      (scanned_block.py): the same function and variables, far less to compile. Needs memory_efficient=True,
      whose memory it keeps by construction.
    kernels: how convolutions and max pooling are written for the compiler (kernels.py): 'xla' or 'cpu'.
    dropout_masks: how dropout's keep masks are drawn (kernels.DROPOUT_MASKS): 'jax' or 'elementwise', the same
      bits.
      The four form attributes above compute the same function with the same variables; the model takes them as
      given and reads nothing of the machine. densenet_jax.platform.choose picks the fastest measured on a
      backend.
    batch_norm_group_size: examples per BatchNorm statistics group in training: the batch is split into
      consecutive groups of this many examples, each normalized with its own statistics (per-device BatchNorm
      when it is the per-device batch; the groups are reduced only over the devices that hold them). The running
      averages follow the mean of the groups' statistics. None: the whole (global) batch is one group.
    input_channels: channels the input images must have (checked, with a clear message).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`.
  """

  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_classes: int = 1000
  stem: Stem = 'imagenet'
  stem_channels: int = 64
  bottleneck: bool = True
  compression: float = 0.5
  dropout_rate: float = 0.0
  memory_efficient: bool = False
  layers_per_scan: int = 0
  kernels: str = 'xla'
  dropout_masks: str = 'jax'
  input_channels: int = 3

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
    names = ['stem']
    for b in range(1, len(self.block_sizes) + 1):
      names += [f'block{b}'] + ([f'transition{b}'] if b < len(self.block_sizes) else [])
    return tuple(names)

  def _check_options(self) -> None:
    unset = [name for name in ('memory_efficient', 'layers_per_scan', 'kernels', 'dropout_masks')
             if getattr(self, name) is None]
    if unset:
      raise ValueError(
          f'DenseNet takes explicit values for {", ".join(unset)}, got None: the model reads nothing of the '
          'machine. Pass them, e.g. `**densenet_jax.platform.choose(config, jax.default_backend()).model_options()`, '
          "or leave the defaults (kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax')."
      )
    if self.layers_per_scan < 0 or (self.layers_per_scan > 0 and not self.memory_efficient):
      raise ValueError(
          f'layers_per_scan={self.layers_per_scan}: use 0 (every dense layer written out) or a positive number of '
          'layers per scan together with memory_efficient=True (a scanned block keeps only what '
          "memory_efficient keeps: it has no variant that stores every layer's input)."
      )
    if self.kernels not in kernel_sets.KERNELS:
      raise ValueError(f'kernels={self.kernels!r}: use one of {", ".join(kernel_sets.KERNELS)}.')
    if self.dropout_masks not in kernel_sets.DROPOUT_MASKS:
      raise ValueError(f'dropout_masks={self.dropout_masks!r}: use one of {", ".join(kernel_sets.DROPOUT_MASKS)}.')

  def _check_input(self, x: Array) -> None:
    expected = f'(batch, height, width, {self.input_channels})'
    if x.ndim != 4:
      raise ValueError(
          f'DenseNet expects a batch of NHWC images of shape {expected}, got an array of rank {x.ndim} with shape '
          f'{tuple(x.shape)}. Add a batch axis for a single image (x[None]) and put channels last.'
      )
    if x.shape[-1] != self.input_channels:
      raise ValueError(
          f'DenseNet expects {self.input_channels} input channels (shape {expected}), got shape {tuple(x.shape)}. '
          f'Images must be channels-last (NHWC); for other channel counts build the model with '
          f'input_channels={x.shape[-1]}.'
      )
    if min(x.shape[1:3]) < self.min_input_size:
      raise ValueError(
          f'Input images of size {x.shape[1]}x{x.shape[2]} are too small for this DenseNet: with the {self.stem} '
          f'stem and {len(self.block_sizes)} blocks, height and width must be at least {self.min_input_size}.'
      )

  @nn.compact
  def __call__(self, x: Array, train: bool = False, *, features: bool = False) -> Array | dict[str, Array]:
    """Float32 logits of shape (batch, num_classes).

    With `features=True`, instead, the feature maps after the stem and after every dense block and transition,
    in network order ('stem', 'block1', 'transition1', ..., 'blockB'), and 'pre_logits': the globally pooled
    final features the classifier reads; the classifier is not applied (backbone weights need none).
    """
    self._check_input(x)
    self._check_options()
    x = jnp.asarray(x, self.dtype)
    shared = dict(dtype=self.dtype, param_dtype=self.param_dtype, batch_norm_group_size=self.batch_norm_group_size)
    stages = {}

    imagenet = self.stem == 'imagenet'
    size, stride = (7, 2) if imagenet else (3, 1)
    kernel = self.conv_kernel('stem_conv', size, self.input_channels, self.stem_channels).astype(self.dtype)
    # Symmetric padding, as in Torch: 'SAME' pads differently on even input sizes.
    x = jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(size // 2, size // 2)] * 2,
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if imagenet:
      x = self.norm_relu([x], train, 'stem_norm')
      x = kernel_sets.resolve(self.kernels).stem_pool(x)  # 3x3 max pooling, stride 2, padded by 1
    stages['stem'] = x

    for b, num_layers in enumerate(self.block_sizes):
      x = DenseBlock(
          num_layers=num_layers, growth_rate=self.growth_rate, bottleneck=self.bottleneck,
          dropout_rate=self.dropout_rate, memory_efficient=self.memory_efficient,
          layers_per_scan=self.layers_per_scan, kernels=self.kernels, dropout_masks=self.dropout_masks,
          name=f'block{b + 1}', **shared,
      )(x, train)
      stages[f'block{b + 1}'] = x
      if b + 1 < len(self.block_sizes):
        x = Transition(out_channels=int(math.floor(self.compression * x.shape[-1])),
                       dropout_rate=self.dropout_rate, kernels=self.kernels, dropout_masks=self.dropout_masks,
                       name=f'transition{b + 1}', **shared)(x, train)
        stages[f'transition{b + 1}'] = x

    x = self.norm_relu([x], train, 'final_norm')
    pooled = jnp.mean(x, axis=(1, 2))
    if features:
      return {**stages, 'pre_logits': pooled}
    logits = nn.Dense(self.num_classes, kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros,
                      name='classifier', dtype=self.dtype, param_dtype=self.param_dtype)(pooled)
    return jnp.asarray(logits, jnp.float32)
