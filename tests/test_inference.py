"""Using trained DenseNets: predict.py on image files, feature extraction, and (test_export.py) export."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image
import tensorflow as tf

from densenet_jax import config as config_lib
from densenet_jax import features, inference
from densenet_jax import model as model_lib
from densenet_jax.data import image_files, pipeline, sources
from densenet_jax.data import preprocessing as pp
from densenet_jax.training import loop as training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 20


def tiny_digits_config() -> ml_collections.ConfigDict:
  """Digits with a one-layer-per-block DenseNet-BC, one epoch: a few seconds on a CPU."""
  config = config_lib.get_config()
  config.model = 'cifar_densenet'
  config.architecture = ml_collections.ConfigDict(dict(depth=10, growth_rate=4, bottleneck=True, compression=0.5))
  config.dataset = 'digits'
  config.augment = False
  config.batch_size = 128
  config.num_epochs = 1
  config.lr_boundaries_epochs = ()
  config.log_every_steps = 100
  config.progress_bar = False
  config.compilation_cache_dir = ''
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('digits_workdir'))
  training.train_and_evaluate(tiny_digits_config(), path)
  return path


@pytest.fixture(scope='module')
def digit_files(tmp_path_factory):
  """The first 20 test-split digits as 8-bit grayscale PNGs (level = round(value * 255 / 16)), their labels."""
  folder = tmp_path_factory.mktemp('digits_png')
  arrays = sources.load_digits_arrays('test')
  paths = []
  for i in range(NUM_IMAGES):
    levels = np.round(arrays.images[i, :, :, 0].astype(np.float64) * 255 / pp.DIGITS_MAX_VALUE).astype(np.uint8)
    paths.append(str(folder / f'digit_{i:02d}.png'))
    Image.fromarray(levels, mode='L').save(paths[-1])
  return paths


def eval_pipeline_logits(model, variables, count):
  """What evaluate.py computes for the first `count` test images: the model on the eval pipeline's batches."""
  batch = next(pipeline.create_eval_iterator('digits', 'test', global_batch_size=32, device_count=1))
  return np.asarray(model.apply(variables, batch['image'][:count]))


def test_predictions_of_png_files_match_the_eval_pipeline(workdir, digit_files):
  predictor = inference.load_predictor(workdir)
  assert predictor.class_names == tuple(str(i) for i in range(10))
  assert predictor.spec.image_shape == (8, 8, 1)
  predictions, errors = inference.predict_files(predictor, [os.path.dirname(digit_files[0])], batch_size=8)
  assert errors == [] and [p.file for p in predictions] == digit_files  # the folder, sorted
  reference = eval_pipeline_logits(predictor.model, predictor.variables, NUM_IMAGES)
  assert [p.top[0][0] for p in predictions] == list(np.argmax(reference, axis=-1))
  # The files hold the 0..16 values rounded to 8 bits: inputs within 0.5 / 255 of the pipeline's, logits close.
  images = np.stack([image_files.read_image(f, predictor.spec) for f in digit_files])
  np.testing.assert_allclose(predictor.logits(images), reference, atol=0.05)
  probabilities = [sum(p for _, _, p in prediction.top) for prediction in predictions]
  assert all(0 < p <= 1 + 1e-6 for p in probabilities) and len(predictions[0].top) == 5


def test_other_formats_and_sizes_are_read_like_the_png(tmp_path, digit_files):
  spec = image_files.ImageSpec('digits', (8, 8, 1), *pipeline.image_file_normalization('digits'))
  reference = image_files.read_image(digit_files[0], spec)
  gray = np.asarray(Image.open(digit_files[0]))
  for suffix, image in (('bmp', Image.fromarray(gray)), ('gif', Image.fromarray(gray)),
                        ('rgb.png', Image.fromarray(np.repeat(gray[..., None], 3, -1)))):
    path = str(tmp_path / f'digit.{suffix}')
    image.save(path)
    np.testing.assert_allclose(image_files.read_image(path, spec), reference, atol=1e-5, err_msg=suffix)
  big = Image.fromarray(np.kron(gray, np.ones((4, 4), np.uint8)))  # 32x32: shrunk to 8x8 by averaging 4x4 areas
  big.save(tmp_path / 'big.png')
  big.save(tmp_path / 'big.jpg', quality=95)
  np.testing.assert_allclose(image_files.read_image(str(tmp_path / 'big.png'), spec), reference, atol=1e-5)
  assert np.abs(image_files.read_image(str(tmp_path / 'big.jpg'), spec) - reference).max() < 0.2  # lossy JPEG


