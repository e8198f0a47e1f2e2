"""Pretrained-weight conversion: same logits as PyTorch and Keras, files and checkpoints, clear errors.

Numerical checks use randomized weights with non-trivial BatchNorm statistics (running statistics of a real
forward pass, then perturbed, plus random scales and biases), in float32 and eval mode, and include negative
controls that show the comparison would catch a wrong conversion.
"""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import model as model_lib
from densenet_jax import weights
from densenet_jax.summary import count_params
from densenet_jax.weights import __main__ as cli

try:
  import torch
  from benchmarks.torch_reference import build_torch_densenet
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason='PyTorch is not installed')
TOLERANCE = 1e-4  # relative error of the logits: max |flax - reference| / max |reference|
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_error(out, reference) -> float:
  return float(np.max(np.abs(np.asarray(out) - reference)) / np.max(np.abs(reference)))


@functools.partial(jax.jit, static_argnames='model')
def forward(model, variables, images):
  return model.apply(variables, images)


def logits(model, variables, images) -> np.ndarray:
  return np.asarray(forward(model, variables, jnp.asarray(images)))


def abstract_variables(model):
  size = model.min_input_size
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


def random_variables(model, seed=0):
  """Random values for every variable of `model` (no compilation): for tests of plumbing, not numerics."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32) if s.ndim > 1
                      else rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract_variables(model))


def zeros_like(abstract):
  """Zero arrays that take no memory (for tests that only need names and shapes)."""
  return jax.tree.map(lambda s: np.broadcast_to(np.zeros((), s.dtype), s.shape), abstract)


def assert_trees_equal(a, b):
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype, path
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def channels_before_transition(block_sizes, growth_rate, stem_channels, transition):
  channels = stem_channels
  for b, n in enumerate(block_sizes[:transition]):
    channels += n * growth_rate
    if b + 1 < transition:
      channels //= 2
  return channels


# ----------------------------------------------------------------------------------------------------------------
# PyTorch


def randomized_torch_net(model, images_nchw, seed=0):
  """The PyTorch twin with random weights: BN statistics of a forward pass in train mode (so activations stay
  O(1) through 100+ layers), then perturbed, and random BN scales/biases and classifier bias."""
  torch.manual_seed(seed)
  net = build_torch_densenet(model)
  norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for norm in norms:
      norm.reset_running_stats()
      norm.momentum = None  # cumulative average: one batch sets the running statistics to its own
    net.train()(images_nchw)
    net.eval()
    for norm in norms:
      norm.weight.uniform_(0.5, 1.5)
      norm.bias.normal_(0.0, 0.2)
      norm.running_mean.add_(0.2 * norm.running_var.sqrt() * torch.randn_like(norm.running_mean))
      norm.running_var.mul_(torch.empty_like(norm.running_var).uniform_(0.7, 1.4))
    net.classifier.bias.normal_(0.0, 0.1)
  return net


def torch_logits(net, images_nhwc):
  with torch.no_grad():
    return net(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def swap_kernel_axes(variables):
  """A classic conversion bug: 3x3 kernels with kh and kw exchanged."""
  swap = lambda x: np.swapaxes(x, 0, 1) if x.ndim == 4 and x.shape[0] == 3 else x
  return {**variables, 'params': jax.tree.map(swap, variables['params'])}


# Small models with the structure of the big ones compile in a few seconds; DenseNet-121 at 224 is the real thing.
TORCH_CASES = {
    'densenet121': (model_lib.create_model('densenet121', num_classes=1000), (224, 224)),
    # ImageNet stem on odd sizes, where every pooling floors differently: 75x97 -> 38x49 -> 19x25 -> 9x12 -> ...
    'imagenet_stem_odd_size': (model_lib.imagenet_densenet((2, 3, 2, 2), 8, num_classes=10), (75, 97)),
    # CIFAR stem (3x3 conv, no norm / pool): plain layers with compression 1, and DenseNet-BC.
    'cifar_plain': (model_lib.cifar_densenet(22, 12, bottleneck=False, compression=1.0, num_classes=10), (32, 32)),
    'cifar_bc': (model_lib.cifar_densenet(28, 12, bottleneck=True, compression=0.5, num_classes=100), (32, 32)),
}


@needs_torch
@pytest.mark.parametrize('case', sorted(TORCH_CASES))
def test_logits_equal_pytorch(case):
  model, size = TORCH_CASES[case]
  images = np.random.default_rng(1).standard_normal((2, *size, 3), dtype=np.float32)
  calibration = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, *size), dtype=np.float32))
  net = randomized_torch_net(model, calibration)
  reference = torch_logits(net, images)
  variables = weights.from_torch_state_dict(net.state_dict(), model)
  error = relative_error(logits(model, variables, images), reference)
  print(f'{case} {size}: max relative error vs PyTorch {error:.2e}')
  assert error < TOLERANCE
  # The two images give logits that differ far beyond the tolerance...
  assert np.abs(reference[0] - reference[1]).max() > 100 * TOLERANCE * np.abs(reference).max()
  # ...and the comparison catches a wrong conversion.
  swapped = relative_error(logits(model, swap_kernel_axes(variables), images), reference)
  print(f'  with kh and kw of the 3x3 kernels swapped: {swapped:.2e}')
  assert swapped > 100 * TOLERANCE


@needs_torch
# Every kind of model: ImageNet k=32 and k=48, CIFAR plain (16 stem channels) and CIFAR BC (2k stem channels).
@pytest.mark.parametrize('name', ['densenet121', 'densenet161', 'densenet_l40_k12', 'densenet_bc_l100_k12'])
def test_torch_reference_has_torchvision_names_and_flax_parameter_count(name):
  net = build_torch_densenet(name)
  model = model_lib.MODELS[name]()
  abstract = abstract_variables(model)
  assert sum(p.numel() for p in net.parameters()) == count_params(abstract['params'])
  expected = {k: tuple(v.shape) for k, v in weights.to_torch_state_dict(zeros_like(abstract)).items()}
  actual = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked')}
  assert actual == expected
  assert weights.infer_model(net.state_dict()) == (name, model)


@needs_torch
def test_torchvision_key_variants_give_identical_variables():
  net = build_torch_densenet('densenet_bc_l100_k12')
  state = net.state_dict()
  plain = weights.from_torch_state_dict(state, 'densenet_bc_l100_k12')
  # DataParallel prefix, pre-2017 torchvision names ('norm.1'), counters dropped, numpy instead of tensors.
  old = {'module.' + k.replace('.norm1.', '.norm.1.').replace('.conv2.', '.conv.2.'): v for k, v in state.items()}
  assert any('.norm.1.' in k for k in old) and any(k.endswith('num_batches_tracked') for k in old)
  assert_trees_equal(weights.from_torch_state_dict(old, 'densenet_bc_l100_k12'), plain)
  as_numpy = {k: v.numpy() for k, v in state.items() if not k.endswith('num_batches_tracked')}
  assert_trees_equal(weights.from_torch_state_dict(as_numpy, 'densenet_bc_l100_k12'), plain)
  assert_trees_equal(weights.from_torch_state_dict(net), plain)  # a module, architecture inferred


# ----------------------------------------------------------------------------------------------------------------
# Keras


@pytest.fixture(scope='module')
def keras_densenet121():
  """Keras applications DenseNet121 (logits) with random weights; the final BN has tiny variances, where
  Keras's epsilon 1.001e-5 differs measurably from 1e-5."""
  keras = pytest.importorskip('keras')
  net = keras.applications.DenseNet121(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
  rng = np.random.default_rng(3)
  norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
  for norm in norms:
    norm.momentum = 0.0  # one train-mode batch sets the moving statistics
  net(rng.standard_normal((2, 224, 224, 3), dtype=np.float32), training=True)
  for norm in norms:
    gamma, beta, mean, var = norm.get_weights()
    n = len(gamma)
    var = rng.uniform(1e-7, 1e-6, n) if norm.name == 'bn' else var * rng.uniform(0.7, 1.4, n)
    norm.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.2, n), mean + 0.2 * np.sqrt(var) *
                      rng.standard_normal(n), var])
  kernel, bias = net.get_layer('predictions').get_weights()
  net.get_layer('predictions').set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
  return net


