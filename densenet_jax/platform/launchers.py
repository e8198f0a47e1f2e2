"""Which launcher started this process, and JAX's distributed runtime whenever the process is one of several.

The same command runs alone, under `mpirun`, under `srun`, on every worker of a Cloud TPU slice and in a Kubernetes
Indexed Job: `detect` reads what each launcher leaves in the environment and `start_distributed` calls
jax.distributed.initialize() only where there are other processes to meet, with JAX's own detection of that
launcher. A single-process run starts nothing (no coordinator, no port). docs/multihost.md has the launch commands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any

from densenet_jax.platform import environment

# Cloud TPU VMs list their slice's workers in the instance metadata (GKE sets TPU_WORKER_HOSTNAMES instead).
TPU_WORKERS_METADATA = ('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                        'worker-network-endpoints')


class LaunchError(RuntimeError):
  """The environment names a multi-process launch that cannot be started as it stands."""


@dataclasses.dataclass(frozen=True)
class Launch:
  """A multi-process launch: who started it and what jax.distributed.initialize() is given."""
  launcher: str
  process_count: int | None  # None: JAX learns it from the launcher when it starts (Kubernetes)
  initialize_options: dict[str, Any]


def detect(environ: Mapping[str, str] = os.environ, *,
           tpu_workers: Callable[[], int | None] | None = None) -> Launch | None:
  """The launch of several processes that started this one, or None for a single-process run.

  In order: explicit JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID), Open MPI's mpirun, SLURM's
  srun, a multi-host Cloud TPU slice (GKE's TPU_WORKER_HOSTNAMES, or the TPU VM's metadata: `tpu_workers`), a
  Kubernetes Indexed Job or JobSet. A launcher that started one process is a single-process run.
  """
  if environ.get('JAX_COORDINATOR_ADDRESS'):
    return _explicit(environ)
  if 'OMPI_COMM_WORLD_SIZE' in environ:
    return _open_mpi(environ)
  if 'SLURM_STEP_NUM_TASKS' in environ or 'SLURM_NTASKS' in environ:
    return _slurm(environ)
  if environ.get('TPU_WORKER_HOSTNAMES'):
    count = len(environ['TPU_WORKER_HOSTNAMES'].split(','))
    return Launch('Cloud TPU on GKE', count, dict(cluster_detection_method='gketpu')) if count > 1 else None
  if tpu_workers is None:
    tpu_workers = lambda: cloud_tpu_workers() if environment.tpu_present() else None  # noqa: E731
  if (count := tpu_workers() or 1) > 1:
    return Launch('Cloud TPU VM slice', count, dict(cluster_detection_method='gcetpu'))
  if 'JOB_COMPLETION_INDEX' in environ and 'KUBERNETES_SERVICE_HOST' in environ:
    return _kubernetes()
  return None


def _integer(environ: Mapping[str, str], name: str, launcher: str) -> int:
  try:
    return int(environ[name])
  except (KeyError, ValueError):
    raise LaunchError(f'{launcher}: {name}={environ.get(name)!r} must be set to an integer.') from None


def _explicit(environ: Mapping[str, str]) -> Launch:
  launcher = f'JAX_COORDINATOR_ADDRESS={environ["JAX_COORDINATOR_ADDRESS"]}'
  count = _integer(environ, 'JAX_NUM_PROCESSES', launcher)
  index = _integer(environ, 'JAX_PROCESS_ID', launcher)
  if not 0 <= index < count:
    raise LaunchError(f'{launcher}: JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count}).')
  return Launch('JAX_COORDINATOR_ADDRESS', count, dict(coordinator_address=environ['JAX_COORDINATOR_ADDRESS'],
                                                       num_processes=count, process_id=index))


def _open_mpi(environ: Mapping[str, str]) -> Launch | None:
  count = _integer(environ, 'OMPI_COMM_WORLD_SIZE', 'Open MPI')
  if count == 1:
    return None
  # Open MPI 4 (ORTE) names mpirun's address, where process 0's coordinator will listen; Open MPI 5 (PRRTE) does
  # not, and JAX asks MPI itself through mpi4py.
  if 'OMPI_MCA_orte_hnp_uri' not in environ and importlib.util.find_spec('mpi4py') is None:
    raise LaunchError('Open MPI 5 started this process, and JAX needs mpi4py to find the other processes under it: '
                      'pip install mpi4py (built against this Open MPI), or set JAX_COORDINATOR_ADDRESS, '
                      'JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process.')
  return Launch('Open MPI (mpirun)', count, dict(cluster_detection_method='ompi'))


def _slurm(environ: Mapping[str, str]) -> Launch | None:
  if 'SLURM_STEP_NUM_TASKS' not in environ:
    # A batch script's own shell: the job may have several tasks, but only srun starts them.
    tasks = environ.get('SLURM_NTASKS', '1')
    if tasks != '1':
      raise LaunchError(f'This SLURM job has {tasks} tasks, but this process was not started by srun, so it would '
                        'train alone. Start it with `srun python train.py ...` (one task per GPU), as in '
                        'docs/multihost.md.')
    return None
  count = _integer(environ, 'SLURM_STEP_NUM_TASKS', 'srun')
  if count == 1:
    return None
  return Launch('SLURM (srun)', count, dict(cluster_detection_method='slurm'))


def _kubernetes() -> Launch:
  if importlib.util.find_spec('kubernetes') is None:
    raise LaunchError('A Kubernetes Indexed Job started this process; JAX finds the other pods through the Kubernetes '
                      'API, which needs the `kubernetes` package: pip install kubernetes (jax[k8s]), or set '
                      'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the pod spec.')
  return Launch('Kubernetes Indexed Job', None, {})  # JAX's own detection: its Kubernetes support has no name


def cloud_tpu_workers(timeout: float = 5.0) -> int | None:
  """How many hosts this Cloud TPU VM's slice has, from the instance metadata; None where there is none."""
  request = urllib.request.Request(TPU_WORKERS_METADATA, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      endpoints = response.read().decode()
  except OSError:
    return None
  return len([e for e in endpoints.split(',') if e.strip()]) or None


def start_distributed(launch: Launch | None, *, heartbeat_timeout_seconds: int = 100) -> None:
  """jax.distributed.initialize() for a multi-process `launch`; nothing for None (a single-process run).

  A process that stops answering (killed, its host lost) is noticed by the others within
  `heartbeat_timeout_seconds`: JAX's coordination service then ends every process, instead of leaving them waiting
  in a collective for ever; a rerun of the same command resumes from the last checkpoint.
  """
  if launch is None:
    return
  import jax  # pylint: disable=import-outside-toplevel

  jax.distributed.initialize(**launch.initialize_options, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
