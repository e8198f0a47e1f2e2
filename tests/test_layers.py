"""The fast primitives compute exactly what flax.linen.BatchNorm + ReLU and flax.linen.Conv compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import model as model_lib
from densenet_jax.model import layers
from densenet_jax.model.forms import blocks


def feature_maps(sizes=(5, 3, 3), seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  # Non-zero means and unequal scales, so that a wrong statistic shows.
  return [2.0 + (i + 1) * jax.random.normal(k, (4, 6, 6, c)) for i, (k, c) in enumerate(zip(keys, sizes))]


class Reference(nn.Module):
  """The textbook version: concatenate, nn.BatchNorm, ReLU."""

  @nn.compact
  def __call__(self, features, train):
    x = jnp.concatenate(features, axis=-1)
    return nn.relu(nn.BatchNorm(momentum=0.9, epsilon=1e-5, name='norm')(x, use_running_average=not train))


class Fast(nn.Module):
  """The faster forms' BatchNorm-ReLU: blocks.BatchNormVariables and blocks.batch_norm_relu."""

  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features, train, batch_moments=None):
    norm = blocks.BatchNormVariables(sum(f.shape[-1] for f in features), name='norm')
    return blocks.batch_norm_relu(norm, features, train, epsilon=self.epsilon, dtype=self.dtype,
                                  batch_moments=batch_moments)


class Readable(nn.Module):
  """densenet.py's BatchNorm-ReLU: layers.BatchNorm."""

  @nn.compact
  def __call__(self, features, train, batch_moments=None):
    del batch_moments  # It computes its own.
    return nn.relu(layers.BatchNorm(name='norm')(jnp.concatenate(features, axis=-1), train))


def unbiased_running(variables, features):
  """The running statistics flax's BatchNorm would keep with the unbiased batch variance (PyTorch's rule)."""
  x = np.concatenate([np.asarray(f, np.float64) for f in features], axis=-1).reshape(-1, sum(f.shape[-1] for f in features))
  stats = variables['batch_stats']['norm']
  return {'mean': 0.9 * np.asarray(stats['mean']) + 0.1 * x.mean(0),
          'var': 0.9 * np.asarray(stats['var']) + 0.1 * x.var(0, ddof=1)}


