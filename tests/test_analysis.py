"""Feature reuse (Figure 5), channel growth, activations, memory vs depth, loading, figures."""

import io
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import numpy as safetensors_numpy

from chosen import chosen_form
from configs import quickstart
from densenet_jax import analysis
from densenet_jax.model import layers
from densenet_jax import cli
from densenet_jax.io import workdir as workdir_lib
from densenet_jax.io import checkpoints
from densenet_jax import config as config_lib
from densenet_jax import platform
from densenet_jax import model as model_lib
from densenet_jax import summary
from densenet_jax import weights
from densenet_jax.platform import xla_flags
from densenet_jax.weights import __main__ as weights_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ones_like_params(model):
  """Parameters of `model` that are all 1: every existing connection gets a mean |w| of exactly 1."""
  abstract = analysis.abstract_variables(model)['params']
  return jax.tree.map(lambda leaf: np.ones(leaf.shape, np.float32), abstract)


def tiny_imagenet_model(**overrides):
  return model_lib.imagenet_densenet((2, 3), 4, num_classes=3, **overrides)


@pytest.mark.parametrize('model', [
    model_lib.create_model('densenet121', num_classes=1000),
    model_lib.create_model('densenet_l40_k12', num_classes=10),
    model_lib.create_model('densenet_bc_l100_k12', num_classes=100),
    model_lib.cifar_densenet(15, 4, bottleneck=True, compression=0.5, num_blocks=2),
], ids=['densenet121', 'densenet_l40_k12', 'densenet_bc_l100_k12', 'tiny_bc_two_blocks'])
def test_feature_reuse_has_one_lower_triangular_matrix_per_block(model):
  reuse = analysis.feature_reuse(ones_like_params(model))
  growth = analysis.channel_growth(model)
  assert [b.name for b in reuse] == [f'block{i + 1}' for i in range(len(model.block_sizes))]
  for b, (block, num_layers) in enumerate(zip(reuse, model.block_sizes), 1):
    assert block.matrix.shape == (num_layers + 1, num_layers + 1)
    assert block.num_layers == num_layers
    assert block.source_channels == (growth[block.name][0],) + (model.growth_rate,) * num_layers
    assert block.output_name == ('classifier' if b == len(model.block_sizes) else f'transition{b}')
    # Target row t reads sources 0 .. t; the last row (transition / classifier) reads all of them.
    exists = np.tril(np.ones_like(block.matrix, bool))
    np.testing.assert_array_equal(np.isnan(block.matrix), ~exists)
    np.testing.assert_array_equal(block.matrix[exists], 1.0)


def hand_built_value(b, t, s):
  """A distinct value for block b, target row t, source s; exact in binary floating point."""
  return (-1) ** s * (b + t / 8 + s / 64)


@pytest.mark.parametrize('bottleneck, block_inputs', [(False, (16, 14)), (True, (8, 10))])
def test_hand_built_weights_give_the_expected_heat_map(bottleneck, block_inputs):
  # Two blocks of 3 layers, growth 4.
  model = model_lib.cifar_densenet(15 if bottleneck else 9, 4, bottleneck=bottleneck, compression=0.5,
                                num_blocks=2, num_classes=3)
  assert model.block_sizes == (3, 3)
  params = jax.tree.map(np.zeros_like, ones_like_params(model))
  growth, k = analysis.channel_growth(model), model.growth_rate
  expected = []
  for b, num_layers in enumerate(model.block_sizes, 1):
    k0 = growth[f'block{b}'][0]
    channels = lambda s: slice(0, k0) if s == 0 else slice(k0 + (s - 1) * k, k0 + s * k)
    consumer = params[f'transition{b}']['conv'] if b < len(model.block_sizes) else params['classifier']
    targets = [params[f'block{b}'][f'layer{t}']['conv1'] for t in range(1, num_layers + 1)] + [consumer]
    matrix = np.full((num_layers + 1, num_layers + 1), np.nan)
    for t, target in enumerate(targets):
      for s in range(t + 1):
        value = hand_built_value(b, t, s)
        # Twice the value on every other channel of the source, zero on the rest: the average over the
        # source's channels (its "number of input feature maps") is the value.
        kernel = target['kernel']
        start = channels(s).start
        for c in range(channels(s).start, channels(s).stop):
          kernel[..., c, :] = 2 * value if (c - start) % 2 == 0 else 0.0
        matrix[t, s] = abs(value)
    expected.append(matrix)
  # The second convs of bottleneck layers, the norms and the stem are ignored.
  if bottleneck:
    params['block1']['layer1']['conv2']['kernel'][:] = 100.0
  params['stem_conv']['kernel'][:] = 100.0

  reuse = analysis.feature_reuse(params)
  assert [b.source_channels for b in reuse] == [(k0, 4, 4, 4) for k0 in block_inputs]
  for block, matrix in zip(reuse, expected):
    np.testing.assert_array_equal(block.matrix, matrix)


