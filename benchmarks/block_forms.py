"""How to build a dense block: repeated concatenation vs a preallocated buffer, straightforward vs this library.

    python benchmarks/block_forms.py                       # DenseNet-BC L=100 k=12, first block, batch 64
    python benchmarks/block_forms.py --layers 6 --channels 64 --growth_rate 32 --size 56 --batch 8  # DenseNet-121

Times the forward + backward pass (loss, gradients and BatchNorm statistics) of one DenseNet-BC dense
block in four forms with identical parameters, and checks first that all four compute the same loss and
gradients:

* `concat`: the straightforward Flax block: x = concatenate([x, layer(x)]), each layer BatchNorm ->
  ReLU -> Conv1x1 -> BatchNorm -> ReLU -> Conv3x3 with flax.linen.BatchNorm and flax.linen.Conv.
* `buffer`: the same layers, but the block preallocates its output (all channels it will ever have) and
  writes each new feature map into it with lax.dynamic_update_slice; layer i reads a prefix slice.
* `library`: the faster forms' block, densenet_jax/model/forms/blocks.py (moments once per feature map,
  BatchNorm folded into the ReLU, the kernel set train.py chooses here).
* `library_buffer`: the library's layers reading from a preallocated buffer.

Needs only jax and flax. XLA flags are train.py's (densenet_jax/platform/xla_flags.py) plus whatever XLA_FLAGS
holds.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()  # Before JAX starts, as in train.py.

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from densenet_jax.model import layers  # noqa: E402
from densenet_jax.model.forms import blocks, dense_layer, kernels  # noqa: E402


class PlainLayer(nn.Module):
  """A bottleneck dense layer written the obvious way, on the concatenated input."""

  growth_rate: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def norm(name):
      return nn.BatchNorm(
          use_running_average=False, momentum=layers.BATCH_NORM_MOMENTUM, epsilon=layers.BATCH_NORM_EPSILON, name=name
      )

    conv_init = layers.conv_kernel_init
    x = nn.relu(norm('norm1')(x))
    x = nn.Conv(layers.BOTTLENECK_WIDTH * self.growth_rate, (1, 1), use_bias=False, kernel_init=conv_init,
                name='conv1')(x)
    x = nn.relu(norm('norm2')(x))
    return nn.Conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, kernel_init=conv_init,
                   name='conv2')(x)


class _Block(nn.Module):
  """A dense block of `num_layers` bottleneck layers; the four forms differ only in __call__."""

  num_layers: int
  growth_rate: int


class ConcatBlock(_Block):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = jnp.concatenate([x, PlainLayer(self.growth_rate, name=f'layer{i + 1}')(x)], axis=-1)
    return x


def _preallocate(x: jax.Array, num_layers: int, growth_rate: int) -> jax.Array:
  buffer = jnp.zeros((*x.shape[:-1], x.shape[-1] + num_layers * growth_rate), x.dtype)
  return jax.lax.dynamic_update_slice(buffer, x, (0, 0, 0, 0))


def _write(buffer: jax.Array, new: jax.Array, channel: int) -> jax.Array:
  return jax.lax.dynamic_update_slice(buffer, new, (0, 0, 0, channel))


class BufferBlock(_Block):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    buffer = _preallocate(x, self.num_layers, self.growth_rate)
    for i in range(self.num_layers):
      new = PlainLayer(self.growth_rate, name=f'layer{i + 1}')(buffer[..., :channels])
      buffer = _write(buffer, new, channels)
      channels += self.growth_rate
    return buffer


def _library_kernels() -> str:
  """The kernel set train.py would choose on this backend."""
  return platform.choose({}, jax.default_backend()).kernels


class LibraryBlock(_Block):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # The library's block, under a wrapper so that all four forms share one parameter tree.
    return blocks.DenseBlock(
        num_layers=self.num_layers, growth_rate=self.growth_rate, bottleneck=True, kernels=_library_kernels(),
        name='block'
    )(x, train=True)


class LibraryBufferBlock(_Block):
  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    buffer = _preallocate(x, self.num_layers, self.growth_rate)
    batch_moments = [layers.moments(x)]
    spec = dense_layer.LayerSpec(self.growth_rate, bottleneck=True, dropout_rate=0.0, dtype=jnp.float32,
                                 kernels=kernels.resolve(_library_kernels()))
    for i in range(self.num_layers):
      read_moments = layers.Moments(*(jnp.concatenate(m) for m in zip(*batch_moments)))
      new = blocks.DenseLayer(spec=spec, name=f'layer{i + 1}')([buffer[..., :channels]], [read_moments], True, None)
      buffer = _write(buffer, new, channels)
      batch_moments.append(layers.moments(new))
      channels += self.growth_rate
    return buffer


FORMS = {'concat': ConcatBlock, 'buffer': BufferBlock, 'library': LibraryBlock, 'library_buffer': LibraryBufferBlock}


def _loss_and_grads_fn(block: nn.Module):
  def loss_fn(params, batch_stats, x, target):
    out, updates = block.apply({'params': params, 'batch_stats': batch_stats}, x, mutable=['batch_stats'])
    return jnp.mean(out * target), updates

  return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 2), has_aux=True))


def _as_library_tree(tree):
  return {'block': tree}


def _check_same(name: str, values, reference) -> None:
  """Same function: the loss and every gradient agree with the first form up to float32 round-off.

  Round-off alone reaches ~1e-3 in the input gradient of a 16-layer block at batch 64 (both forms, against a
  float64 run); a different function is off by O(1).
  """
  leaves = jax.tree_util.tree_leaves_with_path(values)
  for (path, ours), theirs in zip(leaves, jax.tree.leaves(reference), strict=True):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    error = np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30)
    if error > 1e-2:
      raise AssertionError(f'{name} differs from the first form at {jax.tree_util.keystr(path)}: '
                           f'relative error {error:.2e}')


def run(args: argparse.Namespace) -> dict:
  rng = np.random.default_rng(0)
  shape = (args.batch, args.size, args.size, args.channels)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  out_channels = args.channels + args.layers * args.growth_rate
  target = jnp.asarray(rng.standard_normal((*shape[:-1], out_channels)), jnp.float32)
  variables = ConcatBlock(args.layers, args.growth_rate).init(jax.random.key(0), x)

  result = dict(batch=args.batch, size=args.size, channels=args.channels, layers=args.layers,
                growth_rate=args.growth_rate, device=str(jax.devices()[0].device_kind),
                xla_flags=os.environ.get('XLA_FLAGS', ''), forms={})
  compiled, reference = {}, None
  for name in args.forms:
    block = FORMS[name](args.layers, args.growth_rate)
    wrap = _as_library_tree if name == 'library' else (lambda tree: tree)
    inputs = (wrap(variables['params']), wrap(variables['batch_stats']), x, target)
    start = time.perf_counter()
    step = _loss_and_grads_fn(block).lower(*inputs).compile()
    compile_seconds = time.perf_counter() - start
    (loss, _), (grads, x_grad) = step(*inputs)
    values = (loss, x_grad, grads['block'] if name == 'library' else grads)
    if reference is None:
      reference = values
    else:
      _check_same(name, values, reference)
    compiled[name] = functools.partial(step, *inputs)
    result['forms'][name] = dict(compile_seconds=round(compile_seconds, 2),
                                 temp_bytes=int(step.memory_analysis().temp_size_in_bytes))
  times = common.take_turns({name: lambda step=step: jax.block_until_ready(step()) for name, step in compiled.items()},
                           args.repeats)
  for name, form in result['forms'].items():
    form['seconds'] = round(statistics.median(times[name]), 4)
    print(name, form, flush=True)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=32, help='height and width of the feature maps')
  parser.add_argument('--channels', type=int, default=24, help='input channels of the block')
  parser.add_argument('--layers', type=int, default=16)
  parser.add_argument('--growth_rate', type=int, default=12)
  parser.add_argument('--repeats', type=int, default=5, help='timed runs of each form, taking turns')
  parser.add_argument('--forms', nargs='+', default=list(FORMS), choices=list(FORMS))
  parser.add_argument('--json', default=None)
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  common.report(run(args), args.json)


if __name__ == '__main__':
  main()
