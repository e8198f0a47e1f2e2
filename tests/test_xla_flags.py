"""The XLA flags the entry points set, and how they combine with the user's."""

import importlib.metadata
import os

import jax
import jax.numpy as jnp

from densenet_jax import platform
from densenet_jax.platform import xla_flags

installed = importlib.metadata.version('jaxlib')


def test_the_users_flags_win_and_are_kept():
  defaults = ['--xla_cpu_use_onednn=true', '--xla_disable_hlo_passes=cse_barrier_expander']
  assert xla_flags.with_defaults('', defaults) == ' '.join(defaults)
  user = '--xla_cpu_use_onednn=false --xla_force_host_platform_device_count=4'
  assert xla_flags.with_defaults(user, defaults) == f'{user} --xla_disable_hlo_passes=cse_barrier_expander'
  # Setting the defaults twice changes nothing.
  once = xla_flags.with_defaults(user, defaults)
  assert xla_flags.with_defaults(once, defaults) == once


def test_set_defaults_writes_the_environment_it_is_given():
  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  flags = xla_flags.set_defaults(environ)
  assert environ['XLA_FLAGS'] == flags
  assert flags.split() == ['--xla_force_host_platform_device_count=2', *xla_flags.default_flags(installed)]
  assert xla_flags.set_defaults({}) == ' '.join(xla_flags.default_flags(installed))


def test_the_experimental_convolution_flag_is_set_only_for_the_jaxlib_it_was_measured_on():
  # An XLA flag that a jaxlib release does not know aborts the process at the first computation.
  # On the CPU family where it won (tests/test_cpu_family.py has the others).
  for measured in xla_flags.CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB:
    flags = xla_flags.set_defaults({}, jaxlib_version=measured, family='amd_avx2').split()
    assert flags == [xla_flags.KEEP_REMAT_ON_CPU, xla_flags.CPU_CONVOLUTIONS_ON_EIGEN]
  assert xla_flags.set_defaults({}, jaxlib_version='0.0.1', family='amd_avx2') == xla_flags.KEEP_REMAT_ON_CPU
  # A user's own choice of kernels wins.
  own = '--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE'
  measured = next(iter(xla_flags.CPU_CONVOLUTIONS_ON_EIGEN_JAXLIB))
  assert xla_flags.set_defaults({'XLA_FLAGS': own}, jaxlib_version=measured, family='amd_avx2').split() == [
      own, xla_flags.KEEP_REMAT_ON_CPU]


def test_the_tests_compile_convolutions_as_the_entry_points_do():
  kernels_on_eigen = xla_flags.CPU_CONVOLUTIONS_ON_EIGEN in os.environ['XLA_FLAGS']
  assert kernels_on_eigen == (xla_flags.CPU_CONVOLUTIONS_ON_EIGEN in xla_flags.default_flags(installed))

  def conv_then_matmul(x, kernel, weights):
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.dot(y, weights)

  x, kernel, weights = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((4, 4))
  hlo = jax.jit(conv_then_matmul).lower(x, kernel, weights).compile().as_text()
  library_fusions = [line for line in hlo.splitlines() if '__ynn_fusion' in line and ' fusion(' in line]
  if kernels_on_eigen:  # The matmul stays on YNNPACK; the convolution does not.
    assert any('dot_general' in line for line in library_fusions), hlo
    assert not any('conv_general_dilated' in line for line in library_fusions), hlo


def test_the_tests_run_with_the_entry_points_flags():
  # conftest.py sets them as train.py does, so that memory_efficient=True really rematerializes in tests.
  assert platform.remat_is_effective('cpu')
