"""The models are the paper's: parameter counts, channels, modes, initialization, dtypes, errors."""

import functools
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from densenet_jax import platform
from densenet_jax import model as model_lib
from densenet_jax.platform import cpu_family, xla_flags
from densenet_jax.summary import count_params, summarize

# Exact counts of ../shared/paper.md (1000 classes for ImageNet models, 10 for CIFAR models).
PAPER_PARAMETER_COUNTS = {
    'densenet121': 7_978_856,
    'densenet169': 14_149_480,
    'densenet201': 20_013_928,
    'densenet264': 33_337_704,
    'densenet161': 28_681_000,
    'densenet_l40_k12': 1_019_722,
    'densenet_l100_k12': 6_979_642,  # paper: 7.0M
    'densenet_l100_k24': 27_249_082,  # paper: 27.2M
    'densenet_bc_l100_k12': 769_162,
    'densenet_bc_l250_k24': 15_324_406,  # paper: 15.3M
    'densenet_bc_l190_k40': 25_624_430,
}
ROUNDED_PAPER_COUNTS_IN_MILLIONS = {
    'densenet_l100_k12': 7.0,
    'densenet_l100_k24': 27.2,
    'densenet_bc_l250_k24': 15.3,
}


def tiny_model(**overrides):
  """Two blocks of two bottleneck layers on 8x8 images: compiles in about a second."""
  kwargs = dict(bottleneck=True, compression=0.5, num_blocks=2, num_classes=5, memory_efficient=False,
                layers_per_scan=0)
  kwargs.update(overrides)
  return model_lib.cifar_densenet(kwargs.pop('depth', 11), kwargs.pop('growth_rate', 4), **kwargs)


def init(model, x):
  return model_lib.init_variables(model, jax.random.key(0), x)


@functools.partial(jax.jit, static_argnames=('model', 'train'))
def apply(model, variables, x, train=False, rng=None):
  """Compiled forward pass; in train mode also returns the updated batch statistics."""
  if train:
    rngs = None if rng is None else {'dropout': rng}
    return model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
  return model.apply(variables, x)


def images(batch=4, size=8, channels=3, seed=0):
  return jax.random.normal(jax.random.key(seed), (batch, size, size, channels))


def test_registry_holds_exactly_the_papers_models():
  assert set(model_lib.MODELS) == set(PAPER_PARAMETER_COUNTS)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMETER_COUNTS))
def test_parameter_count_equals_paper(name):
  imagenet = name in ('densenet121', 'densenet161', 'densenet169', 'densenet201', 'densenet264')
  model = model_lib.create_model(name, num_classes=1000 if imagenet else 10)
  size = 224 if imagenet else 32
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  )
  assert count_params(variables['params']) == PAPER_PARAMETER_COUNTS[name]
  if name in ROUNDED_PAPER_COUNTS_IN_MILLIONS:
    assert round(PAPER_PARAMETER_COUNTS[name] / 1e6, 1) == ROUNDED_PAPER_COUNTS_IN_MILLIONS[name]


def test_channel_bookkeeping_of_densenet_bc_l100_k12():
  summary = summarize(model_lib.create_model('densenet_bc_l100_k12', num_classes=10))
  channels = [(s.name, s.output_shape) for s in summary.stages]
  assert channels == [
      ('stem', (32, 32, 24)),
      ('block1', (32, 32, 216)),
      ('transition1', (16, 16, 108)),
      ('block2', (16, 16, 300)),
      ('transition2', (8, 8, 150)),
      ('block3', (8, 8, 342)),
      ('classifier', (10,)),
  ]


def test_imagenet_stages_and_multiply_adds():
  summary = summarize(model_lib.create_model('densenet169', num_classes=1000))
  assert [s.output_shape for s in summary.stages] == [
      (56, 56, 64), (56, 56, 256), (28, 28, 128), (28, 28, 512), (14, 14, 256),
      (14, 14, 1280), (7, 7, 640), (7, 7, 1664), (1000,),
  ]
  # The paper's Figure 3 and torchvision report 3.36 G multiply-adds for DenseNet-169.
  assert summary.multiply_adds / 1e9 == pytest.approx(3.36, abs=0.005)