def test_logits_equal_keras(keras_densenet121):
  images = np.random.default_rng(4).standard_normal((2, 224, 224, 3), dtype=np.float32)
  reference = np.asarray(keras_densenet121(images, training=False))
  variables = weights.from_keras(keras_densenet121, 'densenet121')
  model = model_lib.create_model('densenet121', num_classes=1000)
  error = relative_error(logits(model, variables, images), reference)
  print(f'densenet121 (224, 224): max relative error vs Keras {error:.2e}')
  assert error < TOLERANCE
  assert np.abs(reference[0] - reference[1]).max() > 100 * TOLERANCE * np.abs(reference).max()
  # Without folding the epsilon difference into the variance the logits would differ beyond the tolerance.
  unfolded = jax.tree.map(lambda x: x, variables)
  unfolded['batch_stats']['final_norm']['var'] = np.asarray(
      keras_densenet121.get_layer('bn').moving_variance.numpy(), np.float32)
  unfolded_error = relative_error(logits(model, unfolded, images), reference)
  print(f'  without the epsilon correction: {unfolded_error:.2e}')
  assert unfolded_error > 2 * TOLERANCE
  assert relative_error(logits(model, swap_kernel_axes(variables), images), reference) > 100 * TOLERANCE


# Keras's own saving code trips a numpy 2 DeprecationWarning (np.array on its variables).
@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')
def test_keras_files_give_the_same_variables(keras_densenet121, tmp_path):
  assert weights.infer_model(weights.keras_model_weights(keras_densenet121)[0], 'keras')[0] == 'densenet121'
  expected = weights.from_keras(keras_densenet121)  # architecture inferred
  paths = [
      _save(keras_densenet121, tmp_path / 'm.weights.h5'),  # Keras 3 save_weights
      _save(keras_densenet121, tmp_path / 'm.keras'),  # Keras 3 model
      _save(keras_densenet121, tmp_path / 'full.h5'),  # legacy model.save('x.h5'): epsilons from its config
  ]
  paths.append(write_keras2_weights(weights.keras_model_weights(keras_densenet121)[0], tmp_path / 'keras2.h5'))
  try:  # Keras's own writer of the legacy weights-only format.
    from keras.src.legacy.saving import legacy_h5_format
    import h5py
    with h5py.File(tmp_path / 'legacy.h5', 'w') as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, keras_densenet121)
    paths.append(str(tmp_path / 'legacy.h5'))
  except ImportError:
    pass
  for path in paths:
    assert_trees_equal(weights.load_weights_file(path, 'densenet121'), expected)