def test_class_names():
  imagenet = inference.read_names_file(inference.IMAGENET_NAMES_FILE)
  assert len(imagenet) == 1000 and len(set(imagenet)) == 1000
  assert (imagenet[0], imagenet[1], imagenet[207], imagenet[999]) == (
      'tench', 'goldfish', 'golden retriever', 'toilet tissue')
  cifar100 = inference.read_names_file(inference.CIFAR100_NAMES_FILE)
  assert len(cifar100) == 100 and list(cifar100) == sorted(cifar100)  # the fine labels are alphabetical
  config = config_lib.get_config()
  config.data_dir = '/nonexistent/tensorflow_datasets'
  for dataset, expected in (('cifar10', inference.CIFAR10_NAMES), ('cifar100', cifar100),
                            ('imagenet2012', imagenet), ('digits', tuple('0123456789'))):
    config.dataset = dataset
    assert inference.class_names(config, len(expected)) == expected
  config.dataset = 'image_folder'  # the folder is gone: indices
  assert inference.class_names(config, 3) == ('0', '1', '2')


def test_predict_script_reports_unreadable_files_and_predicts_the_others(workdir, digit_files, tmp_path):
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'this is not an image')
  missing = str(tmp_path / 'missing.jpg')
  json_path = str(tmp_path / 'predictions.json')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  command = [sys.executable, os.path.join(REPO, 'predict.py'), f'--checkpoint={workdir}', '--top_k=3',
             f'--json={json_path}', str(broken), *digit_files, missing]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 2, result.stderr
  stderr = [line for line in result.stderr.splitlines() if line.strip()]
  assert sum(line.startswith('Cannot read') for line in stderr) == 2, result.stderr
  assert any(str(broken) in line and 'Unknown image file format' in line for line in stderr), result.stderr
  assert any(missing in line and 'no such file' in line for line in stderr), result.stderr
  assert stderr[-1].startswith('Data error: 2 of 22 image files could not be read'), result.stderr
  assert sum(line in digit_files for line in result.stdout.splitlines()) == NUM_IMAGES
  with open(json_path) as f:
    written = json.load(f)
  assert [p['file'] for p in written['predictions']] == digit_files
  assert len(written['errors']) == 2 and all(len(p['top']) == 3 for p in written['predictions'])
  predictor = inference.load_predictor(workdir)
  expected = np.argmax(eval_pipeline_logits(predictor.model, predictor.variables, NUM_IMAGES), axis=-1)
  assert [p['top'][0]['class'] for p in written['predictions']] == list(expected)
  assert written['predictions'][0]['top'][0]['name'] == str(expected[0])


