"""The training loop: learning, schedules, weight decay, outputs, resume, config checks."""

import contextlib
import dataclasses
import functools
import importlib
import json
import os
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from chosen import chosen_form
from densenet_jax.io import checkpoints
from densenet_jax import model as model_lib
from densenet_jax.io import loading
from densenet_jax.io import workdir as workdir_lib
from densenet_jax import config as config_lib
from densenet_jax.data import pipeline
from densenet_jax.training import optim
from densenet_jax.training import reporting
from densenet_jax.training import steps
from densenet_jax.data import sources
from densenet_jax import evaluation
from densenet_jax.training import loop as training


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """Digits with a one-layer-per-block DenseNet-BC: a few seconds per epoch on a CPU."""
  config = config_lib.get_config()
  config.model = 'cifar_densenet'
  config.architecture = ml_collections.ConfigDict(
      dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5))
  config.dataset = 'digits'
  config.augment = False
  config.batch_size = 32
  config.num_epochs = 2
  config.lr_boundaries_epochs = (1,)
  config.log_every_steps = 10
  config.progress_bar = False
  for key, value in overrides.items():
    config[key] = value
  return config


def final_params(workdir):
  return loading.load_variables(workdir)['params']


def test_learning_rate_schedule_boundaries():
  fn = optim.create_learning_rate_fn(0.1, (150, 225), 0.1, steps_per_epoch=782)
  assert float(fn(0)) == pytest.approx(0.1)
  assert float(fn(150 * 782 - 1)) == pytest.approx(0.1)
  assert float(fn(150 * 782)) == pytest.approx(0.01)
  assert float(fn(225 * 782 - 1)) == pytest.approx(0.01)
  assert float(fn(225 * 782)) == pytest.approx(0.001)
  svhn = optim.create_learning_rate_fn(0.1, (20, 30), 0.1, steps_per_epoch=10)
  assert [round(float(svhn(s)), 6) for s in (199, 200, 299, 300)] == [0.1, 0.01, 0.01, 0.001]


def test_weight_decay_applies_to_every_parameter():
  params = {'conv': {'kernel': jnp.full((3,), 2.0)}, 'norm': {'scale': jnp.ones(2), 'bias': jnp.full(2, -1.0)},
            'classifier': {'bias': jnp.full(4, 3.0)}}
  tx = optim.create_optimizer(optax.constant_schedule(0.1), momentum=0.9, nesterov=True, weight_decay=1e-4)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Nesterov SGD on g + wd * p with g = 0: the first update is -lr * (1 + momentum) * wd * p.
  expected = jax.tree.map(lambda p: -0.1 * 1.9 * 1e-4 * p, params)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_train_and_evaluate_learns_digits_and_writes_outputs(tmp_path):
  config = tiny_config(num_epochs=4, lr_boundaries_epochs=(3,), eval_every_epochs=2, augment=True)
  final = training.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 4 * (1437 // 32)
  assert final['eval_accuracy'] > 0.8  # chance is 0.1

  records = reporting.read_metrics(str(tmp_path))
  train_records = [r for r in records if 'train_loss' in r]
  eval_records = [r for r in records if 'eval_accuracy' in r]
  assert [r['epoch'] for r in eval_records] == [2, 4]
  assert {'step', 'epoch', 'train_loss', 'train_accuracy', 'learning_rate', 'images_per_second'} <= set(train_records[0])
  assert {'eval_loss', 'eval_accuracy', 'eval_top5_accuracy'} <= set(eval_records[0])
  assert train_records[-1]['train_loss'] < train_records[0]['train_loss']
  assert train_records[-1]['learning_rate'] == pytest.approx(0.01)
  assert os.path.exists(tmp_path / 'error_curves.png')
  assert os.listdir(tmp_path / 'tensorboard')
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['dataset'] == 'digits'
  assert checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=3).latest_step() == final['step']
  # evaluate.py's path: the saved weights give the same test accuracy.
  evaluated = evaluation.evaluate_checkpoint(str(tmp_path), config)
  assert evaluated['eval_accuracy'] == pytest.approx(final['eval_accuracy'])


