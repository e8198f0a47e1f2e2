"""The XLA flags the entry points set, and how they combine with the user's."""

from densenet_jax import memory, xla_flags


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
  assert flags == '--xla_force_host_platform_device_count=2 --xla_disable_hlo_passes=cse_barrier_expander'
  assert xla_flags.set_defaults({}) == xla_flags.KEEP_REMAT_ON_CPU


def test_the_tests_run_with_the_entry_points_flags():
  # conftest.py sets them as train.py does, so that memory_efficient=True really rematerializes in tests.
  assert memory.remat_is_effective('cpu')
