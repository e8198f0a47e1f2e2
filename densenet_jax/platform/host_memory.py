"""How the process allocates host memory when XLA computes on the CPU: freed memory kept for the next step.

XLA:CPU allocates the buffers of every execution anew (a DenseNet train step's temporary buffer is one large block)
and frees them when the execution ends. glibc's malloc serves such large blocks with fresh pages from the kernel
and hands them back on free, so every step page-faults its whole working set in again and the kernel zeroes it, a
large share of the step's CPU time (docs/performance.md, "Host memory"). `keep_freed_memory` has glibc serve every
block from its heap and keep what is freed there for the next allocation, which is what a caching allocator does:
after the first steps no page faults, at the price that the process keeps its peak memory instead of returning it
between steps.

Only glibc's main arena can serve a large block from its heap (the other arenas' heaps are at most 64 MB and give
anything larger fresh pages), and a thread allocates from the arena glibc gave it at its first allocation. So
`keep_freed_memory` also has JAX run single-device computations on the calling thread (the main thread, main
arena) instead of dispatching them to its own threads; limiting glibc to one arena instead would serialize the
compiler's threads on its lock. It must run before JAX creates its CPU client (its first computation), which
`platform.prepare_environment` does for the entry points. It applies only where JAX will compute on the CPU (GPU and
TPU buffers are not host memory, and host-side settings were not measured there), only under glibc, and never
where the user set glibc's allocator options (`GLIBC_TUNABLES` or a `MALLOC_*` variable): theirs win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
import importlib.util
import os
from collections.abc import Mapping

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# No block from fresh pages, never a trim of the heap's top (-1 turns trimming off, mallopt(3)).
KEEP_FREED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
# glibc's defaults for the two options that hand freed blocks back to the kernel (mallopt(3)).
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024}


def user_configured(environ: Mapping[str, str]) -> bool:
  """Whether the user set glibc's allocator options through the environment."""
  return 'GLIBC_TUNABLES' in environ or any(name.startswith('MALLOC_') for name in environ)


def _accelerator_plugin_installed() -> bool:
  """Whether JAX may pick another backend than the CPU: a PJRT plugin (GPU) or libtpu is installed."""
  return bool(importlib.metadata.entry_points(group='jax_plugins')) or any(
      importlib.util.find_spec(name) is not None for name in ('jax_plugins', 'libtpu'))


def computes_on_cpu(environ: Mapping[str, str]) -> bool:
  """Whether JAX will compute on the CPU: JAX_PLATFORMS says so, or is unset and no accelerator plugin is there.

  With a plugin installed JAX may still fall back to the CPU (no device found); that case keeps glibc's defaults.
  """
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not _accelerator_plugin_installed()


@functools.cache
def glibc():
  """glibc's C library, or None under another C library (musl, macOS, Windows); looked up once (find_library
  runs ldconfig)."""
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # Only glibc has it.
  except (OSError, AttributeError, TypeError):
    return None
  return libc


def applies(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether `keep_freed_memory` changes glibc's settings here: JAX computes on the CPU, the C library is glibc,
  and the user set no allocator option."""
  return not user_configured(environ) and computes_on_cpu(environ) and glibc() is not None


def set_malloc_options(options: Mapping[int, int]) -> bool:
  """mallopt(parameter, value) for each of `options` under glibc; whether glibc took them all."""
  libc = glibc()
  return libc is not None and all(libc.mallopt(parameter, value) == 1 for parameter, value in options.items())


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
  """`KEEP_FREED`, and single-device computations run on the calling thread, where `applies`; whether it was set.

  Call before JAX's first computation: the dispatch setting takes effect when JAX creates its CPU client.
  """
  if not (applies(environ) and set_malloc_options(KEEP_FREED)):
    return False
  import jax  # pylint: disable=import-outside-toplevel  # Here: importing JAX sets TensorFlow's log level.
  jax.config.update('jax_cpu_enable_async_dispatch', False)
  return True
