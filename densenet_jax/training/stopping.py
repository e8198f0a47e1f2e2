"""SIGTERM and SIGINT before the first training step: exit 0 with one line, not a traceback.

Until the loop installs its own handler (which saves a checkpoint at the next step boundary), there is nothing
to save: a preemption or Ctrl-C during imports, data set-up or restore ends the process. It ends by SystemExit,
which unwinds through `finally` blocks and so releases the workdir lock. No imports beyond the standard library:
the entry points install this before TensorFlow and JAX load.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

MESSAGE = 'stopped before the first step; nothing to save'

# Code where a SystemExit would not end the process cleanly: an import turns it into an ImportError with a
# traceback; JAX's loading of its PJRT plugins (seconds with a CUDA plugin) catches every exception and goes on;
# Python reports an exception of a garbage-collection callback (JAX has one) as ignored and goes on.
SWALLOWS_SYSTEM_EXIT = frozenset({'discover_pjrt_plugins', '_xla_gc_callback'})
RETRY_S = 0.05
# How long a signal waits for such code to finish before the process leaves at once (a workdir lock left behind
# is then taken over by the next run, since its process is gone).
PATIENCE_S = 10.0


def _cannot_unwind(frame) -> bool:
  """Whether the interrupted code runs (at any depth) inside an import or a function that swallows SystemExit."""
  while frame is not None:
    code = frame.f_code
    if code.co_filename.startswith('<frozen importlib') or code.co_name in SWALLOWS_SYSTEM_EXIT:
      return True
    frame = frame.f_back
  return False


class _StopBeforeFirstStep:
  """The signal handler; where the signal lands in code that cannot unwind, it is delivered again shortly."""

  def __init__(self):
    self._waiting_since: float | None = None

  def __call__(self, signum, frame):
    cannot_unwind = _cannot_unwind(frame)
    if cannot_unwind:
      self._waiting_since = self._waiting_since or time.monotonic()
      if time.monotonic() - self._waiting_since < PATIENCE_S:
        retry = threading.Timer(RETRY_S, os.kill, (os.getpid(), signum))
        retry.daemon = True
        retry.start()
        return
    print(f'Received {signal.Signals(signum).name}: {MESSAGE}.', file=sys.stderr, flush=True)
    if cannot_unwind:
      sys.stdout.flush()
      os._exit(0)
    raise SystemExit(0)


def install() -> None:
  """Makes SIGTERM and SIGINT end the process cleanly until the training loop takes them over (main thread only)."""
  handler = _StopBeforeFirstStep()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, handler)


def after_training(sig: int, handler):
  """The handler to restore when the loop gives `sig` back: Python's default instead of this module's, whose
  message would be false once steps have run (every checkpoint is written by then)."""
  if isinstance(handler, _StopBeforeFirstStep):
    return signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
  return handler
