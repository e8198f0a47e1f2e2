"""How the model's convolutions run on each backend: the one place that chooses kernels.

The model computes one function. A `Kernels` set says how three of its operations are written for the compiler:

* `conv1x1`: a 1x1 stride-1 NHWC convolution (bottleneck and transition convolutions, most of DenseNet-BC's work);
* `conv3x3`: the 3x3 stride-1 convolution padded by 1 of every dense layer;
* `new_feature`: the identity on each new feature map of a dense block (a hook for its gradient).

`XLA` writes them as XLA's own operations. `CPU` writes them in the forms that XLA:CPU compiles faster code for:
the 1x1 convolution as the matrix product it is, the 3x3 convolution with gradients spelled as NHWC/HWIO
convolutions (XLA:CPU does not rewrite autodiff's layouts inside loop bodies), and an optimization barrier that
makes each feature map's gradient one sum instead of one fused into every consumer. They were measured on CPU
only, and they win on some CPU families and not others, so the CPU default is looked up per family
(densenet_jax/cpu_family.py, docs/performance.md); no other backend gets them by default.

`DenseNet(kernels=None)` resolves to `default_kernels(jax.default_backend())` when the model is traced; pass
'xla' or 'cpu' to choose. tests/test_kernels.py checks that every set computes the same logits, gradients and
running statistics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from densenet_jax import cpu_family

Array = jax.Array
Conv = Callable[[Array, Array], Array]  # (NHWC input, HWIO kernel) -> NHWC output

_NHWC = ('NHWC', 'HWIO', 'NHWC')
_SAME_3X3 = ((1, 1), (1, 1))


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One way to write the model's hot operations; every set computes the same function."""

  name: str
  conv1x1: Conv
  conv3x3: Conv
  new_feature: Callable[[Array], Array]


def _xla_conv(padding) -> Conv:
  def conv(x: Array, kernel: Array) -> Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_NHWC)

  return conv


def matmul_conv1x1(x: Array, kernel: Array) -> Array:
  """A 1x1 stride-1 convolution as a matrix product over the channel axis.

  Autodiff then differentiates it into matrix products: XLA:CPU computes the kernel gradient of a 1x1 convolution
  as a generic convolution, several times slower than the equivalent matmul.
  """
  if kernel.shape[:2] != (1, 1):
    raise ValueError(f'matmul_conv1x1 takes a (1, 1, in, out) kernel, got shape {kernel.shape}.')
  return jnp.dot(x, kernel.reshape(kernel.shape[-2:]))


_same_conv3x3 = _xla_conv(_SAME_3X3)


@jax.custom_vjp
def nhwc_conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3 stride-1 NHWC convolution padded by 1, whose gradients are NHWC/HWIO convolutions too.

  Autodiff writes a convolution's gradients as convolutions with permuted dimension labels. XLA:CPU rewrites those
  into Eigen's NHWC/HWIO form at the top level of a program but not inside a loop body (a scanned dense block),
  where its generic emitter runs them many times slower. This spells them in that form, with explicit transposes.
  """
  return _same_conv3x3(x, kernel)


def _nhwc_conv3x3_forward(x: Array, kernel: Array):
  return _same_conv3x3(x, kernel), (x, kernel)


def _nhwc_conv3x3_backward(residuals, gradient: Array):
  x, kernel = residuals
  # The input gradient correlates the output gradient with the flipped kernel, inputs and outputs swapped.
  d_x = _same_conv3x3(gradient, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  # d_kernel[h, w, i, o] = sum over n, y, x of x_padded[n, y + h, x + w, i] * gradient[n, y, x, o]: a convolution
  # with the input channels as its batch and the images as its input channels.
  d_kernel = _same_conv3x3(x.transpose(3, 1, 2, 0), gradient.transpose(1, 2, 0, 3))
  return d_x.astype(x.dtype), d_kernel.transpose(1, 2, 0, 3).astype(kernel.dtype)


nhwc_conv3x3.defvjp(_nhwc_conv3x3_forward, _nhwc_conv3x3_backward)


@jax.custom_vjp
def gradient_barrier(x: Array) -> Array:
  """The identity; in the backward pass, x's gradient is computed once and kept in memory.

  A dense layer's output gradient sums the contributions of every later layer of its block. XLA:CPU fuses that sum
  into each consumer (the 3x3 convolution's input and kernel gradients, the batch moments' gradient) and so
  computes it once per consumer; an optimization barrier on the gradient makes it one sum, written once. XLA:CPU
  keeps the barrier only without its cse_barrier_expander pass (densenet_jax/xla_flags.py).
  """
  return x


def _gradient_barrier_forward(x: Array) -> tuple[Array, None]:
  return x, None


def _gradient_barrier_backward(_, gradient: Array) -> tuple[Array]:
  return (jax.lax.optimization_barrier(gradient),)


gradient_barrier.defvjp(_gradient_barrier_forward, _gradient_barrier_backward)


def _identity(x: Array) -> Array:
  return x


XLA = Kernels('xla', conv1x1=_xla_conv(((0, 0), (0, 0))), conv3x3=_same_conv3x3, new_feature=_identity)
CPU = Kernels('cpu', conv1x1=matmul_conv1x1, conv3x3=nhwc_conv3x3, new_feature=gradient_barrier)
KERNELS = {kernels.name: kernels for kernels in (XLA, CPU)}


def default_kernels(backend: str, family: str | None = None) -> str:
  """The name of the kernel set used on `backend` ('cpu', 'gpu', 'tpu', ...) unless a model names one.

  Only the CPU has a measured default, per CPU family (`family`, default: this host's; densenet_jax/cpu_family.py).
  Other backends, and CPU families without a measurement, get XLA's own operations.
  """
  if backend != 'cpu':
    return XLA.name
  return cpu_family.defaults(family or cpu_family.host()).kernels


def resolve(name: str | None) -> Kernels:
  """The kernel set called `name`; None: the default of the backend JAX computes on."""
  name = default_kernels(jax.default_backend()) if name is None else name
  if name not in KERNELS:
    raise ValueError(f'Unknown kernels {name!r}; choose one of {", ".join(KERNELS)} or None (per backend).')
  return KERNELS[name]
