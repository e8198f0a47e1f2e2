"""Every config file loads, passes validation and builds its model (abstractly: nothing is compiled)."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from chosen import chosen_form
from densenet_jax import config as config_lib
from densenet_jax import model as model_lib
from densenet_jax.data import pipeline
from densenet_jax.training import loop as training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '[!_]*.py')))
CIFAR_SETUPS = ('cifar10', 'cifar10_plus', 'cifar100', 'cifar100_plus', 'svhn')


def load(name, *args):
  return importlib.import_module(f'configs.{name}').get_config(*args)


def cases():
  """Every file with its default model, and every CIFAR model in one CIFAR setup."""
  yield from ((name, None) for name in CONFIG_NAMES)
  for model in importlib.import_module('configs.cifar10_plus').CIFAR_MODELS:
    yield 'cifar10_plus', model


@pytest.mark.parametrize('name, model', list(cases()))
def test_config_loads_validates_and_builds_its_model(name, model):
  config = load(name, *([model] if model else []))
  config_lib.validate(config)
  info = pipeline.get_dataset_info(config.dataset, data_dir=None, image_size=config.image_size)
  config_lib.validate_against_data(config, info, device_count=1)
  network = model_lib.from_config(config, num_classes=info.num_classes, input_channels=info.image_shape[-1],
                                  **chosen_form(config))
  logits, _ = jax.eval_shape(network.init_with_output, jax.random.key(0), jnp.zeros((2, *info.image_shape)))
  assert logits.shape == (2, info.num_classes)


def test_paper_recipes():
  c10 = load('cifar10', 'densenet_l40_k12')
  assert (c10.dataset, c10.augment, c10.dropout_rate, c10.batch_size, c10.num_epochs) == ('cifar10', False, 0.2, 64, 300)
  assert tuple(c10.lr_boundaries_epochs) == (150, 225)
  c100p = load('cifar100_plus', 'densenet_bc_l190_k40')
  assert (c100p.dataset, c100p.augment, c100p.dropout_rate) == ('cifar100', True, 0.0)
  svhn = load('svhn', 'densenet_bc_l100_k12')
  assert (svhn.num_epochs, tuple(svhn.lr_boundaries_epochs), svhn.eval_split, svhn.keep_best_checkpoint) == (
      40, (20, 30), 'validation', True)
  imagenet = load('imagenet_169')
  assert (imagenet.model, imagenet.batch_size, imagenet.num_epochs) == ('densenet169', 256, 90)
  assert tuple(imagenet.lr_boundaries_epochs) == (30, 60) and imagenet.ten_crop_eval
  for recipe in (c10, c100p, svhn, imagenet):
    assert (recipe.learning_rate, recipe.momentum, recipe.nesterov, recipe.weight_decay) == (0.1, 0.9, True, 1e-4)


def test_unknown_cifar_model_is_refused_with_the_choices():
  with pytest.raises(ValueError, match='densenet_bc_l100_k12'):
    load('cifar10_plus', 'densenet121')
