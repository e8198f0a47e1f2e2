"""Multi-process runs as launchers start them: which launcher a process finds, and train.py under each of them."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from densenet_jax.io import checkpoints
from densenet_jax.platform import launchers
from densenet_jax.training import reporting
from test_train_processes import ROOT, TINY, assert_same_params, params_of, run_train

NO_TPU = dict(tpu_workers=lambda: None)


# ----------------------------------------------------------------------------------------------
# What each launcher leaves in the environment.


def test_a_process_started_alone_starts_no_distributed_runtime():
  assert launchers.detect({'PATH': '/usr/bin'}, **NO_TPU) is None
  assert launchers.detect({'OMPI_COMM_WORLD_SIZE': '1', 'OMPI_MCA_orte_hnp_uri': 'x'}, **NO_TPU) is None
  assert launchers.detect({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1'}, **NO_TPU) is None  # sbatch, one task
  assert launchers.detect({'SLURM_JOB_ID': '7', 'SLURM_STEP_NUM_TASKS': '1', 'SLURM_NTASKS': '1'}, **NO_TPU) is None
  assert launchers.detect({'TPU_WORKER_HOSTNAMES': 'localhost'}, **NO_TPU) is None  # a single-host GKE slice
  assert launchers.detect({}, tpu_workers=lambda: 1) is None  # a single-host TPU VM


@pytest.mark.parametrize('environ, launcher, count', [
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'},
     'JAX_COORDINATOR_ADDRESS', 4),
    ({'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '1', 'OMPI_COMM_WORLD_LOCAL_RANK': '1',
      'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.0.0.1:34911'}, 'Open MPI (mpirun)', 2),
    ({'SLURM_JOB_ID': '7', 'SLURM_STEP_NUM_TASKS': '8', 'SLURM_NTASKS': '8', 'SLURM_PROCID': '5',
      'SLURM_LOCALID': '1', 'SLURM_STEP_NODELIST': 'gpu[01-02]'}, 'SLURM (srun)', 8),
    ({'TPU_WORKER_HOSTNAMES': 'w-0,w-1,w-2,w-3', 'TPU_WORKER_ID': '2'}, 'Cloud TPU on GKE', 4),
])
def test_each_launcher_is_recognized_with_its_process_count(environ, launcher, count):
  launch = launchers.detect(environ, **NO_TPU)
  assert (launch.launcher, launch.process_count) == (launcher, count)


def test_a_tpu_vm_slice_is_recognized_from_its_workers():
  launch = launchers.detect({}, tpu_workers=lambda: 16)
  assert (launch.launcher, launch.process_count, launch.initialize_options) == ('Cloud TPU VM slice', 16, {'cluster_detection_method': 'gcetpu'})


@pytest.mark.parametrize('environ, message', [
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_PROCESS_ID': '0'}, 'JAX_NUM_PROCESSES=None must be set'),
    ({'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'}, r'must be in \[0, '),
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '4'}, 'not started by srun'),
    ({'OMPI_COMM_WORLD_SIZE': 'two'}, 'OMPI_COMM_WORLD_SIZE'),
])
def test_a_launch_that_cannot_start_says_what_to_do(environ, message):
  with pytest.raises(launchers.LaunchError, match=message):
    launchers.detect(environ, **NO_TPU)


def test_open_mpi_5_and_kubernetes_need_the_package_jax_asks(monkeypatch):
  real_find_spec = launchers.importlib.util.find_spec
  monkeypatch.setattr(launchers.importlib.util, 'find_spec',
                      lambda name: None if name in ('mpi4py', 'kubernetes') else real_find_spec(name))
  ompi5 = {'OMPI_COMM_WORLD_SIZE': '2', 'OMPI_COMM_WORLD_RANK': '0', 'OMPI_COMM_WORLD_LOCAL_RANK': '0'}
  with pytest.raises(launchers.LaunchError, match='pip install mpi4py'):
    launchers.detect(ompi5, **NO_TPU)
  with pytest.raises(launchers.LaunchError, match='pip install kubernetes'):
    launchers.detect({'JOB_COMPLETION_INDEX': '0', 'KUBERNETES_SERVICE_HOST': '10.0.0.1'}, **NO_TPU)


# ----------------------------------------------------------------------------------------------
# train.py under real launchers on this machine: two processes of one CPU device each.

FLAGS = ('--config.num_epochs=1', '--config.lr_boundaries_epochs=(0.5,)')


def require_mpirun():
  """Open MPI's mpirun (Debian: openmpi-bin, which .ci/run installs); CI must have it, elsewhere it may lack."""
  if shutil.which('mpirun') is None:
    if os.environ.get('CI'):
      pytest.fail('mpirun is missing: apt-get install openmpi-bin (as .ci/run does).')
    pytest.skip('mpirun is not installed (apt-get install openmpi-bin)')


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(launcher, workdir, *flags, extra=()):
  """The processes of a 2-process run of train.py as `launcher` starts them."""
  command = [sys.executable, 'train.py', f'--workdir={workdir}', *TINY, *flags, *extra]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COORDINATOR_PORT': str(free_port())}
  if launcher == 'mpirun':
    command = ['mpirun', '--allow-run-as-root', '--oversubscribe', '-np', '2', '-x', 'JAX_PLATFORMS',
               '-x', 'JAX_COORDINATOR_PORT', *command]
    ranks = [{}]
  elif launcher == 'srun':  # the variables srun sets for the 2 tasks of a one-node step
    ranks = [dict(SLURM_JOB_ID='4242', SLURM_STEP_ID='0', SLURM_STEP_NUM_TASKS='2', SLURM_NTASKS='2',
                  SLURM_STEP_NODELIST='localhost', SLURM_PROCID=str(i), SLURM_LOCALID=str(i)) for i in range(2)]
  else:
    ranks = [dict(JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{env["JAX_COORDINATOR_PORT"]}', JAX_NUM_PROCESSES='2',
                  JAX_PROCESS_ID=str(i)) for i in range(2)]
  return [subprocess.Popen(command, cwd=ROOT, env={**env, **rank}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for rank in ranks]


def finish(processes, timeout=600):
  outputs = [p.communicate(timeout=timeout)[0] for p in processes]
  for process, output in zip(processes, outputs):
    assert process.returncode == 0, output[-3000:]
  return '\n'.join(outputs)


def test_two_processes_under_each_launcher_train_like_one(tmp_path):
  require_mpirun()
  run_train(tmp_path / 'single', *FLAGS, env={'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})
  for launcher in ('mpirun', 'srun', 'explicit'):
    workdir = tmp_path / launcher
    output = finish(start(launcher, workdir, *FLAGS))
    assert output.count('One run of 2 processes with 2 devices') == 1, output[-3000:]
    records = reporting.read_metrics(str(workdir))  # one metrics.jsonl, written by process 0
    assert [r['step'] for r in records if 'eval_loss' in r] == [11], launcher
    assert [r['step'] for r in records if 'train_loss' in r] == list(range(1, 12)), launcher
    assert_same_params(params_of(tmp_path / 'single'), params_of(workdir), rtol=1e-3, atol=1e-5)


def wait_for_step(workdir, step, processes, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in processes):
    if any(r.get('step', 0) >= step for r in reporting.read_metrics(str(workdir)) if 'train_loss' in r):
      return
    time.sleep(0.05)
  raise AssertionError(f'the run did not reach step {step}')


def rank_pids(mpirun):
  """The pids of mpirun's two train.py processes."""
  children = subprocess.run(['pgrep', '-P', str(mpirun.pid)], capture_output=True, text=True).stdout.split()
  assert len(children) == 2, children
  return [int(pid) for pid in children]


def test_sigterm_to_one_rank_saves_for_all_and_a_rerun_resumes(tmp_path):
  require_mpirun()
  flags = ('--config.num_epochs=2', '--config.lr_boundaries_epochs=(1,)', '--config.checkpoint_every_epochs=100')
  workdir = tmp_path / 'run'
  [mpirun] = start('mpirun', workdir, *flags)
  wait_for_step(workdir, 3, [mpirun])
  os.kill(rank_pids(mpirun)[1], signal.SIGTERM)  # the preemption notice of one host
  finish([mpirun])
  stopped_at = checkpoints.Checkpointer(str(workdir / 'checkpoints'), keep=3).latest_step()
  assert stopped_at is not None and stopped_at < 22, 'the run was not interrupted'
  output = finish(start('mpirun', workdir, *flags))
  assert 'Resumed from' in output and 'step=22' in output, output[-3000:]


def test_a_killed_process_ends_the_others_in_bounded_time_and_a_rerun_resumes(tmp_path):
  flags = ('--config.num_epochs=2', '--config.lr_boundaries_epochs=(1,)', '--config.checkpoint_every_epochs=1')
  workdir = tmp_path / 'run'
  processes = start('explicit', workdir, *flags, extra=('--heartbeat_timeout=10',))
  wait_for_step(workdir, 13, processes)  # past the first epoch's checkpoint
  processes[1].kill()  # no launcher watches these two: only JAX's heartbeats tell process 0
  killed_at = time.time()
  output = processes[0].communicate(timeout=120)[0]
  assert processes[0].returncode != 0 and time.time() - killed_at < 90
  # The survivor learns of the death twice at once: a collective fails in Python (our paragraph is printed), and
  # JAX's coordination client aborts the process from its own thread. On a busy machine the abort can come first.
  reached_python = 'Process 0 of this 2-process run stopped' in output
  assert reached_python or processes[0].returncode == -signal.SIGABRT, output[-3000:]
  output = finish(start('explicit', workdir, *flags))
  assert 'Resumed from' in output and 'step=22' in output, output[-3000:]