def test_predict_script_exits_0_when_every_file_is_read(workdir, digit_files):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  script = os.path.join(REPO, 'predict.py')
  ok = subprocess.run([sys.executable, script, f'--checkpoint={workdir}', digit_files[0]],
                      capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.splitlines()[0] == digit_files[0] and len(ok.stdout.splitlines()) == 6


# ----------------------------------------------------------------------------------------------------------------
# Features


@pytest.mark.parametrize('name', sorted(model_lib.MODELS))
def test_feature_info_of_every_model(name):
  model = model_lib.create_model(name, num_classes=10)
  size = 224 if model.stem == 'imagenet' else 32
  info = features.feature_info(model, (size, size, 3))
  assert [i.name for i in info] == [*model.stage_names, 'pre_logits']
  growth, channels = model.growth_rate, model.stem_channels
  for i in info[:-1]:
    assert i.shape == (size // i.stride, size // i.stride, i.channels), i
    if i.name.startswith('block'):
      channels += growth * model.block_sizes[int(i.name[5:]) - 1]
    elif i.name.startswith('transition'):
      channels = int(channels * model.compression)
    assert i.channels == channels, i
  assert info[-1] == features.FeatureInfo('pre_logits', None, channels, (channels,))
  expected_last_stride = 32 if model.stem == 'imagenet' else 4
  assert info[-2].stride == expected_last_stride


def test_extracted_features_are_the_forward_pass_intermediates():
  model = model_lib.cifar_densenet(10, 4, bottleneck=True, compression=0.5, num_classes=7)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  variables = model_lib.init_variables(model, jax.random.key(0), images)
  # Non-trivial running statistics: one train-mode pass.
  _, updates = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(variables, images * 2 + 1)
  variables = {**variables, **updates}

  @jax.jit
  def forward_recording_blocks(variables, images):
    recorded = {}

    def record(next_fun, args, kwargs, context):
      output = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and context.module.name in model.stage_names:
        recorded[context.module.name] = output
      return output

    with nn.intercept_methods(record):
      return model.apply(variables, images), recorded

  logits, recorded = forward_recording_blocks(variables, images)
  assert sorted(recorded) == ['block1', 'block2', 'block3', 'transition1', 'transition2']
  maps = features.extract_features(model, variables, images)
  for name in recorded:
    np.testing.assert_allclose(maps[name], recorded[name], rtol=1e-5, atol=1e-5, err_msg=name)
  classifier = variables['params']['classifier']
  np.testing.assert_allclose(maps['pre_logits'] @ classifier['kernel'] + classifier['bias'], logits, atol=1e-5)
  info = features.feature_info(model, (16, 16, 3))
  assert [(i.name, maps[i.name].shape[1:]) for i in info] == [(i.name, i.shape) for i in info]
  # Backbone weights (no classifier, as converted weights without one): the same features.
  backbone = {**variables, 'params': {k: v for k, v in variables['params'].items() if k != 'classifier'}}
  np.testing.assert_allclose(features.extract_features(model, backbone, images)['pre_logits'], maps['pre_logits'])


def test_converted_imagenet_weights_predict_with_imagenet_names_and_preprocessing(tmp_path):
  """Weights as `python -m densenet_jax.weights convert` writes them (1000 classes, architecture metadata)."""
  from densenet_jax.io import checkpoints  # pylint: disable=import-outside-toplevel

  model = model_lib.DenseNet(block_sizes=(1, 1), growth_rate=4, stem_channels=8, num_classes=1000)
  variables = model_lib.init_variables(model, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  architecture = dict(block_sizes=[1, 1], growth_rate=4, stem='imagenet', stem_channels=8, bottleneck=True,
                      compression=0.5, input_channels=3)
  path = checkpoints.save_variables(str(tmp_path / 'converted'), variables,
                                    metadata={'num_classes': 1000, 'architecture': architecture})
  predictor = inference.load_predictor(path)
  assert predictor.spec.dataset == 'imagenet2012' and predictor.spec.image_shape == (224, 224, 3)
  photo = str(tmp_path / 'photo.jpg')
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(photo)
  [prediction], errors = inference.predict_files(predictor, [photo], top_k_classes=2)
  assert errors == [] and len(prediction.top) == 2
  assert prediction.top[0][1] == predictor.class_names[prediction.top[0][0]] == inference.read_names_file(
      inference.IMAGENET_NAMES_FILE)[prediction.top[0][0]]
  # The eval pipeline's ImageNet preprocessing: shorter side 256 (bicubic), center crop 224, normalization.
  with open(photo, 'rb') as f:
    expected = pp.imagenet_eval_image(tf.constant(f.read()), 224).numpy()
  np.testing.assert_array_equal(image_files.read_image(photo, predictor.spec), expected)
