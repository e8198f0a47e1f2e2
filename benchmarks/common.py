"""What every benchmark shares: the facts of the machine, the paper's optimizer, interleaved timing, reports.

The scripts beside this file run as `python benchmarks/NAME.py` from the repository root; they set the entry
points' environment (densenet_jax.cli.prepare_environment) before JAX starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping

import jax
import optax

from densenet_jax import xla_flags
from densenet_jax.training import optim

# XLA:CPU's default library kernels: convolutions too, which xla_flags gives to Eigen.
YNNPACK_CONVOLUTIONS = {xla_flags.YNN_FUSION_TYPE: ','.join(xla_flags.YNN_FUSION_TYPES_XLA_DEFAULT)}


def environment() -> dict:
  """The facts every benchmark result records about where it ran."""
  device = jax.devices()[0]
  return dict(device=f'{device.platform}: {device.device_kind}', host_cpus=os.cpu_count(),
              jax_version=jax.__version__, xla_flags=os.environ.get('XLA_FLAGS', ''))


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


def timed(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def take_turns(fns: Mapping[str, Callable[[], object]], rounds: int, steps: int = 1) -> dict[str, list[float]]:
  """Seconds of each call: every round runs each function `steps` times in turn, so that all see the same
  machine state (this shared machine drifts by more than the differences measured)."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      times[name] += timed(fn, steps)
  return times


