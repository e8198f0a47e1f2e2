"""Deviceless compile check: does a config's train step fit a TPU slice or NVIDIA GPUs, and how fast could it run?

    densenet-compile-check --config=configs/imagenet_121.py --topology=v5p:4x4x4
    densenet-compile-check --config=configs/imagenet_161.py --gpu=rtx4090 [--max_batch]

(`python -m densenet_jax.compile_check` is the same command.)

Compiles the real train and eval steps of a config on a machine without the accelerator, with compile-only devices
of libtpu (requirements-tpu.txt) or of JAX's CUDA plugin (requirements-gpu.txt), and reports per chip or GPU memory
against the device's, FLOPs and bytes per step, a roofline, kernels and cross-device collectives (docs/tpu.md,
docs/gpu.md). targets.py makes the devices, check.py compiles and analyzes, hlo.py reads the compiled program,
specs.py holds the devices' published figures (gpu_targets/ XLA:GPU's descriptions of the GPUs), search.py finds the
largest batch that fits; densenet_jax/commands/compile_check.py is the command. This package file imports nothing:
densenet_jax.launch imports it (and `python -m` runs it) before JAX, which reads its platforms when it is imported,
after `set_environment`.
"""

import os

# Set before JAX is imported: the CPU is the only real backend (the TPU and GPU devices are compile-only; a CUDA
# plugin would otherwise look for a GPU), no GCE metadata queries, no contention for /tmp/libtpu_lockfile with
# other JAX processes of this machine, and TensorFlow (the dataset's facts) without its C++ log lines.
ENVIRONMENT = {'JAX_PLATFORMS': 'cpu', 'TPU_SKIP_MDS_QUERY': '1', 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1',
               'TF_CPP_MIN_LOG_LEVEL': '2', 'TF_ENABLE_ONEDNN_OPTS': '0'}


def set_environment(environ=os.environ) -> None:
  """Sets what ENVIRONMENT lists, unless already set; call it before anything imports JAX."""
  for key, value in ENVIRONMENT.items():
    environ.setdefault(key, value)