def test_feature_reuse_of_a_backbone_and_of_the_wrong_tree():
  params = ones_like_params(tiny_imagenet_model())
  backbone = {k: v for k, v in params.items() if k != 'classifier'}
  last = analysis.feature_reuse(backbone)[-1]
  assert last.output_name is None and np.all(np.isnan(last.matrix[-1]))
  assert not np.any(np.isnan(last.matrix[:-1][np.tril(np.ones((3, 4), bool))]))
  with pytest.raises(ValueError, match=r"variables\['params'\]"):
    analysis.feature_reuse({'params': params})
  with pytest.raises(ValueError, match='lack transition1'):
    analysis.feature_reuse({k: v for k, v in params.items() if k != 'transition1'})
  with pytest.raises(ValueError, match=r'reads 8 input channels, but the sources have 9'):
    analysis.mean_abs_by_source(np.ones((1, 1, 8, 2)), (5, 4))


def test_normalize_targets_scales_every_row_to_a_maximum_of_one():
  matrix = np.array([[2.0, np.nan, np.nan], [1.0, 4.0, np.nan], [0.5, 0.25, 1.0]])
  block = analysis.BlockReuse('block1', matrix, 'classifier', (3, 2, 2))
  (normalized,) = analysis.normalize_targets([block])
  np.testing.assert_array_equal(
      normalized.matrix, [[1.0, np.nan, np.nan], [0.25, 1.0, np.nan], [0.5, 0.25, 1.0]])
  assert (normalized.name, normalized.output_name) == ('block1', 'classifier')
  (empty_row,) = analysis.normalize_targets([analysis.BlockReuse('block1', np.full((2, 2), np.nan), None, (3, 2))])
  assert np.all(np.isnan(empty_row.matrix))


@pytest.mark.parametrize('name', ['densenet121', 'densenet_l40_k12', 'densenet_bc_l100_k12'])
def test_channel_growth_is_k0_plus_l_times_k(name):
  model = model_lib.create_model(name, num_classes=10)
  growth = analysis.channel_growth(model)
  k0 = model.stem_channels
  for b, num_layers in enumerate(model.block_sizes, 1):
    assert growth[f'block{b}'] == tuple(k0 + l * model.growth_rate for l in range(num_layers + 1))
    k0 = math.floor(model.compression * growth[f'block{b}'][-1])
  # The block outputs are the stage shapes of the summary.
  stages = {s.name: s.output_shape[-1] for s in summary.summarize(model).stages}
  assert {b: channels[-1] for b, channels in growth.items()} == {b: stages[b] for b in growth}


@pytest.mark.parametrize('name', sorted(model_lib.MODELS))
def test_paper_depth_is_the_number_in_the_name(name):
  depth = int(re.search(r'(\d+)', name.replace('_k', ' ')).group(1))
  if name == 'densenet264':
    depth = 265  # blocks of 6, 12, 64, 48 layers: the paper's DenseNet-264 has 265 layers by its own count
  assert analysis.paper_depth(model_lib.MODELS[name]()) == depth


@pytest.mark.parametrize('model, size', [
    (model_lib.cifar_densenet(15, 4, bottleneck=True, compression=0.5, num_blocks=2, num_classes=3), 8),
    (tiny_imagenet_model(), 32),
], ids=['cifar_stem', 'imagenet_stem'])
def test_block_activations_have_the_stage_shapes_in_network_order(model, size):
  images = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = model_lib.init_variables(model, jax.random.key(0), images)
  activations = analysis.block_activations(model, variables, images)
  stages = [s for s in summary.summarize(model, (size, size, 3)).stages if s.name != 'classifier']
  assert list(activations) == [s.name for s in stages]
  assert [a.shape for a in activations.values()] == [(2, *s.output_shape) for s in stages]
  assert all(isinstance(a, np.ndarray) for a in activations.values())
  # The last block's output is what the head pools: its logits follow from it.
  head = variables['params']['classifier']
  stats, norm = variables['batch_stats']['final_norm'], variables['params']['final_norm']
  features = activations[stages[-1].name]
  normalized = (features - stats['mean']) / np.sqrt(stats['var'] + layers.BATCH_NORM_EPSILON)
  pooled = np.maximum(normalized * norm['scale'] + norm['bias'], 0).mean(axis=(1, 2))
  np.testing.assert_allclose(pooled @ head['kernel'] + head['bias'], jax.jit(model.apply)(variables, images),
                             rtol=1e-4, atol=1e-5)


