"""Process-wide settings that must precede the first TensorFlow import and JAX's first computation."""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
from collections.abc import MutableMapping

from densenet_jax.platform import host_memory, xla_flags


def prepare_environment(environ: MutableMapping[str, str] = os.environ) -> None:
  """Sets up the process for the entry points; call it before TensorFlow is imported and before JAX computes.

  TensorFlow's C++ INFO and WARNING lines (CPU features) are hidden unless the user set TF_CPP_MIN_LOG_LEVEL.
  TensorFlow's oneDNN operations are off unless the user set TF_ENABLE_ONEDNN_OPTS: TensorFlow only feeds the
  host here (decoding, cropping, flipping), which they do not speed up, and on the CPUs where TensorFlow turns
  them on by default (AVX-512 with VNNI, among them) it announces them on stderr in a line that
  TF_CPP_MIN_LOG_LEVEL does not hide. Off, the input pipeline computes the same values on every CPU. Where libtpu
  or JAX's CUDA plugin is installed (for the compile check) on a machine without that accelerator, JAX computes on
  the CPU without starting them (`hide_absent_accelerators`). Where JAX computes on the CPU, the XLA:CPU flags of
  xla_flags.py are added to XLA_FLAGS (only there: XLA:GPU and XLA:TPU refuse memory_efficient's programs compiled
  with them) and freed host memory is kept for the next step (host_memory.py). Importing this package imports no
  JAX: JAX sets TF_CPP_MIN_LOG_LEVEL itself.
  """
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  hide_absent_accelerators(environ)
  if host_memory.computes_on_cpu(environ):
    xla_flags.set_defaults(environ)
  host_memory.keep_freed_memory(environ)


def tpu_present(dev: str = '/dev') -> bool:
  """Whether this machine has a TPU: the device files of TPU VMs (/dev/accel*, or /dev/vfio/<n> on v5p and later)."""
  return bool(glob.glob(f'{dev}/accel*')) or any(name.isdigit() for name in _listdir(f'{dev}/vfio'))


def _listdir(path: str) -> list[str]:
  try:
    return os.listdir(path)
  except OSError:
    return []


def gpu_present(dev: str = '/dev') -> bool:
  """Whether this machine has an NVIDIA GPU: the driver's device files /dev/nvidia0, /dev/nvidia1, ..."""
  return any(name.removeprefix('nvidia').isdigit() for name in _listdir(dev) if name.startswith('nvidia'))


CUDA_PLUGINS = ('xla_cuda12', 'xla_cuda13')  # JAX's CUDA plugins' names among the 'jax_plugins' entry points


def hide_absent_accelerators(environ: MutableMapping[str, str], *, libtpu_installed: bool | None = None,
                             plugins: tuple[str, ...] | None = None, dev: str = '/dev') -> bool:
  """Sets JAX_PLATFORMS=cpu where libtpu or a CUDA plugin is installed (for the compile check: docs/tpu.md,
  docs/gpu.md) but none of their accelerators is in this machine, and no other plugin is installed; whether it
  did. JAX would otherwise start them: libtpu prints lines of its own before ours, the CUDA plugin a traceback,
  and both find no device. A user's JAX_PLATFORMS wins."""
  if environ.get('JAX_PLATFORMS', '').strip():
    return False
  if libtpu_installed is None:
    libtpu_installed = importlib.util.find_spec('libtpu') is not None
  if plugins is None:
    plugins = tuple(entry.name for entry in importlib.metadata.entry_points(group='jax_plugins'))
  if not (libtpu_installed or plugins) or any(p not in CUDA_PLUGINS for p in plugins):
    return False  # nothing to hide, or a plugin this function does not know: JAX chooses
  if (libtpu_installed and tpu_present(dev)) or (plugins and gpu_present(dev)):
    return False
  environ['JAX_PLATFORMS'] = 'cpu'
  return True