def test_plain_densenet_layout():
  model = model_lib.create_model('densenet_l40_k12', num_classes=10)
  assert (model.block_sizes, model.stem_channels, model.bottleneck, model.compression) == (
      (12, 12, 12), 16, False, 1.0)
  shapes = [s.output_shape for s in summarize(model).stages]
  assert shapes[:3] == [(32, 32, 16), (32, 32, 160), (16, 16, 160)]


def test_generic_cifar_builder_and_depth_rule():
  model = model_lib.cifar_densenet(58, 8, bottleneck=True, compression=0.5, num_classes=100)
  assert model.block_sizes == (9, 9, 9) and model.stem_channels == 16 and model.num_classes == 100
  with pytest.raises(ValueError, match=r'6n \+ 4.*\b10, 16, 22, 28\b'):
    model_lib.cifar_densenet(101, 12, bottleneck=True, compression=0.5)
  with pytest.raises(ValueError, match=r'3n \+ 4'):
    model_lib.cifar_densenet(41, 12, bottleneck=False, compression=1.0)
  with pytest.raises(ValueError, match='compression'):
    model_lib.cifar_densenet(40, 12, bottleneck=False, compression=0.0)


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError) as error:
    model_lib.create_model('densenet122', num_classes=10)
  for name in model_lib.MODELS:
    assert name in str(error.value)


def test_unknown_override_is_rejected():
  with pytest.raises(TypeError, match='memory_efficent'):
    model_lib.create_model('densenet121', num_classes=10, memory_efficent=True)


@pytest.mark.parametrize(
    'shape, message',
    [
        ((8, 8, 3), 'rank 3'),
        ((2, 8, 8, 1), 'expects 3 input channels'),
        ((2, 3, 8, 8), 'channels-last'),
        ((2, 1, 1, 3), 'at least 2'),
    ],
)
def test_wrong_input_shape_says_what_was_expected(shape, message):
  model = tiny_model()
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_initialization_follows_the_paper():
  model = model_lib.cifar_densenet(7, 64, bottleneck=False, compression=1.0)
  variables = init(model, jnp.zeros((1, 8, 8, 3)))
  params = variables['params']
  kernel = params['block2']['layer1']['conv1']['kernel']  # 3x3x80x64: std sqrt(2 / (9 * 64))
  assert kernel.shape[-1] == 64
  assert float(jnp.std(kernel)) == pytest.approx(math.sqrt(2 / (3 * 3 * 64)), rel=0.03)
  assert float(jnp.abs(jnp.mean(kernel))) < 0.01
  norm = params['block1']['layer1']['norm1']
  assert np.all(norm['scale'] == 1) and np.all(norm['bias'] == 0)
  assert np.all(params['classifier']['bias'] == 0)
  fan_in = params['classifier']['kernel'].shape[0]
  assert float(jnp.max(jnp.abs(params['classifier']['kernel']))) <= 1 / math.sqrt(fan_in)
  assert all('bias' not in p for p in jax.tree_util.tree_leaves_with_path(params)
             if 'conv' in jax.tree_util.keystr(p[0]))
  stats = variables['batch_stats']['final_norm']
  assert np.all(stats['mean'] == 0) and np.all(stats['var'] == 1)


