"""Dropout's masks written out as one kernel are `jax.random.bernoulli`'s, bit for bit, and the CPU draws them so."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import model as model_lib
from densenet_jax import platform
from densenet_jax.model.forms import dropout_masks, kernels

THREEFRY = 'threefry2x32'


@pytest.mark.parametrize('shape, keep', [((4, 8, 8, 48), 0.8), ((3, 5, 7, 11), 0.5), ((1000,), 0.9),
                                         ((2, 3), 0.2), ((64, 7, 7, 32), 1e-3)])
def test_the_written_out_masks_are_jax_bernoulli_bit_for_bit(shape, keep):
  for seed in (0, 1, 2**31 + 5):
    key = jax.random.key(seed, impl=THREEFRY)
    expected = jax.jit(dropout_masks.jax_keep_mask, static_argnums=(1, 2))(key, keep, shape)
    got = jax.jit(dropout_masks.threefry_keep_mask, static_argnums=(1, 2))(key, keep, shape)
    assert got.dtype == bool and got.shape == shape
    np.testing.assert_array_equal(got, expected)
  # Not a constant: the fraction kept is the probability, within what 4096 and more draws allow.
  if np.prod(shape) >= 4096:
    assert abs(float(np.mean(got)) - keep) < 4 * np.sqrt(keep * (1 - keep) / np.prod(shape)) + 1e-6


def test_the_written_out_masks_under_scan_and_from_split_keys():
  # As the scanned dense block draws them: one key per layer, stacked and scanned over.
  keys = jax.random.split(jax.random.key(7, impl=THREEFRY), 5)

  def masks(draw):
    return jax.jit(lambda ks: jax.lax.scan(lambda c, k: (c, draw(k, 0.8, (2, 4, 4, 6))), 0, ks)[1])(keys)

  np.testing.assert_array_equal(masks(dropout_masks.threefry_keep_mask), masks(dropout_masks.jax_keep_mask))
  assert not np.array_equal(*masks(dropout_masks.threefry_keep_mask)[:2])  # each layer its own mask


@pytest.mark.parametrize('shape', [(4, 8, 8, 48), (3, 5, 7, 11), (5,), (2, 3, 1)])
def test_packed_masks_are_numpy_packbits_and_unpack_to_the_mask(shape):
  # What the scanned dense block keeps of each mask for its backward pass: eight values to a byte.
  mask = np.asarray(jax.random.bernoulli(jax.random.key(0), 0.6, shape))
  packed = jax.jit(dropout_masks.pack)(mask)
  assert packed.dtype == np.uint8
  np.testing.assert_array_equal(packed, np.packbits(mask.reshape(-1), bitorder='little'))
  unpacked = jax.jit(dropout_masks.unpack, static_argnums=1)(packed, shape)
  assert unpacked.dtype == bool
  np.testing.assert_array_equal(unpacked, mask)


def test_raw_keys_and_other_generators_get_jax_own_masks():
  shape = (3, 4, 5)
  with jax.default_prng_impl(THREEFRY):
    raw = jax.random.PRNGKey(3)  # uint32[2], as older code passes keys
    np.testing.assert_array_equal(dropout_masks.threefry_keep_mask(raw, 0.7, shape),
                                  dropout_masks.jax_keep_mask(raw, 0.7, shape))
  for key in (jax.random.key(3, impl='rbg'), jax.random.key(3, impl='unsafe_rbg')):
    np.testing.assert_array_equal(dropout_masks.threefry_keep_mask(key, 0.7, shape),
                                  dropout_masks.jax_keep_mask(key, 0.7, shape))
  key = jax.random.key(3, impl=THREEFRY)
  with jax.threefry_partitionable(False):  # JAX's other counter layout: its own code draws those bits
    np.testing.assert_array_equal(dropout_masks.threefry_keep_mask(key, 0.7, shape),
                                  dropout_masks.jax_keep_mask(key, 0.7, shape))


def test_the_cpu_draws_masks_without_jax_random_bits():
  # JAX's random_bits on the CPU is the rolled loop that the written-out kernel replaces; other backends keep JAX's.
  key, shape = jax.random.key(0, impl=THREEFRY), (4, 8, 8, 16)
  assert platform.default_form('cpu').dropout_masks == 'elementwise'
  assert platform.default_form('gpu').dropout_masks == platform.default_form('tpu').dropout_masks == 'jax'
  elementwise, own = kernels.DROPOUT_MASKS['elementwise'], kernels.DROPOUT_MASKS['jax']
  jaxpr = str(jax.make_jaxpr(lambda k: elementwise(k, 0.8, shape))(key))
  assert 'random_bits' not in jaxpr and 'threefry2x32' not in jaxpr
  assert 'random_bits' in str(jax.make_jaxpr(lambda k: own(k, 0.8, shape))(key))
  np.testing.assert_array_equal(elementwise(key, 0.8, shape), own(key, 0.8, shape))


@pytest.mark.parametrize('form', [dict(memory_efficient=False, layers_per_scan=0, kernels='cpu'),
                                  dict(memory_efficient=True, layers_per_scan=2, kernels='cpu'),
                                  dict(memory_efficient=True, layers_per_scan=2, kernels='xla')])
def test_a_model_trains_with_the_same_masks_either_way(form):
  # Logits, batch statistics and gradients of a DenseNet-BC with dropout, from a threefry key: the CPU's masks
  # against JAX's own (what GPUs and TPUs draw).
  model = model_lib.cifar_densenet(11, 4, bottleneck=True, compression=0.5, dropout_rate=0.3, num_blocks=2,
                                   num_classes=3, **form)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = model_lib.init_variables(model, jax.random.key(0), x)
  key = jax.random.key(2, impl=THREEFRY)

  def train_step_outputs(draw):
    def loss(params):
      logits, updates = model.clone(dropout_masks=draw).apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': key})
      return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), (logits, updates['batch_stats'])

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  written_out = train_step_outputs('elementwise')
  jax_own = train_step_outputs('jax')
  # The same masks; the two programs fuse differently, so the last bits of a sum may differ. Another mask would
  # move these values by about their size.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), written_out, jax_own)
  no_dropout = jax.jit(lambda: model.clone(dropout_rate=0.0).apply(variables, x, train=True,
                                                                   mutable=['batch_stats'])[0])()
  assert not np.allclose(written_out[0][1][0], no_dropout)  # the masks did drop something
