"""How the model's convolutions, max pooling and dropout masks are written for the compiler: named sets, one function.

The model computes one function. A `Kernels` set says how five of its operations are written for the compiler:

* `conv1x1`: a 1x1 stride-1 NHWC convolution (bottleneck and transition convolutions, most of DenseNet-BC's work);
* `conv3x3`: the 3x3 stride-1 convolution padded by 1 of every dense layer;
* `new_feature`: the identity on each new feature map of a dense block (a hook for its gradient);
* `dropout_input`: the identity on the input of each dropout (a hook for its gradient);
* `stem_pool`: the ImageNet stem's 3x3 stride-2 max pooling padded by 1.

`XLA` writes them as XLA's own operations. `CPU` writes them in the forms that XLA:CPU compiles faster code for:
the 1x1 convolution as the matrix product it is, the 3x3 convolution with its gradients spelled as an NHWC/HWIO
convolution and a matrix product (XLA:CPU does not rewrite autodiff's layouts inside loop bodies), an optimization
barrier that makes each feature map's gradient one sum instead of one fused into every consumer, and max pooling
and its gradient as elementwise code. They were measured on CPU only (docs/performance.md).

The model takes a set by name (`DenseNet(kernels='xla' | 'cpu')`); densenet_jax/platform chooses one per run from
the backend and, on CPUs, the CPU family. tests/test_kernels.py checks that every set computes the same logits,
gradients and running statistics. `DROPOUT_MASKS` are the two ways of drawing dropout's keep masks, likewise chosen
by name.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from densenet_jax.model.forms import dropout_masks

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
  dropout_input: Callable[[Array], Array]
  stem_pool: Callable[[Array], Array]


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
  # On the pixels as rows of one matrix: XLA:CPU transposes fewer operands of the gradients' matmuls than for a
  # product of the 4-d array.
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2:]))
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


_same_conv3x3 = _xla_conv(_SAME_3X3)


@jax.custom_vjp
def nhwc_conv3x3(x: Array, kernel: Array) -> Array:
  """A 3x3 stride-1 NHWC convolution padded by 1; its input gradient an NHWC/HWIO convolution, its kernel gradient a
  matrix product.

  Autodiff writes a convolution's gradients as convolutions with permuted dimension labels. XLA:CPU rewrites those
  into Eigen's NHWC/HWIO form at the top level of a program but not inside a loop body (a scanned dense block),
  where its generic emitter runs them many times slower. This spells them in forms it compiles well everywhere.
  """
  return _same_conv3x3(x, kernel)


def _nhwc_conv3x3_forward(x: Array, kernel: Array):
  return _same_conv3x3(x, kernel), (x, kernel)


def _nhwc_conv3x3_backward(residuals, gradient: Array):
  x, kernel = residuals
  # The input gradient correlates the output gradient with the flipped kernel, inputs and outputs swapped.
  d_x = _same_conv3x3(gradient, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  return d_x.astype(x.dtype), _conv3x3_kernel_gradient(x, gradient).astype(kernel.dtype)


def _conv3x3_kernel_gradient(x: Array, gradient: Array) -> Array:
  """d_kernel[h, w, i, o] = sum over pixels p of x[p + (h - 1, w - 1), i] * gradient[p, o], zero outside.

  As one matrix product over the pixels: x (pixels, in) transposed times the nine shifted copies of the output
  gradient side by side (pixels, 9 * out). The shifted copies are of the gradient, the array with fewer channels,
  and no operand needs a transposed copy (XLA:CPU writes those element by element, slower than the product).
  """
  _, height, width, out = gradient.shape
  padded = jnp.pad(gradient, ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Tap (h, w) pairs x at p + (h - 1, w - 1) with the gradient at p, i.e. x at p with the gradient at
  # p - (h - 1, w - 1), which is padded[p + (2 - h, 2 - w)].
  shifted = jnp.concatenate(
      [padded[:, 2 - h:2 - h + height, 2 - w:2 - w + width, :] for h in range(3) for w in range(3)], axis=-1)
  d_kernel = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), shifted.reshape(-1, 9 * out), (((0,), (0,)), ((), ())))
  return d_kernel.reshape(x.shape[-1], 3, 3, out).transpose(1, 2, 0, 3)


nhwc_conv3x3.defvjp(_nhwc_conv3x3_forward, _nhwc_conv3x3_backward)


@jax.custom_vjp
def gradient_barrier(x: Array) -> Array:
  """The identity; in the backward pass, x's gradient is computed once and kept in memory.

  A dense layer's output gradient sums the contributions of every later layer of its block. XLA:CPU fuses that sum
  into each consumer (the 3x3 convolution's input and kernel gradients, the batch moments' gradient) and so
  computes it once per consumer; an optimization barrier on the gradient makes it one sum, written once. XLA:CPU
  keeps the barrier only without its cse_barrier_expander pass (densenet_jax/platform/xla_flags.py).
  """
  return x


def _gradient_barrier_forward(x: Array) -> tuple[Array, None]:
  return x, None


def _gradient_barrier_backward(_, gradient: Array) -> tuple[Array]:
  return (jax.lax.optimization_barrier(gradient),)


gradient_barrier.defvjp(_gradient_barrier_forward, _gradient_barrier_backward)


_POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING = (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))


def _max_pool(x: Array) -> Array:
  """3x3 max pooling with stride 2, padded by 1 with -inf (as flax.linen.max_pool pads)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, _POOL_WINDOW, _POOL_STRIDES, _POOL_PADDING)


