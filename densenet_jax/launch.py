"""Where every command starts: the process set-up first, then the command's own imports.

A few settings only work before the libraries load: `platform.prepare_environment()` sets XLA_FLAGS and
TensorFlow's log variables, read when TensorFlow is imported and when JAX starts its backend; the compile check's
`compile_check.set_environment()` sets JAX_PLATFORMS, read when JAX is imported; and the handler that ends a SIGTERM
or Ctrl-C during start-up with one line (training/stopping.py) must be in place while JAX and TensorFlow load, the
slowest part of a start. `run` takes these steps in order and only then imports the command's module, so the
commands (densenet_jax/commands/) import at their top like any module. train.py, evaluate.py, predict.py, the
`python -m densenet_jax.{export,compile_check,weights}` forms and the console scripts of pyproject.toml all call one
of the functions at the bottom. This module imports nothing of the project at its top for the same reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

# Set-up steps, as 'module:function' so that their modules load only when their turn comes.
STOP_CLEANLY = 'densenet_jax.training.stopping:install'  # standard library only: loads in milliseconds
PREPARE_ENVIRONMENT = 'densenet_jax.platform:prepare_environment'
COMPILE_CHECK_ENVIRONMENT = 'densenet_jax.compile_check:set_environment'
DEFAULT_SETUP = (STOP_CLEANLY, PREPARE_ENVIRONMENT)


def _resolve(target: str) -> Callable[..., Any]:
  module, _, function = target.partition(':')
  return getattr(importlib.import_module(module), function)


def run(command: str, setup: Sequence[str] = DEFAULT_SETUP, *args: Any) -> Any:
  """Calls each function of `setup` in order, then the `command` function with `args`, and returns its result.

  Each is named 'module:function' and its module is imported only when it is called: nothing that a later step
  must precede is loaded early.
  """
  for step in setup:
    _resolve(step)()
  return _resolve(command)(*args)


# The commands, with the set-up each needs. The compile check keeps JAX on the CPU and Python's own signal handling
# (an interrupted check is not a result), and the weight converter needs no handler either: for both, exit code 0
# must mean it ran to the end.


def train() -> None:
  run('densenet_jax.commands.train:main')


def evaluate() -> None:
  run('densenet_jax.commands.evaluate:main')


def predict() -> None:
  run('densenet_jax.commands.predict:main')


def export() -> None:
  run('densenet_jax.commands.export:main')


def compile_check() -> None:
  run('densenet_jax.commands.compile_check:main', (COMPILE_CHECK_ENVIRONMENT,))


def convert(argv: Sequence[str] | None = None) -> None:
  """The weight converter on `argv` (default: the command line's arguments)."""
  run('densenet_jax.commands.convert:main', (PREPARE_ENVIRONMENT,), argv)
