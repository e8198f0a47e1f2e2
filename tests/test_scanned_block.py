"""Scanned dense blocks (layers_per_scan > 0) compute exactly the unrolled model, with less memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from densenet_jax import memory
from densenet_jax import model as model_lib
from densenet_jax.model.forms import dense_layer, kernels, scanned_block


def tiny_model(bottleneck=True, **overrides):
  """Two blocks of three layers on 8x8 images (three layers: groups of 1, 2 and 3 all differ)."""
  depth = 15 if bottleneck else 9
  return model_lib.cifar_densenet(depth, 4, bottleneck=bottleneck, compression=0.5, num_blocks=2, num_classes=5,
                               **{'memory_efficient': True, 'layers_per_scan': 0, **overrides})


def randomized(tree, seed):
  """Init gives BatchNorm ones and zeros; perturb every variable so that a wrong statistic shows."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jnp.abs(jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])


def run(model, variables, x, labels):
  """Train-mode loss, logits, new batch statistics and gradients; eval-mode logits and input gradient."""

  def loss_fn(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), (logits, updates)

  def eval_fn(x):
    logits = model.apply(variables, x)
    return jnp.sum(logits * jnp.arange(logits.shape[-1])), logits

  (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  input_grad, eval_logits = jax.grad(eval_fn, has_aux=True)(x)
  return dict(loss=loss, logits=logits, batch_stats=updates['batch_stats'], grads=grads,
              eval_logits=eval_logits, eval_input_grad=input_grad)


@pytest.mark.parametrize('bottleneck, layers_per_scan', [(True, 1), (True, 2), (True, 3), (False, 2)])
def test_scanned_blocks_compute_the_unrolled_model(bottleneck, layers_per_scan):
  unrolled = tiny_model(bottleneck)
  scanned = unrolled.clone(layers_per_scan=layers_per_scan)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  labels = jnp.arange(6) % 5
  variables = model_lib.init_variables(unrolled, jax.random.key(1), x)
  # The same variables: checkpoints and converted weights move freely between the two.
  assert jax.tree.structure(jax.eval_shape(scanned.init, jax.random.key(1), x)) == jax.tree.structure(variables)
  variables = randomized(variables, seed=2)

  expected = jax.jit(run, static_argnums=0)(unrolled, variables, x, labels)
  got = jax.jit(run, static_argnums=0)(scanned, variables, x, labels)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for name in expected:
    for a, b in zip(jax.tree.leaves(got[name]), jax.tree.leaves(expected[name])):
      scale = float(jnp.max(jnp.abs(b)))
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
  # The running statistics moved, so the comparison above checked real updates.
  assert not np.allclose(got['batch_stats']['block1']['layer3']['norm1']['mean'],
                         variables['batch_stats']['block1']['layer3']['norm1']['mean'])


@pytest.mark.parametrize('bottleneck', [True, False])
def test_scanned_blocks_drop_what_the_unrolled_model_drops(bottleneck):
  # Every layer draws its masks from its own key, split from one block key in both forms: the same units dropped.
  unrolled = tiny_model(bottleneck, dropout_rate=0.3)
  scanned = unrolled.clone(layers_per_scan=2)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = randomized(model_lib.init_variables(unrolled, jax.random.key(1), x), seed=2)

  def logits_and_grads(model, rate):
    def loss(params):
      logits, _ = model.clone(dropout_rate=rate).apply(
          {**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.key(3, impl='threefry2x32')})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  expected, got = logits_and_grads(unrolled, 0.3), logits_and_grads(scanned, 0.3)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  assert not np.allclose(expected[0][1], logits_and_grads(unrolled, 0.0)[0][1], atol=1e-3)  # dropout is on


@pytest.mark.parametrize('bottleneck', [True, False])
def test_hand_written_backward_equals_autodiff_of_the_same_forward(bottleneck):
  # With dropout, against JAX's own differentiation of the same scanned forward pass.
  layer = dense_layer.LayerSpec(growth_rate=3, bottleneck=bottleneck, dropout_rate=0.3, dtype=jnp.float32,
                                kernels=kernels.CPU)
  spec = scanned_block.BlockSpec(input_channels=5, num_layers=5, layers_per_scan=2, layer=layer)
  x = 1.0 + jax.random.normal(jax.random.key(0), (4, 6, 6, spec.input_channels))
  block = model_lib.DenseBlock(num_layers=spec.num_layers, growth_rate=spec.growth_rate, bottleneck=bottleneck)
  params = randomized(model_lib.init_variables(block, jax.random.key(1), x, train=False)['params'], seed=3)
  params = [params[f'layer{i + 1}'] for i in range(spec.num_layers)]
  keys = list(jax.random.split(jax.random.key(4), spec.num_layers))
  weights = jax.random.normal(jax.random.key(5), (4, 6, 6, spec.output_channels))

  def by_hand(x, params):
    output, _ = scanned_block.train(spec, x, params, keys)
    return jnp.sum(output * weights)

  def by_autodiff(x, params):
    groups = scanned_block.stack_groups(spec, params)
    output, _, _ = scanned_block._forward(spec, x, groups, scanned_block._group_keys(spec, keys), None)
    return jnp.sum(output * weights)

  got = jax.jit(jax.value_and_grad(by_hand, argnums=(0, 1)))(x, params)
  expected = jax.jit(jax.value_and_grad(by_autodiff, argnums=(0, 1)))(x, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  # Dropout is on: the output differs from the same block without it.
  no_dropout = dataclasses.replace(spec, layer=dataclasses.replace(layer, dropout_rate=0.0))
  assert not np.allclose(scanned_block.train(spec, x, params, keys)[0],
                         scanned_block.train(no_dropout, x, params, [None] * spec.num_layers)[0])


@pytest.mark.parametrize('bottleneck', [True, False])
def test_the_backward_pass_reads_the_masks_the_forward_pass_drew(bottleneck, monkeypatch):
  drawn = []
  draw = kernels.DROPOUT_MASKS['jax']
  monkeypatch.setitem(kernels.DROPOUT_MASKS, 'jax',
                      lambda key, keep, shape: drawn.append(shape) or draw(key, keep, shape))
  layer = dense_layer.LayerSpec(growth_rate=3, bottleneck=bottleneck, dropout_rate=0.3, dtype=jnp.float32,
                                kernels=kernels.XLA)
  spec = scanned_block.BlockSpec(input_channels=5, num_layers=5, layers_per_scan=2, layer=layer)
  x = jnp.ones((2, 4, 4, spec.input_channels))
  block = model_lib.DenseBlock(num_layers=spec.num_layers, growth_rate=spec.growth_rate, bottleneck=bottleneck)
  params = model_lib.init_variables(block, jax.random.key(1), x, train=False)['params']
  params = [params[f'layer{i + 1}'] for i in range(spec.num_layers)]
  keys = list(jax.random.split(jax.random.key(4), spec.num_layers))

  def loss(x, params):
    return jnp.sum(scanned_block.train(spec, x, params, keys)[0])

  jax.make_jaxpr(loss)(x, params)
  forward = list(drawn)
  drawn.clear()
  jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, params)
  # One draw per dropout and group of layers (a scan body is traced once): the backward pass adds none.
  assert len(forward) == len(spec.groups()) * (2 if bottleneck else 1)
  assert drawn == forward


def test_scanned_blocks_keep_less_than_the_plain_model():
  plain = model_lib.cifar_densenet(28, 8, bottleneck=True, compression=0.5, memory_efficient=False, layers_per_scan=0)
  scanned = plain.clone(memory_efficient=True, layers_per_scan=2)
  plain_bytes, scanned_bytes = (memory.train_step_temp_bytes(m, 8, (16, 16, 3)) for m in (plain, scanned))
  # 0.60x for this small model with XLA's kernels, 0.77x with the CPU set, whose 3x3 kernel gradient builds a
  # shifted copy of the output gradient: a large share of so small a model's temporaries, none of DenseNet-BC
  # L=100's (657 MB either way at batch 64). The saving grows with depth: DenseNet-BC L=190 in docs/performance.md.
  assert scanned_bytes <= 0.8 * plain_bytes, (plain_bytes, scanned_bytes)


def test_bfloat16_scanned_blocks_match_the_unrolled_ones():
  unrolled = tiny_model(dtype=jnp.bfloat16)
  scanned = unrolled.clone(layers_per_scan=2)
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 3))
  variables = model_lib.init_variables(unrolled, jax.random.key(1), x)
  expected = jax.jit(run, static_argnums=0)(unrolled, variables, x, jnp.arange(6) % 5)
  got = jax.jit(run, static_argnums=0)(scanned, variables, x, jnp.arange(6) % 5)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got['grads']))
  for name in ('logits', 'eval_logits'):
    scale = float(jnp.max(jnp.abs(expected[name])))
    assert float(jnp.max(jnp.abs(got[name] - expected[name]))) < 0.05 * scale, name


@pytest.mark.parametrize('options', [dict(layers_per_scan=2), dict(layers_per_scan=-1, memory_efficient=True)])
def test_layers_per_scan_needs_memory_efficient_and_a_positive_number(options):
  model = tiny_model().clone(memory_efficient=False).clone(**options)
  with pytest.raises(ValueError, match='layers_per_scan'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
