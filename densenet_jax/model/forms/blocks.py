"""The dense blocks and transitions of the faster forms (forms/__init__.py): densenet.py's function and variables.

A dense layer here takes the *list* of its block's feature maps and, in training, each map's batch moments, computed
once when the map is written: in training mode a channel's batch statistics do not depend on the layer that reads
it, so no layer re-reduces its whole input. The layer's arithmetic is dense_layer.py's pure function, with the
convolutions of its kernel set (kernels.py); `memory_efficient` recomputes it under `jax.checkpoint`, keeping the
bottleneck output and the packed dropout masks; `layers_per_scan` hands the block to scanned_block.py.
`BatchNormVariables` holds a BatchNorm's variables under flax.linen.BatchNorm's names, for callers that normalize
with the pure functions of layers.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.model import layers
from densenet_jax.model.forms import kernels as kernel_sets
from densenet_jax.model.forms import scanned_block
from densenet_jax.model.forms.dense_layer import (BOTTLENECK_OUTPUT, DROPOUT_MASK, LayerSpec, dense_layer, dropout,
                                                 keep_mask)
from densenet_jax.model.layers import (BATCH_NORM_EPSILON, BATCH_NORM_MOMENTUM, BOTTLENECK_WIDTH, Moments,
                                       conv_kernel_init)

Array = jax.Array
Dtype = Any


class _Module(nn.Module):
  """Shared attributes and constructors, so every module builds BatchNorm and convolutions alike."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  batch_norm_group_size: int | None = None

  def batch_norm(self, channels: int, name: str) -> BatchNormVariables:
    return BatchNormVariables(channels, BATCH_NORM_MOMENTUM, self.param_dtype, name=name)

  def norm_relu(self, features: Sequence[Array], train: bool, name: str, batch_moments=None) -> Array:
    # Every BatchNorm of DenseNet is followed by a ReLU.
    norm = self.batch_norm(sum(f.shape[-1] for f in features), name)
    return batch_norm_relu(norm, features, train, epsilon=BATCH_NORM_EPSILON, dtype=self.dtype,
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


class BatchNormVariables(nn.Module):
  """The variables of `flax.linen.BatchNorm` over `channels`, and their update; normalize with normalize_relu.

  Attributes:
    channels: number of channels normalized.
    momentum: decay of the running averages.
    param_dtype: dtype of scale and bias (the running statistics are float32).
  """

  channels: int
  momentum: float = BATCH_NORM_MOMENTUM
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.scale = self.param('scale', nn.initializers.ones, (self.channels,), self.param_dtype)
    self.bias = self.param('bias', nn.initializers.zeros, (self.channels,), self.param_dtype)
    self.mean = self.variable('batch_stats', 'mean', jnp.zeros, (self.channels,), jnp.float32)
    self.var = self.variable('batch_stats', 'var', jnp.ones, (self.channels,), jnp.float32)

  def params(self) -> dict[str, Array]:
    return {'scale': self.scale, 'bias': self.bias}

  def running(self) -> Moments:
    return Moments(self.mean.value, self.var.value)

  def update(self, batch: Moments, count: int) -> None:
    """Moves the running averages towards `batch`, the moments of `count` values per channel."""
    if self.is_initializing():
      return
    self.mean.value, self.var.value = layers.updated_running(self.running(), batch, count, self.momentum)


def batch_norm_relu(
    norm: BatchNormVariables,
    features: Sequence[Array],
    train: bool,
    *,
    epsilon: float,
    dtype: Dtype,
    batch_moments: Sequence[Moments] | None = None,
    group_size: int | None = None,
) -> Array:
  """ReLU(BatchNorm(concatenate(features, axis=-1))) with `norm`'s variables; train mode updates them.

  `batch_moments[i]` are moments(features[i]) when the caller already has them (a dense block computes each
  feature map's once); `group_size`: examples per statistics group (None: the whole batch). The concatenation is written once, already normalized: it is the next convolution's input.
  """
  if train:
    batch_moments = batch_moments or [layers.moments(f, group_size) for f in features]
    stats = Moments(*(jnp.concatenate(m, axis=-1) for m in zip(*batch_moments)))
    norm.update(stats, layers.examples_per_channel(features[0], group_size))
  else:
    stats = norm.running()
  # XLA fuses the concatenation into the normalization: one pass reads the maps and writes the result.
  x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
  return layers.normalize_relu(x, stats, norm.scale, norm.bias, epsilon, dtype)
