"""SIGTERM and SIGINT before the first training step: exit 0 with one line, not a traceback.

Until the loop installs its own handler (which saves a checkpoint at the next step boundary), there is nothing
to save: a preemption or Ctrl-C during imports, data set-up or restore ends the process at once. SystemExit
unwinds through `finally` blocks, so the workdir lock is released. No imports beyond the standard library: the
entry points install this before TensorFlow and JAX load.
"""

from __future__ import annotations

import signal
import sys

MESSAGE = 'stopped before the first step; nothing to save'


def _stop_before_first_step(signum, frame):
  del frame
  print(f'Received {signal.Signals(signum).name}: {MESSAGE}.', file=sys.stderr, flush=True)
  raise SystemExit(0)


def install() -> None:
  """Makes SIGTERM and SIGINT end the process cleanly until the training loop takes them over (main thread only)."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _stop_before_first_step)


def after_training(sig: int, handler):
  """The handler to restore when the loop gives `sig` back: Python's default instead of this module's, whose
  message would be false once steps have run (every checkpoint is written by then)."""
  if handler is _stop_before_first_step:
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
  return handler
