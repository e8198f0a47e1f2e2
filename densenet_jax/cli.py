"""What the commands (densenet_jax/commands/) share: flags, logging, multi-process start, and the table of failures
that end a run with one paragraph and an exit code.

The commands start through densenet_jax.launch, which calls `densenet_jax.platform.prepare_environment()` before
this module and the libraries it imports are loaded.
"""

from __future__ import annotations

import gc
import inspect
import logging as python_logging
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
from absl import app, flags, logging

from densenet_jax import config as config_lib
from densenet_jax import data, model
from densenet_jax.io import checkpoints, cloud, lock, workdir
from densenet_jax.platform import launchers
from densenet_jax.training import steps, stopping

T = TypeVar('T')

flags.DEFINE_integer('heartbeat_timeout', 100, 'Multi-process runs: seconds after which the other processes end a '
                     'run whose process stopped answering (killed, its host lost); a rerun resumes.', lower_bound=1)

# Failures the user can act on: one paragraph and an exit code, no traceback. 2: fix the input; 1: the run
# stopped (its complete checkpoints are kept).
FAILURES: dict[type[BaseException], tuple[str, int]] = {  # the first class that matches gives the label
    lock.WorkdirBusy: ('Workdir in use', 2),
    launchers.LaunchError: ('Launch error', 2),  # a multi-process launch that cannot start (docs/multihost.md)
    cloud.CloudStorageError: ('Cloud storage error', 2),  # gs://: no package, credentials, bucket or permission
    config_lib.ConfigError: ('Config error', 2),
    model.WeightMismatchError: ('Weights do not fit', 2),  # an evaluated or init_from checkpoint of another model
    steps.TrainingDiverged: ('Training stopped', 1),
    FileNotFoundError: ('Error', 2),  # A dataset not prepared, a missing image folder, checkpoint or init_from.
    data.DataError: ('Data error', 2),  # an image folder without images, a bad image file (BadImageError)
    checkpoints.CheckpointWriteError: ('Checkpoint error', 1),
    workdir.DiskFullError: ('Disk full', 1),
    checkpoints.CheckpointCorruptError: ('Checkpoint error', 1),
}


def keep_accelerators_for_jax() -> None:
  """TensorFlow only feeds the host: it must not reserve GPU memory that JAX needs. Call before TF starts."""
  try:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
  except ImportError:
    return
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError as error:
    logging.warning('Could not hide GPUs from TensorFlow (its devices were already initialized): %s', error)


def show_only_own_info_logs() -> None:
  """Keeps every library's warnings and errors on the console, but only this project's INFO lines."""
  package = os.path.dirname(os.path.abspath(__file__))

  def own_or_important(record: python_logging.LogRecord) -> bool:
    if _reported_disk_full(record):
      return False
    return record.levelno >= python_logging.WARNING or os.path.abspath(record.pathname).startswith(package + os.sep)

  logging.get_absl_handler().addFilter(own_or_important)


def _reported_disk_full(record: python_logging.LogRecord) -> bool:
  """An error that orbax logs, with its traceback, from its writer threads when the disk is full, or that asyncio
  logs for orbax's write tasks that nobody awaits once the save has failed: the main thread gets the same error and
  the run reports it in one paragraph (FAILURES)."""
  if f'{os.sep}orbax{os.sep}' not in record.pathname and record.name != 'asyncio':
    return False
  error = record.exc_info[1] if record.exc_info else None
  return ((error is not None and checkpoints.is_disk_full(error))
          or checkpoints.is_disk_full(RuntimeError(record.getMessage())))


def _innermost(error: BaseException) -> BaseException:
  """The original error behind the wrappers of absl and ml_collections."""
  seen = set()
  while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return error


def _config_error(message: str) -> None:
  print(f'Config error: {message}', file=sys.stderr)
  sys.exit(2)


