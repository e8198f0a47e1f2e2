"""BatchNorm statistics per group of examples (batch_norm_group_size): each group is normalized as if it ran
alone, the running averages follow the mean of the groups, and with groups on devices nothing else changes."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import config as config_lib
from densenet_jax import model as model_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(**overrides):
  return model_lib.cifar_densenet(10, 4, bottleneck=True, compression=0.5, kernels='xla', **overrides)


def images(batch=8, seed=0):
  return 1.0 + 2.0 * jax.random.normal(jax.random.key(seed), (batch, 8, 8, 3))


def train_apply(model, variables, x):
  return jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(variables, x)


def test_one_group_of_the_whole_batch_is_todays_model_exactly():
  x = images()
  variables = model_lib.init_variables(tiny(), jax.random.key(1), x)
  logits, updates = train_apply(tiny(), variables, x)
  grouped_logits, grouped_updates = train_apply(tiny(batch_norm_group_size=8), variables, x)
  np.testing.assert_array_equal(grouped_logits, logits)
  jax.tree.map(np.testing.assert_array_equal, grouped_updates, updates)


@pytest.mark.parametrize('layers_per_scan', [0, 1])
def test_each_group_is_normalized_as_if_it_ran_alone(layers_per_scan):
  options = dict(memory_efficient=bool(layers_per_scan), layers_per_scan=layers_per_scan)
  x = images()
  variables = model_lib.init_variables(tiny(), jax.random.key(1), x)
  logits, updates = train_apply(tiny(batch_norm_group_size=4, **options), variables, x)
  halves = [train_apply(tiny(**options), variables, x[i:i + 4]) for i in (0, 4)]
  np.testing.assert_allclose(logits, jnp.concatenate([h[0] for h in halves]), rtol=1e-5, atol=1e-5)
  # The running averages move towards the mean of the groups' statistics: the mean of the two runs' updates.
  expected = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), updates, expected)


def test_scanned_backward_with_groups_equals_autodiff_of_the_unrolled_model():
  x = images()
  variables = model_lib.init_variables(tiny(), jax.random.key(1), x)
  labels = jnp.arange(8) % 10

  def gradient(model):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels])
    return jax.jit(jax.grad(loss))(variables['params'])

  unrolled = gradient(tiny(batch_norm_group_size=2, memory_efficient=False, layers_per_scan=0))
  scanned = gradient(tiny(batch_norm_group_size=2, memory_efficient=True, layers_per_scan=1))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), scanned, unrolled)


FOUR_DEVICES = """
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from densenet_jax.model import cifar_densenet, init_variables
from densenet_jax.training import parallel
assert jax.device_count() == 4
tiny = functools.partial(cifar_densenet, 10, 4, bottleneck=True, compression=0.5, kernels='xla')
x = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
variables = init_variables(tiny(), jax.random.key(1), x)
mesh = parallel.create_mesh()
step = lambda model: jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']),
                             in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)))
# Groups of the per-device batch (2 examples) over a batch sharded on 4 devices...
logits, updates = step(tiny(batch_norm_group_size=2))(variables, x)
# ... equal each device's quarter run alone, and the mean of the four runs' running averages.
alone = [jax.jit(functools.partial(tiny().apply, train=True, mutable=['batch_stats']))(variables, x[i:i + 2])
         for i in range(0, 8, 2)]
np.testing.assert_allclose(logits, jnp.concatenate([a[0] for a in alone]), rtol=1e-5, atol=1e-5)
expected = jax.tree.map(lambda *u: sum(u) / 4, *[a[1] for a in alone])
jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), updates, expected)
# Whole-batch statistics differ: the groups really are separate.
global_logits, _ = step(tiny())(variables, x)
assert not np.allclose(global_logits, logits, atol=1e-3)
print('ok')
"""


def run_on_four_cpu_devices(script):
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu',
         'JAX_DISABLE_MOST_OPTIMIZATIONS': '1'}
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]


def test_groups_of_the_per_device_batch_on_four_devices_equal_each_device_alone():
  run_on_four_cpu_devices(FOUR_DEVICES)


ONE_TWO_FOUR_DEVICES = """
import functools, jax, jax.numpy as jnp, numpy as np
from densenet_jax.model import imagenet_densenet
from densenet_jax.training import optim, parallel, steps
assert jax.device_count() == 4
images = 1.0 + 2.0 * jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
batch = {'image': images, 'label': jnp.arange(8) % 5}
tx = optim.create_optimizer(lambda step: 0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
# Groups of 2 on 1, 2 and 4 devices; groups of 4 on 1 device and on 4, where each group spans 2 devices.
for group, counts in ((2, (1, 2, 4)), (4, (1, 4))):
  model = imagenet_densenet((1, 2), 4, num_classes=5, dropout_rate=0.2, batch_norm_group_size=group)
  results = []
  for count in counts:  # the real train step, the state replicated and the batch sharded as in training
    mesh = parallel.create_mesh(jax.devices()[:count])
    state = steps.create_train_state(jax.random.key(1), model, (16, 16, 3), tx)
    step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lambda step: 0.1),
                   in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh), parallel.replicated(mesh)))
    for _ in range(2):
      state, metrics = step(state, batch, jax.random.key(2))
    results.append((state.params, state.batch_stats, metrics['train_loss']))
  for other in results[1:]:
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6), other, results[0])
print('ok')
"""


def test_a_grouped_config_takes_the_same_step_on_one_two_and_four_devices():
  run_on_four_cpu_devices(ONE_TWO_FOUR_DEVICES)


@pytest.mark.parametrize('group, devices, message', [
    (5, 1, 'must divide the batch'),  # 96 examples in groups of 5
    (16, 4, 'multiple or a divisor of the per-device batch'),  # 24 per device: groups would straddle devices
])
def test_groups_that_do_not_tile_the_batch_or_the_devices_are_refused(group, devices, message):
  config = config_lib.get_config()
  config.batch_size = 96
  config.batch_norm_group_size = group
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
    from densenet_jax import data
    info = data.DatasetInfo('cifar10', 10, (32, 32, 3), 50_000, {'test': 10_000}, tuple('0123456789'))
    config_lib.validate_against_data(config, info, devices)
