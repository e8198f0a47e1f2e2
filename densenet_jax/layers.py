"""The primitives DenseNet spends its time in, written for dense connectivity.

* `BatchNormReLU`: ReLU(BatchNorm(x)) where x is the channel-concatenation of a list of feature maps,
  written to memory once, already normalized. In training mode the batch statistics of a channel
  do not depend on which layer reads it, so a dense block computes the `moments` of each feature map
  once, when it is produced, and every later layer reuses them (instead of re-reducing all of its
  input channels: quadratic work in the number of layers). Normalization is folded into one
  multiply-add per element, so the backward pass keeps no (x - mean) copy.
* `pointwise_conv`: a 1x1 convolution as the matrix product it is.
* `gradient_barrier`: the identity, whose gradient is computed once (see its docstring).

The first two have exactly the variables of `flax.linen.BatchNorm` / `flax.linen.Conv` and compute the
same function; tests/test_layers.py checks outputs, running statistics and gradients against them (and
the barrier against the identity), and docs/performance.md measures what each buys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


class Moments(NamedTuple):
  """Per-channel batch mean and (biased) variance of one feature map, in float32."""

  mean: Array
  var: Array


def moments(x: Array) -> Moments:
  """Batch statistics over every axis but the last, in float32.

  The variance is E[(x - E[x])^2] (two passes over x), not flax's one-pass E[x^2] - E[x]^2: that
  one cancels catastrophically when |mean| >> std, and its gradient loses a factor (mean / std)^2
  of precision (tests/test_layers.py). The second pass is cheap here: a dense block computes the
  moments of each feature map once, over its k new channels only.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  return Moments(mean, jnp.mean(jnp.square(x - mean), axes))


class BatchNormReLU(nn.Module):
  """ReLU(BatchNorm(concatenate(features, axis=-1))) with batch moments computed once per feature map.

  Variables and their update are those of `nn.BatchNorm` over the concatenated channels (params
  `scale`, `bias`; batch_stats `mean`, `var`; running = momentum * running + (1 - momentum) * batch).
  The concatenation is written once, already normalized: it is the input of the next convolution.

  Attributes:
    momentum: decay of the running averages.
    epsilon: added to the variance.
    dtype: dtype of the result; statistics and normalization are computed in float32.
    param_dtype: dtype of scale and bias.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self, features: Sequence[Array], train: bool, batch_moments: Sequence[Moments] | None = None
  ) -> Array:
    """`batch_moments[i]` are moments(features[i]) when the caller already has them (train mode)."""
    features = list(features)
    channels = sum(f.shape[-1] for f in features)
    scale = self.param('scale', nn.initializers.ones, (channels,), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (channels,), self.param_dtype)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones, (channels,), jnp.float32)

    if train:
      if batch_moments is None:
        batch_moments = [moments(f) for f in features]
      mean = jnp.concatenate([m.mean for m in batch_moments])
      var = jnp.concatenate([m.var for m in batch_moments])
      if not self.is_initializing():
        running_mean.value = running_average(running_mean.value, mean, self.momentum)
        running_var.value = running_average(running_var.value, var, self.momentum)
    else:
      mean, var = running_mean.value, running_var.value

    # XLA fuses the concatenate into the normalization: one pass reads the feature maps and writes
    # the normalized concatenation.
    x = features[0] if len(features) == 1 else jnp.concatenate(features, axis=-1)
    return normalize_relu(x, Moments(mean, var), scale, bias, self.epsilon, self.dtype)


def running_average(running: Array, batch: Array, momentum: float) -> Array:
  """BatchNorm's running statistics after one batch: momentum * running + (1 - momentum) * batch."""
  return momentum * running + (1 - momentum) * batch


def normalize_relu(x: Array, stats: Moments, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """relu((x - mean) * rsqrt(var + eps) * scale + bias) in float32, as relu(x * a + b), cast to `dtype`.

  Folding the normalization into one multiply-add per element keeps no (x - mean) copy for the
  backward pass.
  """
  a = jax.lax.rsqrt(stats.var + epsilon) * scale.astype(jnp.float32)
  b = bias.astype(jnp.float32) - stats.mean * a
  return nn.relu(x.astype(jnp.float32) * a + b).astype(dtype)


def pointwise_conv(lhs: Array, rhs: Array, window_strides, padding, *, precision=None, **unused) -> Array:
  """A 1x1 stride-1 unpadded NHWC convolution as a matrix product; a drop-in for lax.conv_general_dilated.

  Same parameters and result as the convolution, but autodiff differentiates it into matrix products:
  XLA:CPU computes the kernel gradient of a 1x1 convolution as a generic convolution several times
  slower than the equivalent matmul, and 1x1 convolutions are most of DenseNet-BC's work.
  """
  if tuple(window_strides) != (1, 1) or any(tuple(p) != (0, 0) for p in padding) or rhs.shape[:2] != (1, 1):
    raise ValueError('pointwise_conv computes only 1x1 convolutions with stride 1 and no padding.')
  return jnp.dot(lhs, rhs.reshape(rhs.shape[-2:]), precision=precision)


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _same_conv3x3(x: Array, kernel: Array) -> Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)


@jax.custom_vjp
def conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3 stride-1 NHWC convolution padded by 1, whose gradients are NHWC/HWIO convolutions too.

  Autodiff writes the gradients of a convolution as convolutions with permuted dimension labels,
  which XLA:CPU rewrites into Eigen's NHWC/HWIO form at the top level of a program but not inside a
  loop body: there it runs them through its generic emitter, 20x slower (docs/performance.md).
  This writes them in that form, with explicit transposes.
  """
  return _same_conv3x3(x, kernel)


def _conv3x3_forward(x: Array, kernel: Array):
  return _same_conv3x3(x, kernel), (x, kernel)


def _conv3x3_backward(residuals, gradient: Array):
  x, kernel = residuals
  # The input gradient correlates the output gradient with the flipped kernel, inputs and outputs swapped.
  d_x = _same_conv3x3(gradient, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  # The kernel gradient, d_kernel[h, w, i, o] = sum over n, y, x of x_padded[n, y + h, x + w, i] *
  # gradient[n, y, x, o], is a convolution with the input channels as its batch and the images as its
  # input channels: a (channels, height, width, images) input, a (height, width, images, outputs) kernel.
  d_kernel = _same_conv3x3(x.transpose(3, 1, 2, 0), gradient.transpose(1, 2, 0, 3))
  return d_x.astype(x.dtype), d_kernel.transpose(1, 2, 0, 3).astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_forward, _conv3x3_backward)


@jax.custom_vjp
def gradient_barrier(x: Array) -> Array:
  """The identity; in the backward pass, x's gradient is computed once and kept in memory.

  The gradient of a dense layer's output sums the contributions of every later layer of the block.
  XLA:CPU fuses that sum into each of its consumers (the 3x3 convolution's input and kernel gradients,
  the batch moments' gradient) and so computes it once per consumer. An optimization barrier on the
  gradient makes it one sum, written once: 8-13% faster DenseNet-BC L=100 training steps on CPU
  (docs/performance.md). XLA:CPU keeps the barrier only with xla_flags.KEEP_REMAT_ON_CPU, which the entry
  points set.
  """
  return x


def _gradient_barrier_forward(x: Array) -> tuple[Array, None]:
  return x, None


def _gradient_barrier_backward(_, gradient: Array) -> tuple[Array]:
  return (jax.lax.optimization_barrier(gradient),)


gradient_barrier.defvjp(_gradient_barrier_forward, _gradient_barrier_backward)