def test_init_variables_gives_the_values_of_the_default_compile():
  # init_variables compiles model.init with options for code that runs once; a seed must still give the model
  # the values that jax.jit(model.init) gives: bit for bit on AMD's AVX2 CPUs (XLA:CPU's level-0 code differs in
  # the last bits there), within 2 ulp on CPUs where XLA's default compile vectorizes the initializers' code
  # differently (AMD AVX-512: one kernel shape of this model; docs/performance.md). With JAX's default generator,
  # not the one conftest.py sets for speed: its kernels are the slow ones to compile.
  model, x = tiny_model(num_blocks=1, depth=4), jnp.zeros((1, 8, 8, 3))
  key = jax.random.key(0, impl='threefry2x32')
  expected = jax.jit(model.init)(key, x)
  got = model_lib.init_variables(model, key, x)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_max_ulp(a, b, maxulp=2)
    if cpu_family.host() == cpu_family.AMD_AVX2 and jax.default_backend() == 'cpu':
      np.testing.assert_array_equal(a, b)
  jax.tree.map(np.testing.assert_array_equal, model_lib.init_variables(model, key, x), got)  # Deterministic.


def test_train_mode_uses_batch_statistics_and_updates_running_averages():
  model = tiny_model()
  x = 3.0 + 2.0 * images()
  variables = init(model, x)
  _, updates = apply(model, variables, x, train=True)
  # Stem conv output -> norm1 of the first layer: running = 0.9 * old + 0.1 * batch statistics, the variance
  # unbiased (n / (n - 1)), as in the original Torch code and PyTorch.
  stem_out = jax.lax.conv_general_dilated(
      x, variables['params']['stem_conv']['kernel'], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  new = updates['batch_stats']['block1']['layer1']['norm1']
  np.testing.assert_allclose(new['mean'], 0.1 * stem_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  count = np.prod(stem_out.shape[:3])
  np.testing.assert_allclose(new['var'], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)) * count / (count - 1), rtol=1e-4)

  # Eval mode uses the running averages: an example's logits do not depend on the rest of the batch.
  eval_alone = apply(model, variables, x[:1])
  eval_in_batch = apply(model, variables, x)[:1]
  np.testing.assert_allclose(eval_alone, eval_in_batch, rtol=1e-5, atol=1e-5)
  train_alone, _ = apply(model, variables, x[:2], train=True)
  train_in_batch, _ = apply(model, variables, x, train=True)
  assert not np.allclose(train_alone[:1], train_in_batch[:1], atol=1e-3)


