"""BatchNorm-ReLU written for dense connectivity, and its pieces as pure functions.

* `moments`: per-channel batch mean and variance of one feature map. In training mode a channel's batch
  statistics do not depend on which layer reads it, so a dense block computes them once per feature map, when it
  is produced, and every later layer reuses them instead of re-reducing all of its input channels.
* `normalize_relu`: relu(BatchNorm(x)) folded into one multiply-add per element in float32, so the backward pass
  keeps no (x - mean) copy.
* `BatchNorm`: the variables of `flax.linen.BatchNorm` (params scale, bias; batch_stats mean, var) and their
  running-average update, for callers that normalize with the pure functions.
* `batch_norm_relu`: ReLU(BatchNorm(concatenate(features))) with a `BatchNorm`'s variables.

With a `group_size` (`batch_norm_group_size` of DenseNet), the batch is split into consecutive groups of that many
examples and each group is normalized with its own statistics, as per-device BatchNorm does (Goyal et al. 2017 use
groups of 32 for large batches): moments are then of shape (groups, channels), and the running averages move
towards their mean over the groups. Under jit with the batch sharded over devices, a group that one device holds is
reduced on that device alone, and a group spread over k devices only across those k.

Running variances are updated with the unbiased batch variance (n / (n - 1) times the biased one), as the original
Torch code and PyTorch do, so that a converted model fine-tunes alike in both frameworks; normalization uses the
biased one, as every framework does. tests/test_layers.py checks all of it against a float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# The paper's (and Torch's) BatchNorm. Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch: 0.1).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5


class Moments(NamedTuple):
  """Per-channel batch mean and (biased) variance of one feature map, in float32: shape (channels,), or
  (groups, channels) for group statistics; channels are always the last axis."""

  mean: Array
  var: Array


def _grouped(x: Array, group_size: int | None) -> Array | None:
  """x as (groups, group_size, ...), or None when the whole batch is one group."""
  if group_size is None or group_size == x.shape[0]:
    return None
  if group_size < 1 or x.shape[0] % group_size:
    raise ValueError(f'A batch of {x.shape[0]} examples cannot be split into BatchNorm groups of {group_size}.')
  return x.reshape(x.shape[0] // group_size, group_size, *x.shape[1:])


def moments(x: Array, group_size: int | None = None) -> Moments:
  """Batch statistics over every axis but the last, in float32; per group of `group_size` examples if given.

  The variance is E[(x - E[x])^2] (two passes over x), not the one-pass E[x^2] - E[x]^2: that one cancels
  catastrophically when |mean| >> std, and its gradient loses a factor (mean / std)^2 of precision.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  groups = _grouped(x, group_size)
  if groups is None:
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return Moments(mean, jnp.mean(jnp.square(x - mean), axes))
  axes = tuple(range(1, groups.ndim - 1))
  mean = jnp.mean(groups, axes, keepdims=True)
  var = jnp.mean(jnp.square(groups - mean), axes)
  return Moments(mean.reshape(var.shape), var)


def moments_gradient(x: Array, stats: Moments, d_stats: Moments, group_size: int | None = None) -> Array:
  """The gradient with respect to x of `moments(x, group_size)`, given those moments and their cotangents.

  d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n per channel (and group); the mean's own dependence on x
  drops out of the variance's gradient because the deviations sum to zero. Autodiff of `moments` would first
  recompute the mean, one more pass over x.
  """
  values = _grouped(x, group_size)
  if values is None:
    values, rows = x, (x.shape[-1],)
  else:  # (groups, channels) statistics against (groups, group_size, ..., channels) values
    rows = (values.shape[0],) + (1,) * (values.ndim - 2) + (x.shape[-1],)
  mean, d_mean, d_var = (a.astype(jnp.float32).reshape(rows) for a in (stats.mean, d_stats.mean, d_stats.var))
  deviation = values.astype(jnp.promote_types(x.dtype, jnp.float32)) - mean
  d_x = (d_mean + 2 * d_var * deviation) / examples_per_channel(x, group_size)
  return d_x.reshape(x.shape).astype(x.dtype)


def examples_per_channel(x: Array, group_size: int | None = None) -> int:
  """How many values each channel's batch statistics average over (batch or group x height x width)."""
  return math.prod(x.shape[1:-1]) * (group_size or x.shape[0])


def running_average(running: Array, batch: Array, momentum: float) -> Array:
  """A running statistic after one batch: momentum * running + (1 - momentum) * batch."""
  return momentum * running + (1 - momentum) * batch


def updated_running(running: Moments, batch: Moments, count: int, momentum: float) -> Moments:
  """Running mean and variance after one batch of `count` values per channel (unbiased variance)."""
  unbiased = batch.var * (count / max(count - 1, 1))
  mean = batch.mean
  if mean.ndim == 2:  # group statistics: the mean over the groups
    mean, unbiased = mean.mean(axis=0), unbiased.mean(axis=0)
  return Moments(running_average(running.mean, mean, momentum), running_average(running.var, unbiased, momentum))


def normalize_relu(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """relu((x - mean) * rsqrt(var + eps) * scale + bias) in float32, as relu(x * a + b), cast to `dtype`.

  `stats` of shape (groups, channels) normalize each of `groups` consecutive parts of the batch with its own row.
  """
  a = jax.lax.rsqrt(stats.var + epsilon) * scale.astype(jnp.float32)
  b = bias.astype(jnp.float32) - stats.mean * a
  if a.ndim == 1:
    return nn.relu(x.astype(jnp.float32) * a + b).astype(dtype)
  groups = x.reshape(a.shape[0], -1, *x.shape[1:]).astype(jnp.float32)
  per_group = (a.shape[0],) + (1,) * (x.ndim - 1) + (a.shape[-1],)
  return nn.relu(groups * a.reshape(per_group) + b.reshape(per_group)).reshape(x.shape).astype(dtype)


class BatchNorm(nn.Module):
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
    self.mean.value, self.var.value = updated_running(self.running(), batch, count, self.momentum)


def batch_norm_relu(
    norm: BatchNorm,
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
    batch_moments = batch_moments or [moments(f, group_size) for f in features]
    stats = Moments(*(jnp.concatenate(m, axis=-1) for m in zip(*batch_moments)))
    norm.update(stats, examples_per_channel(features[0], group_size))
  else:
    stats = norm.running()
  # XLA fuses the concatenation into the normalization: one pass reads the maps and writes the result.
  x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
  return normalize_relu(x, stats, norm.scale, norm.bias, epsilon, dtype)
