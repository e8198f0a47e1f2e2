"""Every kernel set computes the same operations, and the model package stands on jax, flax and numpy alone.

Whole models in every form against densenet.py: tests/test_forms.py."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax.model.forms import kernels


def test_kernel_sets_are_named():
  assert kernels.resolve('xla') is kernels.XLA and kernels.resolve('cpu') is kernels.CPU
  with pytest.raises(ValueError, match='Unknown kernels'):
    kernels.resolve('cuda')


@pytest.mark.parametrize('name', ['conv1x1', 'conv3x3'])
def test_each_convolution_and_its_gradients_agree_across_kernel_sets(name):
  size = 1 if name == 'conv1x1' else 3
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 5))
  kernel = jax.random.normal(jax.random.key(1), (size, size, 5, 4))
  cotangent = jax.random.normal(jax.random.key(2), (2, 6, 6, 4))

  def value_and_grads(conv):
    out, vjp = jax.vjp(conv, x, kernel)
    return out, vjp(cotangent)

  expected = value_and_grads(getattr(kernels.XLA, name))
  got = value_and_grads(getattr(kernels.CPU, name))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, expected)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (2, 9, 10, 3)])
def test_max_pooling_and_its_gradient_agree_across_kernel_sets_with_ties(shape):
  # ReLU outputs tie at 0: each window's gradient must reach the same element (autodiff's: the first maximum).
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), shape)))
  expected_y, expected_vjp = jax.vjp(kernels.XLA.stem_pool, x)
  got_y, got_vjp = jax.vjp(kernels.CPU.stem_pool, x)
  cotangent = jax.random.normal(jax.random.key(1), expected_y.shape)
  np.testing.assert_array_equal(got_y, expected_y)
  np.testing.assert_allclose(got_vjp(cotangent)[0], expected_vjp(cotangent)[0], rtol=1e-6, atol=1e-6)
  assert np.sum(np.asarray(x) == 0) > x.size // 4  # The ties are there.


def test_the_gradient_barrier_is_the_identity_with_its_gradient_kept_whole():
  x = jax.random.normal(jax.random.key(0), (3, 4))
  loss = lambda hook: lambda x: jnp.sum(jnp.sin(hook(x)) * hook(x))
  np.testing.assert_array_equal(kernels.gradient_barrier(x), x)
  np.testing.assert_allclose(jax.grad(loss(kernels.gradient_barrier))(x), jax.grad(loss(lambda v: v))(x), rtol=1e-6)
  # The barrier sits on the gradient, where XLA:CPU would otherwise fuse its sum into every consumer.
  assert 'optimization_barrier' in str(jax.make_jaxpr(jax.grad(loss(kernels.gradient_barrier)))(x))
  assert 'optimization_barrier' not in str(jax.make_jaxpr(loss(kernels.gradient_barrier))(x))


def test_the_matmul_convolution_refuses_other_kernels():
  with pytest.raises(ValueError, match=r'\(1, 1, in, out\) kernel'):
    kernels.matmul_conv1x1(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)))


def test_the_model_package_imports_no_tensorflow_optax_or_orbax():
  code = ('import sys; import densenet_jax.model, densenet_jax.summary; '
          'bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "optax", "orbax", "torch")); '
          'print(bad); sys.exit(1 if bad else 0)')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_model_computes_the_same_whatever_xla_flags_hold():
  # The model reads no environment: a process without the entry points' XLA flags computes the same logits.
  code = ('import numpy as np, jax; from densenet_jax import model; '
          'm = model.cifar_densenet(10, 4, bottleneck=True, compression=0.5); x = np.ones((2, 8, 8, 3), np.float32); '
          'v = model.init_variables(m, jax.random.key(0), x); '
          'print(repr(np.asarray(m.apply(v, x * 0.5)).round(5).tolist()))')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  outputs = []
  for flags in ('', os.environ.get('XLA_FLAGS', '')):
    env = {**os.environ, 'XLA_FLAGS': flags}
    result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    outputs.append(result.stdout)
  assert outputs[0] == outputs[1]