def randomized(variables, seed=1):
  """Non-trivial scale, bias and running statistics (init gives ones and zeros)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [leaf + 0.5 * jnp.abs(jax.random.normal(k, leaf.shape)) for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('given_moments, module', [(True, Fast), (False, Fast), (False, Readable)])
def test_batch_norm_relu_matches_flax_batch_norm(train, given_moments, module):
  features = feature_maps()
  fast, reference = module(), Reference()
  variables = randomized(model_lib.init_variables(reference, jax.random.key(0), features, train=False))
  # Same variable tree: checkpoints and converted weights load into either.
  fast_variables = model_lib.init_variables(fast, jax.random.key(0), features, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(fast_variables)
  moments = [layers.moments(f) for f in features] if given_moments else None

  def run(module, params, features):
    extra = dict(batch_moments=moments) if module is fast and moments else {}
    out, updates = module.apply({**variables, 'params': params}, features, train,
                                mutable=['batch_stats'], **extra)
    return out, updates

  out, updates = run(fast, variables['params'], features)
  expected, expected_updates = run(reference, variables['params'], features)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert np.mean(np.asarray(out) > 0) > 0.2  # The ReLU does not hide everything.
  if train:  # The running statistics moved, the variance by the unbiased batch variance (as in PyTorch).
    want = unbiased_running(variables, features)
    for name in ('mean', 'var'):
      np.testing.assert_allclose(updates['batch_stats']['norm'][name], want[name], rtol=1e-5, atol=1e-6)
    assert not np.allclose(updates['batch_stats']['norm']['mean'], variables['batch_stats']['norm']['mean'])
  else:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), updates, expected_updates)

  cotangent = jax.random.normal(jax.random.key(3), out.shape)
  if moments is None:
    def loss(module, params, features):
      return jnp.sum(run(module, params, features)[0] * cotangent)
    grads = jax.grad(loss, argnums=(1, 2))(fast, variables['params'], features)
    expected_grads = jax.grad(loss, argnums=(1, 2))(reference, variables['params'], features)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grads, expected_grads)


def test_shared_moments_give_the_same_gradients_as_recomputed_ones():
  # A dense block passes the moments it computed once; gradients must flow through them the same.
  features = feature_maps()
  module = Fast()
  variables = randomized(model_lib.init_variables(module, jax.random.key(0), features, train=False))
  cotangent = jax.random.normal(jax.random.key(3), (4, 6, 6, 11))

  def loss(features, share):
    moments = [layers.moments(f) for f in features] if share else None
    out, _ = module.apply(variables, features, True, batch_moments=moments, mutable=['batch_stats'])
    return jnp.sum(out * cotangent)

  shared, recomputed = jax.grad(loss)(features, True), jax.grad(loss)(features, False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), shared, recomputed)


@pytest.mark.parametrize('group_size', [None, 2])
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_moments_gradient_equals_autodiff_of_moments(group_size, dtype):
  # The scanned block's backward pass uses the moments kept from the forward pass instead of re-reducing.
  x = (3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 5, 5, 6))).astype(dtype)
  stats, moments_vjp = jax.vjp(lambda x: layers.moments(x, group_size), x)
  d_stats = layers.Moments(*(jax.random.normal(jax.random.key(i + 1), m.shape) for i, m in enumerate(stats)))
  expected = moments_vjp(d_stats)[0]
  actual = layers.moments_gradient(x, stats, d_stats, group_size)
  assert actual.dtype == expected.dtype == dtype and actual.shape == x.shape
  np.testing.assert_allclose(np.asarray(actual, np.float32), np.asarray(expected, np.float32),
                             rtol=1e-2 if dtype == jnp.bfloat16 else 1e-5, atol=1e-6)


def test_gradients_stay_accurate_when_the_mean_dwarfs_the_spread():
  # Feature maps with |mean| = 100 std: the one-pass variance E[x^2] - E[x]^2 loses about (mean/std)^2
  # of float32 precision in the input gradient (relative error ~1e-3 here); the two-pass one does not.
  # The expected gradient is the textbook BatchNorm backward pass in float64.
  rng = np.random.default_rng(0)
  x = 100.0 + rng.standard_normal((8, 8, 8, 4))
  cotangent = rng.standard_normal(x.shape)
  scale, bias, epsilon = 1.0 + rng.random(4), 0.5 * rng.standard_normal(4), 1e-5
  module = Fast(epsilon=epsilon)
  variables = {'params': {'norm': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}},
               'batch_stats': {'norm': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}}

  def loss(x):
    out, _ = module.apply(variables, [x], True, batch_moments=[layers.moments(x)], mutable=['batch_stats'])
    return jnp.sum(out * cotangent)

  grad = np.asarray(jax.grad(loss)(jnp.asarray(x, jnp.float32)), np.float64)

  axes = (0, 1, 2)
  inv_std = 1.0 / np.sqrt(x.var(axes) + epsilon)
  normalized = (x - x.mean(axes)) * inv_std
  grad_normalized = cotangent * (normalized * scale + bias > 0) * scale
  expected = inv_std * (grad_normalized - grad_normalized.mean(axes)
                        - normalized * (grad_normalized * normalized).mean(axes))
  assert np.linalg.norm(grad - expected) / np.linalg.norm(expected) < 1e-5


def test_batch_norm_relu_in_bfloat16_normalizes_in_float32():
  features = [f.astype(jnp.bfloat16) for f in feature_maps()]
  module = Fast(dtype=jnp.bfloat16)
  variables = model_lib.init_variables(module, jax.random.key(0), features, train=False)
  out, _ = module.apply(variables, features, True, mutable=['batch_stats'])
  assert out.dtype == jnp.bfloat16
  expected, _ = Reference().apply(variables, [f.astype(jnp.float32) for f in features], True,
                                  mutable=['batch_stats'])
  np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=2e-2, atol=2e-2)


def test_running_variance_follows_pytorch_batch_norm():
  # An independent implementation: torch.nn.BatchNorm2d in training mode, momentum 0.1, three batches.
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  batches = [3.0 + 2.0 * rng.standard_normal((4, 5, 5, 6)).astype(np.float32) for _ in range(3)]
  reference = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1).train()
  module = Fast()
  variables = model_lib.init_variables(module, jax.random.key(0), [jnp.asarray(batches[0])], train=False)
  for x in batches:
    reference(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    _, updates = module.apply(variables, [jnp.asarray(x)], True, mutable=['batch_stats'])
    variables = {**variables, **updates}
  stats = variables['batch_stats']['norm']
  np.testing.assert_allclose(stats['mean'], reference.running_mean.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats['var'], reference.running_var.numpy(), rtol=1e-5, atol=1e-6)
