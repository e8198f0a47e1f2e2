"""Process-wide settings that must precede the first TensorFlow import and JAX's first computation."""

from __future__ import annotations

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
  flags of xla_flags.py are added to XLA_FLAGS. Where JAX computes on the CPU, freed host memory is kept for the
  next step (host_memory.py). Importing this package imports no JAX: JAX sets TF_CPP_MIN_LOG_LEVEL itself.
  """
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  xla_flags.set_defaults(environ)
  host_memory.keep_freed_memory(environ)
