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
  TF_CPP_MIN_LOG_LEVEL does not hide. Off, the input pipeline computes the same values on every CPU. The XLA
  flags of xla_flags.py are added to XLA_FLAGS. Where libtpu is installed on a machine without a TPU, JAX computes
  on the CPU without starting it (`hide_absent_tpu`). Where JAX computes on the CPU, freed host memory is kept for
  the next step (host_memory.py). Importing this package imports no JAX: JAX sets TF_CPP_MIN_LOG_LEVEL itself.
  """
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  hide_absent_tpu(environ)
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


def hide_absent_tpu(environ: MutableMapping[str, str], *, libtpu_installed: bool | None = None,
                    other_plugins: bool | None = None, dev: str = '/dev') -> bool:
  """Sets JAX_PLATFORMS=cpu where libtpu is installed (for the compile check, docs/tpu.md) but this machine has no
  TPU and JAX no other accelerator plugin; whether it did. JAX would otherwise start libtpu, which prints lines of
  its own before ours and finds no chip. A user's JAX_PLATFORMS wins."""
  if environ.get('JAX_PLATFORMS', '').strip():
    return False
  if libtpu_installed is None:
    libtpu_installed = importlib.util.find_spec('libtpu') is not None
  if other_plugins is None:
    other_plugins = bool(importlib.metadata.entry_points(group='jax_plugins'))
  if not libtpu_installed or other_plugins or tpu_present(dev):
    return False
  environ['JAX_PLATFORMS'] = 'cpu'
  return True
