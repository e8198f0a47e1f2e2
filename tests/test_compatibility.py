"""Checkpoints and converted weights written by release 0.1.0 (jax 0.10.2, orbax 0.12.8) load and compute the same.

tests/data/release_0_1_0 was written by that release: a digits workdir after one training step (config.json and
checkpoints/1) and converted weights of a small ImageNet-stem DenseNet, each with the logits that release computed.
"""

import functools
import os
import shutil

import jax
import numpy as np
import optax

from densenet_jax.io import checkpoints
from densenet_jax.io import loading
from densenet_jax.io import workdir as workdir_lib
from densenet_jax.training import optim, steps

RELEASE = os.path.join(os.path.dirname(__file__), 'data', 'release_0_1_0')


def test_a_training_workdir_of_the_release_loads_with_its_logits():
  model, variables = loading.load_model(os.path.join(RELEASE, 'workdir'))
  logits = model.apply(variables, np.load(os.path.join(RELEASE, 'images.npy')))
  np.testing.assert_allclose(logits, np.load(os.path.join(RELEASE, 'workdir_logits.npy')), rtol=1e-5, atol=1e-5)


def test_a_training_state_of_the_release_resumes(tmp_path):
  workdir = shutil.copytree(os.path.join(RELEASE, 'workdir'), tmp_path / 'workdir')
  model, variables = loading.load_model(str(workdir))
  tx = optim.create_optimizer(optax.constant_schedule(0.1), momentum=0.9, nesterov=True, weight_decay=1e-4)
  template = jax.jit(functools.partial(steps.create_train_state, model=model, image_shape=(8, 8, 1), tx=tx))(
      jax.random.key(0))
  checkpointer = checkpoints.Checkpointer(str(workdir / workdir_lib.CHECKPOINTS_DIR), keep=1)
  state = checkpointer.restore(template)
  checkpointer.close()
  assert int(state.step) == 1
  for restored, loaded in zip(jax.tree.leaves(state.params), jax.tree.leaves(variables['params'])):
    np.testing.assert_array_equal(restored, loaded)
  momentum = jax.tree.leaves(state.opt_state)
  assert any(np.any(np.asarray(m) != 0) for m in momentum)  # The optimizer state came back, not a fresh one.


def test_converted_weights_of_the_release_load_with_their_logits():
  model, variables = loading.load_model(os.path.join(RELEASE, 'converted'))
  logits = model.apply(variables, np.load(os.path.join(RELEASE, 'converted_images.npy')))
  np.testing.assert_allclose(logits, np.load(os.path.join(RELEASE, 'converted_logits.npy')), rtol=1e-5, atol=1e-5)