def _pool_taps(x: Array) -> list[Array]:
  """The nine taps of `_max_pool`'s windows over x, in row-major window order: tap (h, w) of window (i, j) is
  x padded by 1 with -inf at (2i + h, 2j + w)."""
  _, height, width, _ = x.shape
  out_height, out_width = (height - 1) // 2 + 1, (width - 1) // 2 + 1
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  return [padded[:, h:h + 2 * out_height - 1:2, w:w + 2 * out_width - 1:2, :] for h in range(3) for w in range(3)]


def elementwise_max_pool(x: Array) -> Array:
  """`_max_pool` written as elementwise code: the maximum of each window's nine taps, and a gradient to match.

  XLA:CPU runs the reduce-window of `_max_pool` as a generic loop, several times slower than one fused maximum
  of nine strided slices; and autodiff's gradient of max pooling is a select-and-scatter, which it computes
  through index arrays several times the size of the input. Here the forward pass also records, per window, which
  tap autodiff routes the gradient to (the first maximum in row-major window order) as one byte, and the backward
  pass adds each tap's share with one strided pad: it reads that byte and the gradient, not the input again.
  """
  return _tap_index_max_pool(x.shape[1:3], x)


def _tap_max_pool(x: Array) -> Array:
  return functools.reduce(jnp.maximum, _pool_taps(x))


def _first_maximum_tap(x: Array) -> Array:
  """Per window of `_max_pool`, the index (int8, 0..8) of its first maximal tap in row-major window order."""
  taps = _pool_taps(x)
  best, index = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
  for tap_index, tap in enumerate(taps[1:], start=1):
    later_is_larger = tap > best  # Strictly: on a tie the earlier tap keeps the gradient.
    best = jnp.where(later_is_larger, tap, best)
    index = jnp.where(later_is_larger, jnp.int8(tap_index), index)
  return index


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tap_index_max_pool(input_size: tuple[int, int], x: Array) -> Array:
  del input_size  # The backward pass's: the pooled output does not say whether the input's size was even.
  return _tap_max_pool(x)


def _tap_index_max_pool_forward(input_size: tuple[int, int], x: Array):
  del input_size
  # The barrier stores the index: fused into the backward pass, its nine comparisons would run once per tap.
  return _tap_max_pool(x), jax.lax.optimization_barrier(_first_maximum_tap(x))


def _tap_index_max_pool_backward(input_size: tuple[int, int], index: Array, gradient: Array):
  height, width = input_size
  out_height, out_width = gradient.shape[1:3]
  zero = jnp.zeros((), gradient.dtype)
  d_padded = None
  for tap_index in range(9):
    h, w = divmod(tap_index, 3)  # Tap (h, w) of window (i, j) is the padded input at (2i + h, 2j + w).
    share = jnp.where(index == tap_index, gradient, zero)
    spread = jax.lax.pad(share, zero, (
        (0, 0, 0), (h, height + 2 - h - (2 * out_height - 1), 1), (w, width + 2 - w - (2 * out_width - 1), 1),
        (0, 0, 0)))
    d_padded = spread if d_padded is None else d_padded + spread
  return (d_padded[:, 1:height + 1, 1:width + 1, :],)


_tap_index_max_pool.defvjp(_tap_index_max_pool_forward, _tap_index_max_pool_backward)


def _identity(x: Array) -> Array:
  return x


XLA = Kernels('xla', conv1x1=_xla_conv(((0, 0), (0, 0))), conv3x3=_same_conv3x3, new_feature=_identity,
              dropout_input=_identity, stem_pool=_max_pool)
CPU = Kernels('cpu', conv1x1=matmul_conv1x1, conv3x3=nhwc_conv3x3, new_feature=gradient_barrier,
              dropout_input=gradient_barrier, stem_pool=elementwise_max_pool)
KERNELS = {kernels.name: kernels for kernels in (XLA, CPU)}


# How dropout draws its keep masks: the same bits either way (tests/test_dropout_masks.py). 'elementwise' writes
# JAX's Threefry rounds out as code XLA fuses into one kernel, which XLA:CPU runs and compiles many times faster
# than its loop of passes (docs/performance.md, "Dropout").
DROPOUT_MASKS = {'jax': dropout_masks.jax_keep_mask, 'elementwise': dropout_masks.threefry_keep_mask}


def resolve(name: str) -> Kernels:
  """The kernel set called `name`."""
  if name not in KERNELS:
    raise ValueError(f'Unknown kernels {name!r}; choose one of {", ".join(KERNELS)} (densenet_jax.platform.choose '
                     'picks the one measured fastest on a backend).')
  return KERNELS[name]
