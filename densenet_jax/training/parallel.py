"""Data parallelism over every device of every process: one mesh, replicated state, sharded batches."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
  """Starts jax.distributed when the environment describes a multi-process run.

  On Cloud TPU pods and SLURM/Open MPI clusters jax.distributed.initialize() finds everything itself;
  elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (as the launcher of
  tests/test_multiprocess.py does). A single-process run needs nothing.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(os.environ['JAX_NUM_PROCESSES']),
        process_id=int(os.environ['JAX_PROCESS_ID']),
    )


def create_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices`, by default all devices of all processes."""
  return Mesh(np.asarray(jax.devices() if devices is None else devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; every other axis whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global jax.Array per key."""
  sharding = batch_sharded(mesh)
  return {
      key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
      for key, value in local_batch.items()
  }