def config_folder_on_path(argv: list[str]) -> None:
  """Lets a --config file import the files beside it, as configs/cifar10.py does (`from configs import ...`).

  `python train.py` finds them because the script's folder, the checkout's root, comes first on sys.path. A console
  script starts from its bin folder and the config files are not installed, so when the folder of the --config
  file is a package (it holds an __init__.py), its parent goes first on sys.path.
  """
  for i, arg in enumerate(argv[1:], start=1):
    if arg == '--':
      break
    name, has_value, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or name != 'config':
      continue
    if not has_value:  # --config PATH
      value = argv[i + 1] if i + 1 < len(argv) else ''
    folder = os.path.dirname(os.path.abspath(value.split(':', 1)[0]))  # PATH[:ARGUMENT]
    parent = os.path.dirname(folder)
    if value and os.path.isfile(os.path.join(folder, '__init__.py')) and parent not in sys.path:
      sys.path.insert(0, parent)


def parse_flags(argv: list[str]) -> list[str]:
  """Flags parser for absl's app.run: every mistake in the flags or the config file (a missing or broken file, a
  wrong ':ARGUMENT', a value of the wrong type, an override of a field the config lacks such as
  --config.batch_sise=3) prints one paragraph and exits with code 2, like every config error."""
  config_folder_on_path(argv)
  argv, unset = without_none_overrides(argv)
  try:
    remaining = flags.FLAGS(argv)
    config = flags.FLAGS.config if 'config' in flags.FLAGS else None
    if config is not None:
      config.keys()  # ml_collections defers a missing file's error to the first use: report it here.
      for path in unset:
        *parents, field = path.split('.')
        node = config
        for parent in parents:
          node = node[parent]
        node[field] = None
    return remaining
  except flags.Error as error:  # A malformed flag value, or an error raised by the config file's get_config.
    inner, lines = _innermost(error), str(error).strip().splitlines()
    detail = lines[0] if lines else type(error).__name__
    if inner is not error and str(inner).strip() not in detail:
      detail += f' ({type(inner).__name__}: {str(inner).strip()})'
    _config_error(f'{detail} Pass --helpshort or --helpfull to see the flags.')
  except (AttributeError, KeyError) as error:
    field_error = _unknown_field(error, argv)
    if field_error is None:
      raise
    _config_error(field_error)
  except (OSError, SyntaxError, ImportError, TypeError, ValueError) as error:
    inner = _innermost(error)
    where = f' ({inner.filename}, line {inner.lineno})' if isinstance(inner, SyntaxError) else ''
    text = ' '.join(str(inner).split())  # one paragraph
    _config_error(f'could not load the config file: {type(inner).__name__}: {text}{where}. Check the '
                  '--config=FILE[:ARGUMENT] path and the file.')


def without_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """argv without its `--config.FIELD=None` overrides, and those fields. ml_collections parses an override with
  the field's type (int('None') fails), so parse_flags sets these fields to None itself, after the config loads."""
  kept, unset = [], []
  for arg in argv:
    name, _, value = arg.partition('=')
    if name.startswith('--config.') and value == 'None':
      unset.append(name[len('--config.'):])
    else:
      kept.append(arg)
  return kept, unset


def _unknown_field(error: BaseException, argv: list[str]) -> str | None:
  """The message for an override of a field the config lacks, or None if `error` is something else."""
  # ml_collections rejects the unknown field while parsing, as KeyError("'name'\nDid you mean ...").
  text = error
  while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError(message))
    text = text.args[0]
  match = re.match(r"\W*(\w+)'?\s*(Did you mean .*)?", str(text), re.DOTALL)
  if match is None:
    return None
  field, hint = match.group(1), match.group(2)
  overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
  culprit = next((arg for arg in overrides if field in arg[len('--config.'):].split('.')), None)
  if culprit is None:
    return None
  hint = f' {hint.strip()}' if hint else ''
  return (f'{culprit}: the config has no field {field!r}.{hint} The fields, with their meaning, are listed in '
          'densenet_jax/config.py.')


def start(argv: list[str], *, positional: bool = False) -> None:
  """The common start of main(): no positional arguments (unless `positional`), quiet logs, TF off the GPUs,
  distributed JAX."""
  stopping.install()  # again: absl's app.run may have replaced the SIGINT handler
  if len(argv) > 1 and not positional:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  show_only_own_info_logs()
  # For the whole run, not only around a save: an asynchronous save fails in orbax's background thread, and the
  # late wake-ups can come before the main thread learns of the failure. These two hooks are where native threads'
  # errors go (threading.excepthook only sees threading.Thread's).
  sys.excepthook = without_late_wake_ups(sys.excepthook)
  sys.unraisablehook = unraisable_without_late_wake_ups(sys.unraisablehook)
  keep_accelerators_for_jax()
  run_reporting_failures(start_processes)


