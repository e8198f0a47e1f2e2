"""Large-batch training: linear learning-rate scaling, warmup, the pod recipe; the paper's schedules unchanged."""

import glob
import importlib
import os

import numpy as np
import optax
import pytest

from densenet_jax import config as config_lib
from densenet_jax.training import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'configs', '[!_]*.py'))
                       if not p.endswith('_pod.py'))


def load(name):
  return importlib.import_module(f'configs.{name}').get_config()


def values(schedule, steps):
  return [float(schedule(s)) for s in steps]


def test_warmup_ramps_linearly_then_follows_the_unmoved_step_schedule():
  spe = 100
  fn = optim.create_learning_rate_fn(1.6, (30, 60), 0.1, steps_per_epoch=spe, warmup_steps=5 * spe)
  # Warmup: 0 at the first step, half the peak in the middle, the peak at its end.
  np.testing.assert_allclose(values(fn, (0, 1, 250, 499, 500)), [0.0, 1.6 / 500, 0.8, 1.6 * 499 / 500, 1.6],
                             rtol=1e-6)
  # The boundaries stay at epochs 30 and 60: no shift by the warmup.
  np.testing.assert_allclose(values(fn, (2999, 3000, 5999, 6000, 8999)), [1.6, 0.16, 0.16, 0.016, 0.016],
                             rtol=1e-6)


def test_batch_scaling_is_linear_in_the_batch_size():
  assert optim.scaled_learning_rate(0.1, 4096, 256) == pytest.approx(1.6)
  assert optim.scaled_learning_rate(0.1, 128, 256) == pytest.approx(0.05)
  assert optim.scaled_learning_rate(0.1, 4096, None) == 0.1  # off: the rate is the rate


def test_pod_recipe():
  config = load('imagenet_121_pod')
  config_lib.validate(config)
  assert (config.model, config.batch_size, config.num_epochs, config.dtype) == ('densenet121', 4096, 90, 'bfloat16')
  assert tuple(config.lr_boundaries_epochs) == (30, 60) and config.warmup_epochs == 5
  spe = 1_281_167 // 4096  # 312 steps per epoch
  fn, _ = optim.from_config(config, spe)
  np.testing.assert_allclose(
      values(fn, (0, 5 * spe // 2, 5 * spe, 30 * spe - 1, 30 * spe, 60 * spe)),
      [0.0, 1.6 * (5 * spe // 2) / (5 * spe), 1.6, 1.6, 0.16, 0.016], rtol=1e-6)


@pytest.mark.parametrize('name', PAPER_CONFIGS)
def test_paper_configs_keep_their_schedule(name):
  config = load(name)
  assert config.lr_reference_batch_size is None and config.warmup_epochs == 0
  spe = 50
  fn, _ = optim.from_config(config, spe)
  paper = optax.piecewise_constant_schedule(
      config.learning_rate, {int(e * spe): config.lr_decay_factor for e in config.lr_boundaries_epochs})
  steps = sorted({0, 1, *(int(e * spe) + d for e in config.lr_boundaries_epochs for d in (-1, 0, 1)),
                  config.num_epochs * spe})
  assert values(fn, steps) == values(paper, steps)


@pytest.mark.parametrize('overrides, message', [
    (dict(warmup_epochs=-1.0), 'warmup_epochs'),
    (dict(warmup_epochs=200.0), 'warmup_epochs'),  # after the first boundary (150)
    (dict(lr_reference_batch_size=0), 'lr_reference_batch_size'),
])
def test_invalid_large_batch_fields_are_refused(overrides, message):
  config = load('cifar10_plus')
  for key, value in overrides.items():
    config[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
