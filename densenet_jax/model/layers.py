"""BatchNorm-ReLU written for dense connectivity, and its pieces as pure functions.

* `moments`: per-channel batch mean and variance of one feature map. In training mode a channel's batch
  statistics do not depend on which layer reads it, so a dense block computes them once per feature map, when it
  is produced, and every later layer reuses them instead of re-reducing all of its input channels.
* `normalize_relu`: relu(BatchNorm(x)) folded into one multiply-add per element in float32, so the backward pass
  keeps no (x - mean) copy.
* `BatchNorm`: the variables of `flax.linen.BatchNorm` (params scale, bias; batch_stats mean, var) and their
  running-average update, for callers that normalize with the pure functions.
* `batch_norm_relu`: ReLU(BatchNorm(concatenate(features))) with a `BatchNorm`'s variables.

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
  """Per-channel batch mean and (biased) variance of one feature map, in float32."""

  mean: Array
  var: Array


def moments(x: Array) -> Moments:
  """Batch statistics over every axis but the last, in float32.

  The variance is E[(x - E[x])^2] (two passes over x), not the one-pass E[x^2] - E[x]^2: that one cancels
  catastrophically when |mean| >> std, and its gradient loses a factor (mean / std)^2 of precision.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  return Moments(mean, jnp.mean(jnp.square(x - mean), axes))


def examples_per_channel(x: Array) -> int:
  """How many values each channel's batch statistics average over (batch x height x width)."""
  return math.prod(x.shape[:-1])


def running_average(running: Array, batch: Array, momentum: float) -> Array:
  """A running statistic after one batch: momentum * running + (1 - momentum) * batch."""
  return momentum * running + (1 - momentum) * batch


def updated_running(running: Moments, batch: Moments, count: int, momentum: float) -> Moments:
  """Running mean and variance after one batch of `count` values per channel (unbiased variance)."""
  unbiased = batch.var * (count / max(count - 1, 1))
  return Moments(running_average(running.mean, batch.mean, momentum),
                 running_average(running.var, unbiased, momentum))


def normalize_relu(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """relu((x - mean) * rsqrt(var + eps) * scale + bias) in float32, as relu(x * a + b), cast to `dtype`."""
  a = jax.lax.rsqrt(stats.var + epsilon) * scale.astype(jnp.float32)
  b = bias.astype(jnp.float32) - stats.mean * a
  return nn.relu(x.astype(jnp.float32) * a + b).astype(dtype)


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
) -> Array:
  """ReLU(BatchNorm(concatenate(features, axis=-1))) with `norm`'s variables; train mode updates them.

  `batch_moments[i]` are moments(features[i]) when the caller already has them (a dense block computes each
  feature map's once). The concatenation is written once, already normalized: it is the next convolution's input.
  """
  if train:
    batch_moments = batch_moments or [moments(f) for f in features]
    stats = Moments(*(jnp.concatenate(m) for m in zip(*batch_moments)))
    norm.update(stats, examples_per_channel(features[0]))
  else:
    stats = norm.running()
  # XLA fuses the concatenation into the normalization: one pass reads the maps and writes the result.
  x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
  return normalize_relu(x, stats, norm.scale, norm.bias, epsilon, dtype)