def start_processes() -> None:
  """JAX's distributed runtime where a launcher started several processes (platform/launchers.py); process 0
  says what the run is made of."""
  launch = launchers.detect()
  launchers.start_distributed(launch, heartbeat_timeout_seconds=flags.FLAGS.heartbeat_timeout)
  if launch is not None:
    if jax.process_index() == 0:
      logging.info('One run of %d processes with %d devices (%d per process), started by %s.', jax.process_count(),
                   jax.device_count(), jax.local_device_count(), launch.launcher)


def is_late_wake_up(value: BaseException | None, tb) -> bool:
  """Whether `value` is a write's completion waking an asyncio loop that orbax already closed.

  tensorstore finishes writes in its own threads and wakes orbax's asyncio loop with call_soon_threadsafe. When a
  save fails (a full disk), orbax closes the loop while other writes are still under way; each of them then
  prints a RuntimeError traceback from that native thread, through sys.excepthook or, from a tensorstore future's
  done callback, through sys.unraisablehook. The failure itself reaches the main thread.
  """
  return (isinstance(value, RuntimeError) and str(value) == 'Event loop is closed' and tb is not None
          and tb.tb_frame.f_code.co_name == 'call_soon_threadsafe')  # called from native code: no caller frame


def without_late_wake_ups(hook: Callable) -> Callable:
  """`hook` (sys.excepthook, which native threads' uncaught errors go to) silent for is_late_wake_up errors."""

  def excepthook(exc_type, value, tb):
    if not is_late_wake_up(value, tb):
      hook(exc_type, value, tb)

  return excepthook


def unraisable_without_late_wake_ups(hook: Callable) -> Callable:
  """`hook` (sys.unraisablehook) silent for is_late_wake_up errors."""

  def unraisablehook(unraisable):
    if not is_late_wake_up(unraisable.exc_value, unraisable.exc_traceback):
      hook(unraisable)

  return unraisablehook


def run_reporting_failures(job: Callable[[], T]) -> T:
  """`job()`, with every failure of FAILURES printed as one paragraph and ended with its exit code."""
  try:
    return job()
  except tuple(FAILURES) as error:
    label, exit_code = next(v for k, v in FAILURES.items() if isinstance(error, k))
    print(f'{label}: {error}', file=sys.stderr)
    close_abandoned_coroutines()
    sys.exit(exit_code)
  except Exception:
    # Also where another process died first: this one's next collective fails. The others end when they miss
    # this process's heartbeats (--heartbeat_timeout).
    if jax.process_count() > 1:
      print(f'Process {jax.process_index()} of this {jax.process_count()}-process run stopped on the error that '
            'follows. Run the same command again on every host: it resumes from the last checkpoint.',
            file=sys.stderr)
    raise


def close_abandoned_coroutines() -> None:
  """Closes every coroutine of this process that was created and never started.

  For a run that ends with a failure: a save that fails part-way abandons its other writes, orbax's coroutines,
  created and never awaited. Nothing will run them once the process ends, and left to the interpreter's exit each
  prints a RuntimeWarning after the failure's paragraph; closed, they print nothing. A warnings filter for that
  RuntimeWarning would not hold: the coroutines that live to the interpreter's exit are destroyed after the
  warnings module, and CPython then applies the filter list it last read, which a library's `catch_warnings` can
  leave as a copy without the filter (seen with flax imported).
  """
  for obj in gc.get_objects():
    # The type itself: isinstance would ask some lazy modules' proxies for their class, which can warn.
    if type(obj) is types.CoroutineType and inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
      obj.close()


def format_metrics(metrics: dict[str, Any]) -> str:
  return ' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in metrics.items())


def main(main_function: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """app.run of a command's `main_function` on `argv` (default: sys.argv), with the config-aware flags parser.

  absl's usage text is the __main__ module's docstring and --helpshort lists the flags that module defined, but
  __main__ is only the script that started the command (train.py, a console script's wrapper): both come from the
  command's module instead.
  """
  command = sys.modules[main_function.__module__]
  sys.modules['__main__'].__doc__ = command.__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(command):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main_function, argv=None if argv is None else list(argv), flags_parser=parse_flags)
