"""The fast primitives compute exactly what flax.linen.BatchNorm + ReLU and flax.linen.Conv compute."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax.model import layers


def feature_maps(sizes=(5, 3, 3), seed=0):
  keys = jax.random.split(jax.random.key(seed), len(sizes))
  # Non-zero means and unequal scales, so that a wrong statistic shows.
  return [2.0 + (i + 1) * jax.random.normal(k, (4, 6, 6, c)) for i, (k, c) in enumerate(zip(keys, sizes))]


class Reference(nn.BatchNorm):
  """The textbook version: concatenate, nn.BatchNorm, ReLU."""

  momentum: float = 0.9
  epsilon: float = 1e-5

  def __call__(self, features, train):
    x = jnp.concatenate(features, axis=-1)
    return nn.relu(super().__call__(x, use_running_average=not train))


def randomized(variables, seed=1):
  """Non-trivial scale, bias and running statistics (init gives ones and zeros)."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [leaf + 0.5 * jnp.abs(jax.random.normal(k, leaf.shape)) for k, leaf in zip(keys, leaves)]
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.parametrize('train', [True, False])
@pytest.mark.parametrize('given_moments', [True, False])
def test_batch_norm_relu_matches_flax_batch_norm(train, given_moments):
  features = feature_maps()
  fast, reference = layers.BatchNormReLU(), Reference()
  variables = randomized(reference.init(jax.random.key(0), features, False))
  # Same variable tree: checkpoints and converted weights load into either.
  assert jax.tree.structure(variables) == jax.tree.structure(fast.init(jax.random.key(0), features, False))
  moments = [layers.moments(f) for f in features] if given_moments else None

  def run(module, params, features):
    extra = dict(batch_moments=moments) if module is fast else {}
    out, updates = module.apply({**variables, 'params': params}, features, train,
                                mutable=['batch_stats'], **extra)
    return out, updates

  out, updates = run(fast, variables['params'], features)
  expected, expected_updates = run(reference, variables['params'], features)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert np.mean(np.asarray(out) > 0) > 0.2  # The ReLU does not hide everything.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), updates, expected_updates)
  if train:  # The running statistics moved.
    assert not np.allclose(updates['batch_stats']['mean'], variables['batch_stats']['mean'])

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
  module = layers.BatchNormReLU()
  variables = randomized(module.init(jax.random.key(0), features, False))
  cotangent = jax.random.normal(jax.random.key(3), (4, 6, 6, 11))

  def loss(features, share):
    moments = [layers.moments(f) for f in features] if share else None
    out, _ = module.apply(variables, features, True, batch_moments=moments, mutable=['batch_stats'])
    return jnp.sum(out * cotangent)

  shared, recomputed = jax.grad(loss)(features, True), jax.grad(loss)(features, False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), shared, recomputed)


def test_gradients_stay_accurate_when_the_mean_dwarfs_the_spread():
  # Feature maps with |mean| = 100 std: the one-pass variance E[x^2] - E[x]^2 loses about (mean/std)^2
  # of float32 precision in the input gradient (relative error ~1e-3 here); the two-pass one does not.
  # The expected gradient is the textbook BatchNorm backward pass in float64.
  rng = np.random.default_rng(0)
  x = 100.0 + rng.standard_normal((8, 8, 8, 4))
  cotangent = rng.standard_normal(x.shape)
  scale, bias, epsilon = 1.0 + rng.random(4), 0.5 * rng.standard_normal(4), 1e-5
  module = layers.BatchNormReLU(epsilon=epsilon)
  variables = {'params': {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)},
               'batch_stats': {'mean': jnp.zeros(4), 'var': jnp.ones(4)}}

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
  module = layers.BatchNormReLU(dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), features, False)
  out, _ = module.apply(variables, features, True, mutable=['batch_stats'])
  assert out.dtype == jnp.bfloat16
  expected, _ = Reference().apply(variables, [f.astype(jnp.float32) for f in features], True,
                                  mutable=['batch_stats'])
  np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=2e-2, atol=2e-2)


def test_pointwise_conv_matches_flax_conv():
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 7))
  conv = nn.Conv(4, (1, 1), padding=((0, 0), (0, 0)), use_bias=False)
  fast = conv.clone(conv_general_dilated=layers.pointwise_conv)
  params = conv.init(jax.random.key(1), x)
  np.testing.assert_allclose(fast.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-6)

  def loss(module, params, x):
    return jnp.sum(jnp.sin(module.apply(params, x)))

  grads = jax.grad(loss, argnums=(1, 2))(fast, params, x)
  expected = jax.grad(loss, argnums=(1, 2))(conv, params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, expected)


def test_pointwise_conv_refuses_other_convolutions():
  x = jnp.zeros((1, 4, 4, 3))
  strided = nn.Conv(2, (1, 1), strides=(2, 2), padding=((0, 0), (0, 0)), conv_general_dilated=layers.pointwise_conv)
  with pytest.raises(ValueError, match='only 1x1 convolutions with stride 1'):
    strided.init(jax.random.key(0), x)


def test_gradient_barrier_is_the_identity_with_its_gradient_kept_whole():
  x = jax.random.normal(jax.random.key(0), (2, 3, 3, 4))

  def loss(x, barrier):
    y = layers.gradient_barrier(x) if barrier else x
    return jnp.sum(jnp.sin(y) * 3.0) + jnp.sum(y ** 2)

  np.testing.assert_array_equal(layers.gradient_barrier(x), x)
  np.testing.assert_allclose(jax.grad(loss)(x, True), jax.grad(loss)(x, False), rtol=1e-6)
  # The barrier sits on the gradient, where XLA would otherwise fuse its sum into every consumer.
  with_barrier = functools.partial(loss, barrier=True)
  assert 'optimization_barrier' in str(jax.make_jaxpr(jax.grad(with_barrier))(x))
  assert 'optimization_barrier' not in str(jax.make_jaxpr(with_barrier)(x))


def test_conv3x3_matches_flax_conv_with_its_gradients():
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7))
  conv = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)
  params = conv.init(jax.random.key(1), x)
  kernel = params['params']['kernel']
  np.testing.assert_allclose(layers.conv3x3(x, kernel), conv.apply(params, x), rtol=1e-5, atol=1e-5)

  def loss(fn, x, kernel):
    return jnp.sum(jnp.sin(fn(x, kernel)))

  got = jax.grad(functools.partial(loss, layers.conv3x3), argnums=(0, 1))(x, kernel)
  expected = jax.grad(functools.partial(loss, lambda x, k: conv.apply({'params': {'kernel': k}}, x)),
                      argnums=(0, 1))(x, kernel)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got, expected)