def test_dropout_only_in_train_mode_and_after_every_conv_but_the_stem():
  model = tiny_model(dropout_rate=0.5)
  x = images()
  variables = init(model, x)
  eval_logits = apply(model, variables, x)
  np.testing.assert_array_equal(eval_logits, apply(model, variables, x))  # no rng needed

  def train_logits(seed):
    return apply(model, variables, x, train=True, rng=jax.random.key(seed))[0]

  np.testing.assert_array_equal(train_logits(1), train_logits(1))
  assert not np.allclose(train_logits(1), train_logits(2))
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda: model.apply(variables, x, train=True, mutable=['batch_stats']))

  # Count the dropout sites: every dense-layer conv (2 per bottleneck layer) and the transitions; with JAX's own
  # masks (the model's default) each draws one random_bits.
  assert model.dropout_masks == 'jax'
  forward = jax.make_jaxpr(lambda: model.apply(variables, x, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': jax.random.key(0)}))()
  num_layers = sum(model.block_sizes)
  assert _count_primitive(forward.jaxpr, 'random_bits') == 2 * num_layers + (len(model.block_sizes) - 1)

  # A backward pass that recomputes each layer (memory_efficient) reads the forward pass's masks: the gradient's
  # program draws each mask once in every form.

  def loss(params, model):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                            rngs={'dropout': jax.random.key(0)})
    return jnp.sum(logits)

  forms = (dict(memory_efficient=False), dict(memory_efficient=True), dict(memory_efficient=True, layers_per_scan=2))
  for form in forms:
    gradient = jax.make_jaxpr(jax.grad(functools.partial(loss, model=model.clone(**form))))(variables['params'])
    # A scan body is one program for its group of layers: the scanned form draws once per group.
    groups = [math.ceil(n / form.get('layers_per_scan', 1)) for n in model.block_sizes]
    expected = 2 * sum(groups) + len(model.block_sizes) - 1
    assert _count_primitive(gradient.jaxpr, 'random_bits') == expected, form


def _count_primitive(jaxpr, name: str) -> int:
  """How many equations of `jaxpr` and of the programs nested in it apply the primitive `name`."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's jaxpr
        if hasattr(sub, 'eqns'):
          count += _count_primitive(sub, name)
  return count


def _loss_and_grads(model, variables, x, labels, rng=None):
  def loss_fn(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'], rngs=None if rng is None else {'dropout': rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return jax.jit(jax.value_and_grad(loss_fn))(variables['params'])


@pytest.mark.parametrize('bottleneck, dropout_rate, stem', [(True, 0.0, 'cifar'), (False, 0.2, 'cifar'),
                                                            (True, 0.0, 'imagenet')])
def test_memory_efficient_gives_the_same_loss_and_gradients(bottleneck, dropout_rate, stem):
  depth = 11 if bottleneck else 7
  plain = tiny_model(depth=depth, bottleneck=bottleneck, dropout_rate=dropout_rate, stem=stem)
  efficient = plain.clone(memory_efficient=True)  # unrolled: layers_per_scan=0
  x, labels = images(), jnp.arange(4) % 5
  variables = init(plain, x)
  rng = jax.random.key(7) if dropout_rate else None
  loss, grads = _loss_and_grads(plain, variables, x, labels, rng)
  loss_eff, grads_eff = _loss_and_grads(efficient, variables, x, labels, rng)
  # Same parameter tree, so checkpoints move freely between the two.
  assert jax.tree.structure(grads) == jax.tree.structure(grads_eff)
  np.testing.assert_allclose(loss, loss_eff, rtol=1e-6)
  for g, g_eff in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_eff)):
    np.testing.assert_allclose(g, g_eff, rtol=1e-4, atol=1e-6)


MEMORY_CHECK = """
from densenet_jax import memory
from densenet_jax import model as model_lib
model = model_lib.cifar_densenet(28, 8, bottleneck=True, compression=0.5, layers_per_scan=0)
for efficient in (False, True):
  print(memory.train_step_temp_bytes(model.clone(memory_efficient=efficient), 8, (16, 16, 3)))
"""


def test_memory_efficient_needs_at_most_half_the_activation_memory():
  # A fresh process: XLA:CPU keeps rematerialization only with this flag set before JAX starts.
  env = {**os.environ, 'XLA_FLAGS': xla_flags.KEEP_REMAT_ON_CPU, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', MEMORY_CHECK], env=env, capture_output=True,
                          text=True, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  plain, efficient = map(int, result.stdout.split())
  # 0.65x for this small model (measured); the saving grows with depth: 0.42x for DenseNet-BC-100 at
  # batch 64 and the DenseNet-BC-190 figures in docs/performance.md (benchmarks/bench.py).
  assert efficient <= 0.7 * plain, (plain, efficient)


def test_memory_efficient_is_known_to_need_the_flag_on_cpu_only(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '')  # As if the process had started without platform.prepare_environment().
  assert not platform.remat_is_effective('cpu')
  assert platform.remat_is_effective('gpu') and platform.remat_is_effective('tpu')


def test_bfloat16_compute_keeps_float32_parameters():
  model = tiny_model(depth=15, growth_rate=8)
  x = images(batch=8)
  variables = init(model, x)
  bf16 = model.clone(dtype=jnp.bfloat16)
  assert jax.tree.map(lambda a: a.dtype, jax.eval_shape(bf16.init, jax.random.key(0), x)) == (
      jax.tree.map(lambda a: a.dtype, variables))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))

  logits32, _ = apply(model, variables, x, train=True)
  logits16, updates = apply(bf16, variables, x, train=True)
  assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates))
  scale = float(jnp.max(jnp.abs(logits32)))
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.05 * scale
  np.testing.assert_array_equal(jnp.argmax(apply(bf16, variables, x), -1),
                                jnp.argmax(apply(model, variables, x), -1))