def write_keras2_weights(keras_weights, path):
  """A file laid out like keras.applications' downloaded densenet121_weights_tf_dim_ordering_tf_kernels.h5:
  Keras 2 save_weights with keras-applications 1.0's names ('conv1/conv', 'conv1/bn', 'fc1000'), one HDF5 group
  per layer (a '/' nests groups) holding datasets named like 'conv1/conv/kernel:0'."""
  import h5py
  renamed = {'conv1_conv': 'conv1/conv', 'conv1_bn': 'conv1/bn', 'predictions': 'fc1000'}
  layers = {}
  for key, value in keras_weights.items():
    layer, weight = key.split('/')
    layers.setdefault(renamed.get(layer, layer), []).append((weight, value))
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [name.encode() for name in ['input_1', 'zero_padding2d_1', *layers, 'avg_pool']]
    f.attrs['backend'], f.attrs['keras_version'] = b'tensorflow', b'2.1.2'
    for name in ('input_1', 'zero_padding2d_1', 'avg_pool'):
      f.create_group(name).attrs['weight_names'] = []
    for name, layer_weights in layers.items():
      group = f.create_group(name)
      group.attrs['weight_names'] = [f'{name}/{weight}:0'.encode() for weight, _ in layer_weights]
      for weight, value in layer_weights:
        group.create_dataset(f'{name}/{weight}:0', data=value)
  return str(path)


def _save(net, path):
  path = str(path)
  if not os.path.exists(path):
    net.save_weights(path) if path.endswith('.weights.h5') else net.save(path)
  return path


def test_headless_keras_weights_convert_to_a_backbone_that_gets_a_head(keras_densenet121):
  # As keras.applications.DenseNet121(include_top=False) and its "_notop" weight files.
  all_weights, _ = weights.keras_model_weights(keras_densenet121)
  headless = {k: v for k, v in all_weights.items() if not k.startswith('predictions/')}
  variables = weights.from_keras(headless, 'densenet121')
  assert 'classifier' not in variables['params'] and 'final_norm' in variables['batch_stats']
  model = model_lib.create_model('densenet121', num_classes=7)
  full = weights.replace_head(variables, model, jax.random.key(0))
  assert full['params']['classifier']['kernel'].shape == (1024, 7)


