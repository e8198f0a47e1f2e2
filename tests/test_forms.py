"""Every faster form computes densenet.py's function: logits, gradients and running statistics, with its variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import model as model_lib
from densenet_jax.model import forms

FORMS = {
    'memory_efficient': dict(memory_efficient=True),
    'elementwise masks': dict(dropout_masks='elementwise'),
    'cpu kernels': dict(kernels='cpu'),
    'cpu kernels, memory_efficient': dict(kernels='cpu', memory_efficient=True),
    'cpu kernels, scanned': dict(kernels='cpu', memory_efficient=True, layers_per_scan=2, dropout_masks='elementwise'),
    'xla kernels, scanned': dict(memory_efficient=True, layers_per_scan=3),
}
# One model of each shape family: CIFAR DenseNet-BC, plain CIFAR DenseNet (no bottleneck, no compression), and the
# ImageNet stem (max pooling); each with dropout and BatchNorm groups of 2 examples.
FAMILIES = {
    'cifar_bc': lambda **form: model_lib.cifar_densenet(16, 4, bottleneck=True, compression=0.5, **form),
    'cifar_plain': lambda **form: model_lib.cifar_densenet(13, 4, bottleneck=False, compression=1.0, **form),
    'imagenet': lambda **form: model_lib.imagenet_densenet((2, 3), 4, num_classes=5, **form),
}


def randomized(tree, seed):
  """Init gives BatchNorm ones and zeros: perturb every variable so that a wrong statistic shows."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jnp.abs(jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)])


def outputs(model, variables, images):
  """Train-mode logits, new running statistics and parameter gradients; eval-mode logits."""

  def loss(params):
    logits, updates = model.apply({**variables, 'params': params}, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.key(2)})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, updates['batch_stats'])

  (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
  return dict(logits=logits, batch_stats=stats, grads=grads, eval_logits=model.apply(variables, images))


@pytest.mark.parametrize('dropout_rate', [0.0, 0.2])
@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_form_computes_the_readable_model(family, dropout_rate):
  readable = FAMILIES[family](dropout_rate=dropout_rate, batch_norm_group_size=2)
  assert forms.is_default(readable)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = randomized(model_lib.init_variables(readable, jax.random.key(0), images), seed=3)
  expected = jax.jit(outputs, static_argnums=0)(readable, variables, images)
  for name, form in FORMS.items():
    model = readable.clone(**form)
    assert forms.is_default(model) == (name == 'memory_efficient')
    # The same variables, so checkpoints and converted weights load in every form.
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), images)) == jax.tree.structure(variables)
    got = jax.jit(outputs, static_argnums=0)(model, variables, images)
    scale = jax.tree.map(lambda b: 1e-5 * float(jnp.max(jnp.abs(b))) + 1e-6, expected)
    jax.tree.map(lambda a, b, s: np.testing.assert_allclose(a, b, rtol=2e-4, atol=s, err_msg=name),
                 got, expected, scale)


def test_the_forms_agree_in_bfloat16():
  readable = FAMILIES['cifar_bc'](dropout_rate=0.2, dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = randomized(model_lib.init_variables(readable, jax.random.key(0), images), seed=3)
  expected = jax.jit(outputs, static_argnums=0)(readable, variables, images)
  for name, form in FORMS.items():
    got = jax.jit(outputs, static_argnums=0)(readable.clone(**form), variables, images)
    for part in ('logits', 'eval_logits', 'batch_stats'):
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0.05, atol=0.05, err_msg=f'{name} {part}'),
                   got[part], expected[part])
    # Gradients in bfloat16 differ by rounding order; their direction must not.
    flat = lambda tree: jnp.concatenate([jnp.ravel(g) for g in jax.tree.leaves(tree)])
    a, b = flat(got['grads']), flat(expected['grads'])
    assert float(jnp.dot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) > 0.99, name


def test_a_form_that_names_nothing_is_refused():
  model = FAMILIES['cifar_bc']()
  images = jnp.zeros((2, 16, 16, 3))
  for bad, message in ((dict(layers_per_scan=2), 'memory_efficient=True'), (dict(kernels='cuda'), 'kernels='),
                       (dict(dropout_masks='numpy'), 'dropout_masks='), (dict(memory_efficient=None), 'explicit')):
    with pytest.raises(ValueError, match=message):
      model.clone(**bad).init(jax.random.key(0), images)
