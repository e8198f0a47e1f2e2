"""The layer DenseNet needs beyond Flax's own, BatchNorm as the original code trains it, and its pure functions.

`sum_gradients_here` marks where a dense block's backward pass sums the gradients of its feature maps.

`BatchNorm` is flax.linen.BatchNorm (same variables, epsilon 1e-5, running averages with momentum 0.9) with two
differences of the paper's recipes:

* Running variances are updated with the unbiased batch variance (n / (n - 1) times the biased one), as the
  original Torch code and PyTorch do, so that a converted model fine-tunes alike in both frameworks; normalization
  uses the biased one, as every framework does. The variance is computed in two passes, E[(x - E[x])^2].
* With a `group_size`, the batch is split into consecutive groups of that many examples, each normalized with its
  own statistics, as per-device BatchNorm does (Goyal et al. 2017 use groups of 32 for large batches): moments are
  then of shape (groups, channels), and the running averages move towards their mean over the groups. Under jit
  with the batch sharded over devices, a group that one device holds is reduced on that device alone. The input
  is never reshaped into groups: it is reduced per example, and only those (batch, channels) means per group.

The pure functions are shared with the faster forms (forms/), which compute a feature map's batch moments once
for every layer that reads it (in training mode a channel's batch statistics do not depend on the reading layer)
and fold BatchNorm-ReLU into one multiply-add per element. tests/test_layers.py checks all of it against a float64
reference.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# The paper's (and Torch's) BatchNorm. Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch: 0.1).
BATCH_NORM_MOMENTUM = 0.9
BATCH_NORM_EPSILON = 1e-5
BOTTLENECK_WIDTH = 4  # The bottleneck 1x1 conv of DenseNet-B produces 4 * growth_rate channels.

# He initialization with fan-out, from a normal distribution: N(0, sqrt(2 / (kh * kw * out_channels))).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the original code.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class Moments(NamedTuple):
  """Per-channel batch mean and (biased) variance of one feature map, in float32: shape (channels,), or
  (groups, channels) for group statistics; channels are always the last axis."""

  mean: Array
  var: Array


def _group_count(x: Array, group_size: int | None) -> int | None:
  """How many groups of `group_size` examples x's batch splits into, or None when the whole batch is one group."""
  if group_size is None or group_size == x.shape[0]:
    return None
  if group_size < 1 or x.shape[0] % group_size:
    raise ValueError(f'A batch of {x.shape[0]} examples cannot be split into BatchNorm groups of {group_size}.')
  return x.shape[0] // group_size


def _per_example(rows: Array, x: Array) -> Array:
  """(groups, channels) statistics as one row per example of x, broadcast over x's other axes."""
  groups, channels = rows.shape
  batch = x.shape[0]
  rows = jnp.broadcast_to(rows[:, None, :], (groups, batch // groups, channels)).reshape(batch, channels)
  return rows.reshape((batch,) + (1,) * (x.ndim - 2) + (channels,))


def _group_mean(per_example: Array, groups: int) -> Array:
  """(batch, channels) per-example means as (groups, channels) means over consecutive groups of examples."""
  return per_example.reshape(groups, -1, per_example.shape[-1]).mean(axis=1)


def moments(x: Array, group_size: int | None = None) -> Moments:
  """Batch statistics over every axis but the last, in float32; per group of `group_size` examples if given.

  The variance is E[(x - E[x])^2] (two passes over x), not the one-pass E[x^2] - E[x]^2: that one cancels
  catastrophically when |mean| >> std, and its gradient loses a factor (mean / std)^2 of precision. Groups are
  reduced per example first and then per group: reshaping x into groups made XLA:TPU lay every BatchNorm input
  out anew (docs/tpu.md).
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  groups = _group_count(x, group_size)
  if groups is None:
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return Moments(mean, jnp.mean(jnp.square(x - mean), axes))
  axes = tuple(range(1, x.ndim - 1))
  mean = _group_mean(jnp.mean(x, axes), groups)
  var = _group_mean(jnp.mean(jnp.square(x - _per_example(mean, x)), axes), groups)
  return Moments(mean, var)


def moments_gradient(x: Array, stats: Moments, d_stats: Moments, group_size: int | None = None) -> Array:
  """The gradient with respect to x of `moments(x, group_size)`, given those moments and their cotangents.

  d mean / dx = 1 / n and d var / dx = 2 (x - mean) / n per channel (and group); the mean's own dependence on x
  drops out of the variance's gradient because the deviations sum to zero. Autodiff of `moments` would first
  recompute the mean, one more pass over x.
  """
  mean, d_mean, d_var = (a.astype(jnp.float32) for a in (stats.mean, d_stats.mean, d_stats.var))
  if _group_count(x, group_size) is not None:
    mean, d_mean, d_var = (_per_example(a, x) for a in (mean, d_mean, d_var))
  deviation = x.astype(jnp.promote_types(x.dtype, jnp.float32)) - mean
  d_x = (d_mean + 2 * d_var * deviation) / examples_per_channel(x, group_size)
  return d_x.astype(x.dtype)


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


def _scale_and_shift(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float) -> Array:
  """(x - mean) * rsqrt(var + eps) * scale + bias in float32, as x * a + b: the backward pass keeps no (x - mean).

  `stats` of shape (groups, channels) normalize each of `groups` consecutive parts of the batch with its own row.
  """
  a = jax.lax.rsqrt(stats.var + epsilon) * scale.astype(jnp.float32)
  b = bias.astype(jnp.float32) - stats.mean * a
  if a.ndim == 2:
    a, b = _per_example(a, x), _per_example(b, x)
  return x.astype(jnp.float32) * a + b


def normalize(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """BatchNorm of x with `stats`, computed in float32 and cast to `dtype`."""
  return _scale_and_shift(x, stats, scale, bias, epsilon).astype(dtype)


def normalize_relu(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """relu(BatchNorm of x with `stats`), computed in float32 and cast to `dtype`."""
  return nn.relu(_scale_and_shift(x, stats, scale, bias, epsilon)).astype(dtype)


@jax.custom_vjp
def sum_gradients_here(features: list[Array]) -> list[Array]:
  """The identity. In the backward pass, the gradients of `features` summed so far are computed here: XLA would
  otherwise keep every dense layer's input gradient alive to sum them all at the block's start, in memory quadratic
  in the block's depth."""
  return features


sum_gradients_here.defvjp(lambda features: (features, None),
                          lambda _, gradients: (list(jax.lax.optimization_barrier(gradients)),))


class BatchNorm(nn.Module):
  """flax.linen.BatchNorm over the last axis, with the original code's running variance and optional groups.

  Attributes:
    group_size: examples per statistics group in training; None: the whole batch.
    momentum, epsilon: of the running averages and the normalization.
    dtype: of the result; the statistics and the normalization are float32.
    param_dtype: of scale and bias (the running statistics are float32).
  """

  group_size: int | None = None
  momentum: float = BATCH_NORM_MOMENTUM
  epsilon: float = BATCH_NORM_EPSILON
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    channels = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, channels, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, channels, self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, channels, jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, channels, jnp.float32)
    if not train:
      return normalize(x, Moments(running_mean.value, running_var.value), scale, bias, self.epsilon, self.dtype)
    stats = moments(x, self.group_size)
    if not self.is_initializing():
      running = Moments(running_mean.value, running_var.value)
      running_mean.value, running_var.value = updated_running(
          running, jax.lax.stop_gradient(stats), examples_per_channel(x, self.group_size), self.momentum)
    return normalize(x, stats, scale, bias, self.epsilon, self.dtype)
