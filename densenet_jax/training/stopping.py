"""SIGTERM and SIGINT before the first training step: exit 0 with one line, not a traceback.

Until the loop installs its own handler (which saves a checkpoint at the next step boundary), there is nothing
to save: a preemption or Ctrl-C during imports, data set-up or restore ends the process at once. SystemExit
unwinds through `finally` blocks, so the workdir lock is released. No imports beyond the standard library: the
entry points install this before TensorFlow and JAX load.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

MESSAGE = 'stopped before the first step; nothing to save'


# Functions of other packages that catch every exception of the code they call, SystemExit included: JAX's loading
# of its PJRT plugins (a CUDA plugin spends seconds there loading NVIDIA's libraries) logs it and goes on.
SWALLOWS_SYSTEM_EXIT = frozenset({'discover_pjrt_plugins'})
# JAX's garbage-collection callback: Python reports an exception raised there as ignored and goes on; it is brief.
GC_CALLBACKS = frozenset({'_xla_gc_callback'})


def _inside(frame, matches) -> bool:
  """Whether the interrupted code runs inside a function whose code object `matches` (at any depth)."""
  while frame is not None:
    if matches(frame.f_code):
      return True
    frame = frame.f_back
  return False


def _cannot_unwind(frame) -> bool:
  """Whether a SystemExit raised in the interrupted code would not end the process cleanly: inside an import
  (it would become an ImportError with a traceback) or inside a function that swallows it."""
  return _inside(frame, lambda code: (code.co_filename.startswith('<frozen importlib')
                                      or code.co_name in SWALLOWS_SYSTEM_EXIT))


def _stop_before_first_step(signum, frame):
  if _inside(frame, lambda code: code.co_name in GC_CALLBACKS):
    # Deliver the signal again once the callback is over, where the SystemExit unwinds (and releases the lock).
    threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
    return
  print(f'Received {signal.Signals(signum).name}: {MESSAGE}.', file=sys.stderr, flush=True)
  if _cannot_unwind(frame):
    # Nothing of ours is held there (a workdir lock left behind is taken over by the next run): leave at once.
    sys.stdout.flush()
    os._exit(0)
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