# ----------------------------------------------------------------------------------------------------------------
# Files, the command line and checkpoints


def torchvision_like_state_dict(model, seed=0):
  return weights.to_torch_state_dict(random_variables(model, seed))


def test_safetensors_round_trip_through_the_command_line(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  model = model_lib.create_model('densenet121', num_classes=1000)
  variables = random_variables(model)
  source = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(weights.to_torch_state_dict(variables), str(source))
  output = tmp_path / 'converted'
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.weights', 'convert', f'--source={source}', '--model=densenet121',
       f'--output={output}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert str(output) in result.stdout and '7,978,856 parameters' in result.stdout
  assert_trees_equal(weights.load_variables(output), variables)
  metadata = weights.read_metadata(output)
  assert (metadata['model'], metadata['num_classes'], metadata['source_framework']) == ('densenet121', 1000, 'torch')
  # An existing output is not overwritten without being asked to.
  result = subprocess.run(
      [sys.executable, '-m', 'densenet_jax.weights', 'convert', f'--source={source}', f'--output={output}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'already exists' in result.stderr


def test_convert_file_returns_the_model_with_its_variables(tmp_path):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  model = model_lib.cifar_densenet(16, 4, bottleneck=True, compression=0.5, num_classes=7)
  variables = random_variables(model)
  source = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(weights.to_torch_state_dict(variables), str(source))
  converted = weights.convert_file(source)  # architecture and classes inferred from the file
  assert converted.model == model and converted.name is None and converted.framework == 'torch'
  assert_trees_equal(converted.variables, variables)
  named = weights.convert_file(source, model)
  assert named.model == model


@needs_torch
def test_pth_round_trip_with_old_style_keys(tmp_path):
  model = model_lib.create_model('densenet121', num_classes=1000)
  variables = random_variables(model, seed=5)
  state = {'module.' + k.replace('.norm2.', '.norm.2.'): torch.from_numpy(v)
           for k, v in weights.to_torch_state_dict(variables).items()}
  state['module.features.norm0.num_batches_tracked'] = torch.tensor(7)
  torch.save({'epoch': 90, 'state_dict': state}, tmp_path / 'checkpoint.pth')  # a training checkpoint
  cli.main(['convert', f'--source={tmp_path / "checkpoint.pth"}', f'--output={tmp_path / "out"}'])
  restored = weights.load_variables(tmp_path / 'out')
  assert_trees_equal(restored, variables)
  assert weights.read_metadata(tmp_path / 'out')['model'] == 'densenet121'  # inferred


# (densenet121, densenet161 and CIFAR models: in test_torch_reference_has_torchvision_names_and_flax_parameter_count)
@pytest.mark.parametrize('name', ['densenet169', 'densenet201'])
def test_architecture_is_inferred_from_the_weights(name):
  model = model_lib.MODELS[name]()
  state = weights.to_torch_state_dict(zeros_like(abstract_variables(model)))
  assert weights.infer_model(state) == (name, model)
  assert weights.infer_model(state, 'torch')[1].num_classes == 1000


def tiny_model(num_classes=5):
  return model_lib.cifar_densenet(11, 4, bottleneck=True, compression=0.5, num_blocks=2, num_classes=num_classes)


def test_replace_head_keeps_the_backbone_and_fits_the_new_classes():
  pretrained = random_variables(tiny_model(num_classes=5))
  target = tiny_model(num_classes=3)
  variables = weights.replace_head(pretrained, target, jax.random.key(0))
  head = variables['params']['classifier']
  features = pretrained['params']['classifier']['kernel'].shape[0]
  assert head['kernel'].shape == (features, 3) and not np.any(head['bias'])
  assert 0 < np.abs(head['kernel']).max() <= 1 / math.sqrt(features)  # Torch's default Linear init, as model_lib.py
  without_head = lambda v: {c: {k: x for k, x in t.items() if k != 'classifier'} for c, t in v.items()}
  assert_trees_equal(without_head(variables), without_head(pretrained))
  assert logits(target, variables, np.zeros((2, 8, 8, 3), np.float32)).shape == (2, 3)
  # Same number of classes: the pretrained head stays.
  assert_trees_equal(weights.replace_head(pretrained, tiny_model(num_classes=5), jax.random.key(0)), pretrained)
  # Only the head may differ.
  with pytest.raises(weights.WeightMismatchError, match=r'block1/layer1/conv1/kernel \(1, 1, 8, 16\) vs'):
    weights.replace_head(pretrained, tiny_model().clone(growth_rate=6), jax.random.key(0))


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_weights_of_another_architecture_name_the_first_mismatch():
  state = torchvision_like_state_dict(model_lib.create_model('densenet169', num_classes=1000))
  with pytest.raises(weights.WeightMismatchError) as error:
    weights.from_torch_state_dict(state, 'densenet121')
  message = str(error.value)
  # Blocks 1-2 and the first 24 layers of block 3 fit; the third transition is the first that does not.
  c121 = channels_before_transition((6, 12, 24, 16), 32, 64, 3)
  c169 = channels_before_transition((6, 12, 32, 32), 32, 64, 3)
  assert (f'First mismatching key: features.transition3.norm.weight has shape {(c169,)} in the file but '
          f'{(c121,)} in the model') in message
  assert error.value.mismatched[0] == ('features.transition3.norm.weight', (c169,), (c121,))
  assert error.value.missing == []
  extra_layers = (32 - 24) + (32 - 16)
  assert len(error.value.unexpected) == 10 * extra_layers  # norm1 (4), conv1, norm2 (4), conv2 per layer
  assert f'unexpected keys ({10 * extra_layers})' in message and 'denseblock3.denselayer25.norm1.weight' in message
  assert 'looks like densenet169' in message
  assert 'replace_head' not in message  # same number of classes: no advice about the head


def test_missing_and_unexpected_keys_are_listed():
  state = torchvision_like_state_dict(model_lib.create_model('densenet121', num_classes=1000))
  removed = ['features.denseblock2.denselayer3.conv1.weight', 'features.norm5.running_var']
  for key in removed:
    del state[key]
  state['features.denseblock2.denselayer3.extra.weight'] = np.zeros(3, np.float32)
  with pytest.raises(weights.WeightMismatchError) as error:
    weights.from_torch_state_dict(state, 'densenet121')
  assert error.value.missing == removed and error.value.unexpected == ['features.denseblock2.denselayer3.extra.weight']
  for key in [*removed, 'features.denseblock2.denselayer3.extra.weight']:
    assert key in str(error.value)


def test_number_of_classes_mismatch_points_to_replace_head():
  state = torchvision_like_state_dict(tiny_model(num_classes=5))
  assert weights.from_torch_state_dict(state, tiny_model(num_classes=5))['params']['classifier']['bias'].shape == (5,)
  with pytest.raises(weights.WeightMismatchError,
                     match=r'classifier has 5 outputs in the file, 10 in the model(.|\n)*replace_head'):
    weights.from_torch_state_dict(state, tiny_model(num_classes=10))


@pytest.mark.parametrize('name, content', [
    ('weights.onnx', b'anything'),
    ('weights.safetensors', b'not a safetensors file'),
    ('weights.h5', b'not an hdf5 file'),
    pytest.param('weights.pth', b'not a pickle', marks=needs_torch),
])
def test_unreadable_or_unsupported_files_list_the_supported_formats(tmp_path, name, content):
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(weights.WeightFileError) as error:
    weights.load_weights_file(path, 'densenet121')
  for suffix in ('.pth', '.pt', '.bin', '.safetensors', '.h5', '.keras'):
    assert suffix in str(error.value)
  assert name in str(error.value)


def test_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
  (tmp_path / 'w.onnx').write_bytes(b'x')
  with pytest.raises(SystemExit) as exit_info:
    cli.main(['convert', f'--source={tmp_path / "w.onnx"}', f'--output={tmp_path / "out"}'])
  assert exit_info.value.code == 1
  assert 'supported are' in capsys.readouterr().err.lower()
  assert not (tmp_path / 'out').exists()


def test_pth_without_pytorch_says_what_to_do(tmp_path, monkeypatch):
  (tmp_path / 'w.pth').write_bytes(b'x')
  monkeypatch.setitem(sys.modules, 'torch', None)  # makes `import torch` fail
  with pytest.raises(ImportError, match=r'needs PyTorch(.|\n)*safetensors'):
    weights.read_state_dict(tmp_path / 'w.pth')
