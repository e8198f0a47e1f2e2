"""Host memory kept for reuse where JAX computes on the CPU: when it applies, and that steps stop page-faulting."""

import os
import subprocess
import sys

import pytest

from densenet_jax.platform import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An entry point's start, then one program whose 64 MiB output is freed after every call: the minor page faults of
# ten calls after ten warm-up calls.
_FAULTS_PER_CALLS = """
import resource
from densenet_jax import platform
platform.prepare_environment()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
double_sine = jax.jit(lambda x: jnp.sin(x) * 2)
for _ in range(10):
  double_sine(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  double_sine(x).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
_PAGES_PER_OUTPUT = 64 * 2**20 // os.sysconf('SC_PAGE_SIZE')


def _faults(environ: dict) -> int:
  env = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')}
  env.update(environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  result = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALLS], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
  return int(result.stdout.split()[-1])


@pytest.mark.skipif(not host_memory.applies({'JAX_PLATFORMS': 'cpu'}), reason='glibc only')
def test_entry_points_keep_freed_memory_for_the_next_call():
  kept = _faults({})
  defaults = _faults({'GLIBC_TUNABLES': ''})  # The user's allocator setting: glibc's defaults stay.
  # glibc's defaults fault every output page in again on every call. Kept, the calls reuse the heap's free
  # blocks; until those fit every allocation of a call the heap still grows now and then, by one output.
  assert defaults > 8 * _PAGES_PER_OUTPUT, defaults
  assert kept <= 3 * _PAGES_PER_OUTPUT, kept


@pytest.mark.parametrize('environ', [{'GLIBC_TUNABLES': ''}, {'MALLOC_ARENA_MAX': '4'},
                                     {'MALLOC_TRIM_THRESHOLD_': '0'}])
def test_the_users_allocator_options_win(environ):
  assert host_memory.user_configured(environ)
  assert not host_memory.applies({'JAX_PLATFORMS': 'cpu', **environ})
  assert not host_memory.keep_freed_memory({'JAX_PLATFORMS': 'cpu', **environ})


@pytest.mark.parametrize('platforms, on_cpu', [('cpu', True), ('cpu,cuda', True), ('cuda', False), ('tpu', False),
                                               ('cuda,cpu', False)])
def test_only_where_jax_computes_on_the_cpu(platforms, on_cpu):
  assert host_memory.computes_on_cpu({'JAX_PLATFORMS': platforms}) == on_cpu
  if not on_cpu:
    assert not host_memory.applies({'JAX_PLATFORMS': platforms})


def test_without_jax_platforms_an_installed_accelerator_plugin_decides(monkeypatch):
  monkeypatch.setattr(host_memory, '_accelerator_plugin_installed', lambda: True)
  assert not host_memory.computes_on_cpu({})
  monkeypatch.setattr(host_memory, '_accelerator_plugin_installed', lambda: False)
  assert host_memory.computes_on_cpu({})
