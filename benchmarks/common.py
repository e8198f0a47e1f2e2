"""What every benchmark shares: the facts of the machine, the paper's optimizer, interleaved timing, reports.

The scripts beside this file run as `python benchmarks/NAME.py` from the repository root; they set the entry
points' environment (densenet_jax.platform.prepare_environment) before JAX starts.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import optax

from densenet_jax import model as model_lib
from densenet_jax import platform, summary
from densenet_jax.platform import cpu_family, host_memory, xla_flags
from densenet_jax.training import optim

# XLA:CPU's default library kernels: convolutions too, which xla_flags gives to Eigen.
YNNPACK_CONVOLUTIONS = {xla_flags.YNN_FUSION_TYPE: ','.join(xla_flags.YNN_FUSION_TYPES_XLA_DEFAULT)}


def add_block_form_arguments(parser: argparse.ArgumentParser) -> None:
  """--memory_efficient/--no-memory_efficient and --layers_per_scan; unset: the backend's block form."""
  parser.add_argument('--memory_efficient', action=argparse.BooleanOptionalAction, default=None,
                      help="recompute each layer's normalized input in the backward pass (default: the "
                           "backend's block form, densenet_jax/platform)")
  parser.add_argument('--layers_per_scan', type=int, default=None,
                      help='compute dense blocks this many layers at a time, 0: unrolled (needs memory_efficient; '
                           "default: the backend's block form)")


def add_model_arguments(parser: argparse.ArgumentParser, model: str = 'densenet_bc_l100_k12', batch: int = 64) -> None:
  """--model, --batch, --image_size and --num_classes: one of the library's models on a synthetic batch."""
  parser.add_argument('--model', default=model, choices=sorted(model_lib.MODELS))
  parser.add_argument('--batch', type=int, default=batch)
  parser.add_argument('--image_size', type=int, default=None, help='default: 224 for ImageNet models, else 32')
  parser.add_argument('--num_classes', type=int, default=None, help='default: 1000 for ImageNet models, else 10')


def create_model(args: argparse.Namespace, **options) -> tuple[model_lib.DenseNet, int]:
  """The model `add_model_arguments` named, with `options`, and its image size; form options left None (or out)
  take the form densenet_jax.platform chooses for the backend JAX computes on, as train.py's do."""
  given = {field: options.pop(field, None) for field in platform.FORM_FIELDS}
  options.update(platform.choose(given, jax.default_backend()).model_options())
  imagenet = model_lib.create_model(args.model, num_classes=1).stem == 'imagenet'
  model = model_lib.create_model(args.model, num_classes=args.num_classes or (1000 if imagenet else 10), **options)
  return model, args.image_size or summary.default_input_shape(model)[0]


def check_block_form_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  scan = args.layers_per_scan
  if scan is not None and (scan < 0 or (scan > 0 and args.memory_efficient is False)):
    parser.error('--layers_per_scan N (N >= 1) computes the memory-efficient model: drop --no-memory_efficient.')


def cpu_count() -> int:
  """The CPUs this process may run on (its affinity mask where the OS has one), which XLA:CPU's pool uses."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def environment() -> dict:
  """The facts every benchmark result records about where it ran."""
  device = jax.devices()[0]
  return dict(device=f'{device.platform}: {device.device_kind}', host_cpus=os.cpu_count(), usable_cpus=cpu_count(),
              cpu_family=cpu_family.host(), jax_version=jax.__version__, xla_flags=os.environ.get('XLA_FLAGS', ''),
              host_memory='freed memory kept' if host_memory.applies() else "the C library's defaults")


def paper_optimizer() -> tuple[optax.Schedule, optax.GradientTransformation]:
  """The paper's SGD (momentum 0.9, Nesterov, weight decay 1e-4) at learning rate 0.1."""
  learning_rate_fn = optim.create_learning_rate_fn(0.1, (), 0.1, 1000)
  return learning_rate_fn, optim.create_optimizer(learning_rate_fn, momentum=0.9, nesterov=True, weight_decay=1e-4)


def report(result: dict, json_path: str | None) -> None:
  """Prints the result object and, with --json, writes it to that file."""
  print(json.dumps(result, indent=2))
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(result, f, indent=2)


class Timing(NamedTuple):
  """One call: wall seconds, and this process's CPU seconds (all threads) over the same interval."""

  wall: float
  cpu: float


def timed_calls(fn, repeats: int) -> list[Timing]:
  timings = []
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    timings.append(Timing(time.perf_counter() - start, time.process_time() - cpu_start))
  return timings


def timed(fn, repeats: int) -> list[float]:
  return [timing.wall for timing in timed_calls(fn, repeats)]


def alternate(fns: Mapping[str, Callable[[], object]], rounds: int, steps: int = 1) -> dict[str, list[Timing]]:
  """Every round runs each function `steps` times in turn, so that all see the same machine state (a shared
  machine drifts by more than the differences measured); each call's wall and CPU time."""
  timings = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      timings[name] += timed_calls(fn, steps)
  return timings


def take_turns(fns: Mapping[str, Callable[[], object]], rounds: int, steps: int = 1) -> dict[str, list[float]]:
  """Wall seconds of each call of `alternate`."""
  return {name: [timing.wall for timing in timings] for name, timings in alternate(fns, rounds, steps).items()}