def test_gradient_accumulation_averages_micro_batch_gradients():
  config = tiny_config()
  model = model_lib.from_config(config, num_classes=10, input_channels=1, **chosen_form(config))
  tx = optim.create_optimizer(optax.constant_schedule(0.1), momentum=0.9, nesterov=True, weight_decay=1e-4)
  state = training.create_train_state(jax.random.key(0), model, (8, 8, 1), tx)
  batch = {'image': jax.random.normal(jax.random.key(1), (8, 8, 8, 1)), 'label': jnp.arange(8) % 10}
  step = jax.jit(lambda s, b, a: training.train_step(
      s, b, jax.random.key(2), learning_rate_fn=optax.constant_schedule(0.1), accumulation_steps=a),
      static_argnums=2)
  accumulated_state, accumulated = step(state, batch, 2)
  # Micro-batch j holds examples j, j + 2, ...; the first SGD step is linear in the gradient, so
  # averaging gradients equals averaging the parameters each micro-batch alone would reach.
  halves = [step(state, jax.tree.map(lambda x: x[j::2], batch), 1) for j in (0, 1)]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, halves[0][0].params, halves[1][0].params)
  for got, want in zip(jax.tree.leaves(accumulated_state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert float(accumulated['train_loss']) == pytest.approx(
      np.mean([float(h[1]['train_loss']) for h in halves]), rel=1e-5)
  assert int(accumulated_state.step) == 1


def test_config_errors_name_the_field_and_the_fix(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="'batch_size'"):
    bad = tiny_config()
    bad.batch_sise = 3  # typo: not a field
    config_lib.validate(bad)
  with pytest.raises(config_lib.ConfigError, match='lr_boundaries_epochs'):
    config_lib.validate(tiny_config(lr_boundaries_epochs=(5,)))
  with pytest.raises(config_lib.ConfigError, match='config.model'):
    config_lib.validate(tiny_config(model='densenet122', architecture=ml_collections.ConfigDict()))
  with pytest.raises(config_lib.ConfigError, match='6n \\+ 4'):
    config_lib.validate(tiny_config(architecture=ml_collections.ConfigDict(
        dict(depth=11, growth_rate=4, bottleneck=True, compression=0.5))))
  with pytest.raises(config_lib.ConfigError, match='config.dataset'):
    config_lib.validate(tiny_config(dataset='cifar11'))
  with pytest.raises(config_lib.ConfigError, match='memory_efficient=True'):
    config_lib.validate(tiny_config(memory_efficient=False, layers_per_scan=4))


def test_layers_per_scan_reaches_the_model():
  config = tiny_config(memory_efficient=True, layers_per_scan=4)
  config_lib.validate(config)
  model = model_lib.from_config(config, num_classes=10, input_channels=1, **chosen_form(config))
  assert model.layers_per_scan == 4 and model.memory_efficient


def test_workdir_with_another_config_is_refused(tmp_path):
  workdir_lib.record_config(tiny_config(), str(tmp_path))
  workdir_lib.record_config(tiny_config(log_every_steps=5), str(tmp_path))  # cosmetic change
  with pytest.raises(config_lib.ConfigError, match='learning_rate: 0.1 -> 0.2'):
    workdir_lib.record_config(tiny_config(learning_rate=0.2), str(tmp_path))


def test_a_run_started_before_a_config_field_existed_resumes(tmp_path):
  workdir_lib.record_config(tiny_config(), str(tmp_path))
  path = tmp_path / workdir_lib.CONFIG_FILE
  older = json.loads(path.read_text())
  del older['batch_norm_group_size']  # as written before the field was added
  path.write_text(json.dumps(older))
  workdir_lib.record_config(tiny_config(), str(tmp_path))  # the field's default: same config
  with pytest.raises(config_lib.ConfigError, match='batch_norm_group_size: None -> 2'):
    workdir_lib.record_config(tiny_config(batch_norm_group_size=2), str(tmp_path))


def test_a_run_may_resume_with_another_form_of_the_same_model(tmp_path):
  # Runs recorded before the block form defaulted to the backend's wrote memory_efficient=False, layers_per_scan=0.
  workdir_lib.record_config(tiny_config(memory_efficient=False, layers_per_scan=0, kernels='xla'), str(tmp_path))
  workdir_lib.record_config(tiny_config(), str(tmp_path))
  workdir_lib.record_config(tiny_config(memory_efficient=True, layers_per_scan=2, kernels='cpu'), str(tmp_path))


def test_init_from_replaces_the_head_when_classes_differ(tmp_path):
  source = tiny_config(num_epochs=1, lr_boundaries_epochs=())
  training.train_and_evaluate(source, str(tmp_path))
  pretrained = loading.load_variables(str(tmp_path))

  def fresh_state(config, num_classes):
    model = model_lib.from_config(config, num_classes=num_classes, input_channels=1, **chosen_form(config))
    tx = optim.create_optimizer(optax.constant_schedule(0.1), momentum=0.9, nesterov=True, weight_decay=0)
    return jax.jit(lambda key: training.create_train_state(key, model, (8, 8, 1), tx))(jax.random.key(5))

  state = fresh_state(source, num_classes=5)
  sharding = jax.tree.map(lambda x: x.sharding, state)
  model5 = model_lib.from_config(source, num_classes=5, input_channels=1, **chosen_form(source))
  loaded = training._init_from(state, str(tmp_path), model5, jax.random.key(5), sharding)
  np.testing.assert_array_equal(loaded.params['stem_conv']['kernel'], pretrained['params']['stem_conv']['kernel'])
  np.testing.assert_array_equal(loaded.batch_stats['final_norm']['var'],
                                pretrained['batch_stats']['final_norm']['var'])
  assert loaded.params['classifier']['kernel'].shape[-1] == 5
  # The new head is initialized as the model initializes it: same initializer, same scale.
  assert np.all(np.asarray(loaded.params['classifier']['bias']) == 0)

  wider = tiny_config(architecture=ml_collections.ConfigDict(
      dict(depth=10, growth_rate=8, bottleneck=True, compression=0.5)))
  wider_model = model_lib.from_config(wider, num_classes=10, input_channels=1, **chosen_form(wider))
  with pytest.raises(ValueError, match=r'do not fit the model(.|\n)*stem_conv/kernel \(3, 3, 1, 8\) vs \(3, 3, 1, 16\)'):
    training._init_from(fresh_state(wider, 10), str(tmp_path), wider_model, jax.random.key(5), sharding)


# One real train + eval step for each dataset family, on TFDS mock data or files made here.

MOCK_EXAMPLES = 64


@contextlib.contextmanager
def mock_tfds_dataset(name, image_size=None):
  """TFDS mock data with the real feature specs; the split sizes shrunk to what the mock yields."""
  real_info = pipeline.get_dataset_info

  def small_info(dataset, **kwargs):
    info = real_info(dataset, **kwargs)
    if dataset != name:
      return info
    splits = {split: MOCK_EXAMPLES for split in info.eval_splits}
    if name == 'svhn_cropped':
      splits['validation'] = 2 * 10 * 2  # two per class from train and from extra, see below
    return dataclasses.replace(info, num_train_examples=MOCK_EXAMPLES, eval_splits=splits)

  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES), \
       mock.patch.object(tfds.core.DatasetBuilder, 'is_prepared', return_value=True), \
       mock.patch.object(pipeline, 'get_dataset_info', small_info), \
       mock.patch.object(sources, 'SVHN_VALIDATION_PER_CLASS', {'train': 2, 'extra': 2}), \
       mock.patch.object(checkpoints, 'Checkpointer',
                         functools.partial(checkpoints.Checkpointer, asynchronous=False)):
    # The mock swaps the whole file system while it opens a dataset, which would redirect the
    # writes of a checkpoint being saved in the background at that moment: save synchronously.
    yield


@pytest.mark.parametrize('dataset, augment, image_size', [
    ('cifar10', True, None),
    ('cifar100', False, None),
    ('svhn_cropped', False, None),
    ('imagenet2012', True, 32),
])
def test_one_train_and_eval_epoch_per_tfds_dataset(tmp_path, dataset, augment, image_size):
  config = tiny_config(dataset=dataset, augment=augment, num_epochs=2, lr_boundaries_epochs=(1,),
                       dropout_rate=0.0 if augment else 0.2)
  config.image_size = image_size
  if dataset == 'svhn_cropped':
    config.eval_split, config.keep_best_checkpoint = 'validation', True
  if dataset == 'imagenet2012':
    config.eval_split, config.ten_crop_eval = 'validation', True
  with mock_tfds_dataset(dataset):
    final = training.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 2 * MOCK_EXAMPLES // config.batch_size
  assert np.isfinite(final['eval_loss']) and 0 <= final['eval_accuracy'] <= 1
  if dataset == 'svhn_cropped':
    assert 'test_accuracy' in final and final['best_step'] in (2, 4)
  if dataset == 'imagenet2012':
    assert 0 <= final['eval_ten_crop_accuracy'] <= 1 and 'eval_ten_crop_top5_accuracy' in final


def test_one_train_and_eval_epoch_on_an_image_folder(tmp_path):
  rng = np.random.default_rng(0)
  for split, count in (('train', 8), ('val', 4)):
    for label in ('cat', 'dog'):
      os.makedirs(tmp_path / 'data' / split / label)
      for i in range(count):
        image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        suffix = 'png' if i % 2 else 'jpg'
        tf.io.write_file(str(tmp_path / 'data' / split / label / f'{i}.{suffix}'),
                         tf.io.encode_png(image) if suffix == 'png' else tf.io.encode_jpeg(image))
  config = tiny_config(dataset='image_folder', augment=True, batch_size=8, num_epochs=1,
                       lr_boundaries_epochs=(), eval_split='val')
  config.data_dir, config.image_size = str(tmp_path / 'data'), 32
  final = training.train_and_evaluate(config, str(tmp_path / 'run'))
  assert final['step'] == 2 and np.isfinite(final['eval_loss'])


def test_quickstart_reaches_97_percent_on_digits(tmp_path):
  config = importlib.import_module('configs.quickstart').get_config()
  config.progress_bar = False
  final = training.train_and_evaluate(config, str(tmp_path))
  assert final['eval_accuracy'] >= 0.97


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_all_finite_finds_one_bad_value_among_leaves_of_every_shape_and_dtype(bad):
  tree = {'kernel': np.ones((3, 3, 4, 2), np.float32), 'scale': np.ones((5,), jnp.bfloat16),
          'count': np.array(7, np.int32), 'loss': np.float32(0.5)}
  check = jax.jit(steps.all_finite)
  assert bool(check(tree, {'var': np.ones((2, 6), np.float32)}))
  for name in ('kernel', 'scale', 'loss'):
    broken = dict(tree, **{name: np.array(tree[name]).copy()})
    broken[name].reshape(-1)[-1] = bad
    assert not bool(check(broken)), name
  assert bool(check({'count': np.array(7, np.int32)})) and bool(check())


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  # Epoch 1 trains normally and is checkpointed; at epoch 1 the learning rate jumps to 1e6.
  config = tiny_config(num_epochs=2, lr_boundaries_epochs=(1,), lr_decay_factor=1e7)
  with pytest.raises(training.TrainingDiverged, match=r'NaN or infinite at step \d+') as error:
    training.train_and_evaluate(config, str(tmp_path))
  bad_step = int(str(error.value).split('at step ')[1].split()[0])
  steps_per_epoch = 1437 // 32
  assert bad_step > steps_per_epoch
  assert checkpoints.Checkpointer(str(tmp_path / 'checkpoints'), keep=3).latest_step() == steps_per_epoch
  params = final_params(str(tmp_path))
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))