MEMORY_SWEEP = """
from densenet_jax import analysis
for p in analysis.activation_memory_vs_depth((16, 22), growth_rate=4, batch_size=4, input_shape=(16, 16, 3)):
  print(p.depth, p.naive_bytes, p.efficient_bytes, type(p.naive_bytes).__name__, type(p.efficient_bytes).__name__)
"""


def test_memory_vs_depth_compares_naive_and_memory_efficient():
  # A fresh process: XLA:CPU keeps rematerialization only with this flag set before JAX starts. LLVM's
  # optimizations come after buffer assignment: without them the memory is the same and compiling twice as fast.
  flags = [xla_flags.KEEP_REMAT_ON_CPU, '--xla_backend_optimization_level=0',
           '--xla_llvm_disable_expensive_passes=true']
  env = {**os.environ, 'XLA_FLAGS': ' '.join(flags), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', MEMORY_SWEEP], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr
  rows = [line.split() for line in result.stdout.splitlines()]
  assert [(r[0], r[3], r[4]) for r in rows] == [('16', 'int', 'int'), ('22', 'int', 'int')]
  (naive_16, efficient_16), (naive_22, efficient_22) = [(int(r[1]), int(r[2])) for r in rows]
  assert 0 < efficient_16 < naive_16 < naive_22 and 0 < efficient_22 < naive_22
  assert efficient_22 / naive_22 < efficient_16 / naive_16  # the saving grows with depth


def test_memory_vs_depth_refuses_to_compare_where_remat_is_removed(monkeypatch):
  monkeypatch.setattr(platform, 'remat_is_effective', lambda *args: False)
  with pytest.raises(RuntimeError, match='cse_barrier_expander'):
    analysis.activation_memory_vs_depth((10,))


def quickstart_config():
  config = quickstart.get_config()
  config.architecture = ml_collections.ConfigDict(dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5))
  return config


def test_load_model_from_a_workdir_and_from_one_of_its_checkpoints(tmp_path):
  config = quickstart_config()
  workdir_lib.record_config(config, str(tmp_path))  # writes config.json as a training run does
  # Loaded models compute with the form the run recorded; what it left open, the backend's.
  expected = model_lib.from_config(config, num_classes=10, input_channels=1, **chosen_form(config))
  variables = model_lib.init_variables(expected, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  checkpointer = checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=1, asynchronous=False)
  checkpointer.save(7, {'step': 7, **variables})
  checkpointer.close()
  for path in (tmp_path, tmp_path / 'checkpoints' / '7'):
    model, loaded = analysis.load_model(str(path))
    assert model == expected
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(got, want)

  config.architecture.depth = 16  # the same workdir claims a deeper model than its checkpoint holds
  os.remove(tmp_path / workdir_lib.CONFIG_FILE)
  workdir_lib.record_config(config, str(tmp_path))
  with pytest.raises(ValueError, match='do not fit the architecture recorded'):
    analysis.load_model(str(tmp_path))


def test_load_model_from_converted_weights(tmp_path):
  model = tiny_imagenet_model()
  variables = model_lib.init_variables(model, jax.random.key(3), jnp.zeros((1, 32, 32, 3)))
  source = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(weights.to_torch_state_dict(variables), str(source))
  weights_cli.main(['convert', f'--source={source}', f'--output={tmp_path / "converted"}'])
  loaded_model, loaded = analysis.load_model(str(tmp_path / 'converted'))
  assert loaded_model == model.clone(**chosen_form({}))  # Converted weights compute in the backend's form.
  np.testing.assert_array_equal(loaded['params']['classifier']['kernel'], variables['params']['classifier']['kernel'])


def test_figures_have_one_panel_per_block_and_render():
  model = tiny_imagenet_model()
  images = jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  variables = model_lib.init_variables(model, jax.random.key(0), images)
  reuse = analysis.feature_reuse(variables['params'])
  fig = analysis.plot_feature_reuse(reuse, title='tiny')
  panels = [ax for ax in fig.axes if ax.get_title()]
  assert [ax.get_title() for ax in panels] == ['block1', 'block2'] and len(fig.axes) == 4  # and 2 colorbars
  assert [[t.get_text() for t in ax.get_xticklabels()] for ax in panels] == [['1', '2', 'T'], ['1', '2', '3', 'C']]
  activations = analysis.block_activations(model, variables, images)
  maps = analysis.plot_feature_maps(activations, num_channels=3, image=images[0])
  assert len(maps.axes) == (len(activations) + 1) * 4
  for figure in (fig, maps):
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png')
    assert buffer.getvalue().startswith(b'\x89PNG')
