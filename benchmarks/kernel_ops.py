"""One operation of the model's kernel sets alone: the XLA set's form against the CPU set's.

    python benchmarks/kernel_ops.py --op stem_pool            # DenseNet-121's stem max pooling, batch 8
    python benchmarks/kernel_ops.py --op conv3x3 --size 56 --channels 128 --out_channels 32

Each side is one jit-compiled function of the operation's inputs, timed two ways: the forward pass alone, and the
forward pass with the gradient of every input for a random cotangent (what a train step computes). The sides take
turns, each preceded by an untimed call. Both are checked to compute the same values and gradients first. The
defaults are DenseNet-121's shapes at batch 8 (densenet_jax/model/forms/kernels.py names the operations).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from densenet_jax import platform  # noqa: E402

platform.prepare_environment()  # Before JAX starts, as in train.py.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from densenet_jax.model.forms import kernels as kernel_sets  # noqa: E402

SIDES = ('xla', 'cpu')
# Per operation: (size, channels, out_channels) of DenseNet-121's use of it; kernel width, or 0 without a kernel.
OPS = {
    'conv1x1': ((56, 160, 128), 1),
    'conv3x3': ((56, 128, 32), 3),
    'stem_pool': ((112, 64, None), 0),
}


def inputs(op: str, batch: int, size: int, channels: int, out_channels: int | None) -> tuple[jax.Array, ...]:
  """The operation's arguments: an NHWC input and, for a convolution, an HWIO kernel."""
  x_key, kernel_key = jax.random.split(jax.random.key(0))
  x = jax.random.normal(x_key, (batch, size, size, channels))
  width = OPS[op][1]
  if not width:
    return (x,)
  return x, jax.random.normal(kernel_key, (width, width, channels, out_channels)) / np.sqrt(width * width * channels)


def compiled(op: str, side: str, args: tuple[jax.Array, ...]):
  """(forward, forward with the gradients of every argument), both compiled for `args`."""
  fn = getattr(kernel_sets.KERNELS[side], op)
  cotangent = jax.random.normal(jax.random.key(1), jax.eval_shape(fn, *args).shape)

  def with_gradients(*args):
    y, vjp = jax.vjp(fn, *args)
    return y, vjp(cotangent)

  return jax.jit(fn).lower(*args).compile(), jax.jit(with_gradients).lower(*args).compile()


def check_same(results: dict[str, object]) -> None:
  """Both sides' values and gradients agree to float32 rounding (relative to each array's largest value), or
  SystemExit."""
  expected, got = (jax.tree.leaves(results[side]) for side in SIDES)
  for a, b in zip(expected, got):
    difference = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-30))
    if difference > 1e-5:
      raise SystemExit(f'The two kernel sets disagree: largest difference {difference:.2e} of the largest value.')


def run(args: argparse.Namespace) -> dict:
  (default_size, default_channels, default_out), _ = OPS[args.op]
  size, channels = args.size or default_size, args.channels or default_channels
  out_channels = args.out_channels or default_out
  operands = inputs(args.op, args.batch, size, channels, out_channels)
  functions = {side: compiled(args.op, side, operands) for side in SIDES}
  check_same({side: backward(*operands) for side, (_, backward) in functions.items()})
  calls = {f'{side}_{part}': (lambda fn=fn: jax.block_until_ready(fn(*operands)))
           for side, pair in functions.items() for part, fn in zip(('forward', 'with_gradients'), pair)}
  for call in calls.values():
    call()  # Warm-up.
  timings = common.take_turns(calls, args.rounds, args.steps)
  result = dict(op=args.op, batch=args.batch, size=size, channels=channels, out_channels=out_channels,
                **common.environment(), rounds=args.rounds, steps=args.steps)
  result['median_ms'] = {name: round(1000 * statistics.median(times), 3) for name, times in timings.items()}
  for part in ('forward', 'with_gradients'):
    result[f'cpu_speedup_{part}'] = round(result['median_ms'][f'xla_{part}'] / result['median_ms'][f'cpu_{part}'], 3)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--op', default='stem_pool', choices=sorted(OPS))
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--size', type=int, default=None, help="input height and width (default: DenseNet-121's)")
  parser.add_argument('--channels', type=int, default=None, help='input channels')
  parser.add_argument('--out_channels', type=int, default=None, help="a convolution's output channels")
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--steps', type=int, default=1, help='timed calls per side and round')
  parser.add_argument('--json', default=None, help='write the result object to this file')
  args = parser.parse_args(argv)
  if args.out_channels is not None and not OPS[args.op][1]:
    parser.error(f'{args.op} has no kernel: drop --out_channels.')
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  common.report(run(args), args.json)


if __name__ == '__main__':
  main()
