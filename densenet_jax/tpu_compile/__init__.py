"""Deviceless TPU compile check: does a config's train step fit a TPU topology, and how fast could it run?

    python -m densenet_jax.tpu_compile --config=configs/imagenet_121.py --topology=v5p:4x4x4   # or densenet-tpu-compile

Compiles the real train and eval steps of a config for a TPU topology on a machine without TPUs, with libtpu's
compile-only devices (`pip install -r requirements-tpu.txt`), and reports per-chip memory against the chip's HBM,
FLOPs and bytes per step, a roofline, and the cross-device collectives (docs/tpu.md). check.py is the library,
hlo.py reads the compiled program, specs.py holds the chips' published figures, densenet_jax/commands/tpu_compile.py
is the command. This package file imports nothing: densenet_jax.launch imports it (and `python -m` runs it) before
JAX, which reads its platforms when it is imported, after `set_environment`.
"""

import os

# Set before JAX is imported: the CPU is the only real backend (the TPU devices are compile-only), no GCE metadata
# queries, and no contention for /tmp/libtpu_lockfile with other JAX processes of this machine.
ENVIRONMENT = {'JAX_PLATFORMS': 'cpu', 'TPU_SKIP_MDS_QUERY': '1', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}


def set_environment(environ=os.environ) -> None:
  """Sets what ENVIRONMENT lists, unless already set; call it before anything imports JAX."""
  for key, value in ENVIRONMENT.items():
    environ.setdefault(key, value)
