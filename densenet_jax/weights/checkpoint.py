"""Pretrained variables for a model with another classifier (fine-tuning).

Converted weights are written and read by densenet_jax.checkpoints (save_variables / load_variables /
read_metadata): a plain orbax checkpoint of {'params', 'batch_stats'}, the source kept in its custom metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from densenet_jax import models
from densenet_jax.weights import convert

COLLECTIONS = ('params', 'batch_stats')


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  flat = {}
  for collection in COLLECTIONS:
    tree = flax.core.unfreeze(variables.get(collection, {}))
    for path, leaf in traverse_util.flatten_dict(tree).items():
      flat[(collection, *path)] = leaf
  return flat


def _name(path: tuple[str, ...]) -> str:
  return '/'.join(path)


def replace_head(variables: Mapping[str, Any], model: models.DenseNet, rng: jax.Array) -> dict[str, dict]:
  """Variables for `model` from pretrained `variables`: everything but the classifier must fit exactly; the
  classifier is kept when its shape fits `model` and otherwise newly initialized (as `model.init` would, from
  `rng`), also when `variables` have none. Returns nested dicts of numpy arrays in the model's param dtype.
  """
  leaves = convert.model_leaves(model)
  given = _flat(variables)
  target = {(leaf.collection, *leaf.path): leaf for leaf in leaves}
  is_head = lambda path: path[1] == 'classifier'
  missing = [_name(p) for p in target if not is_head(p) and p not in given]
  unexpected = [_name(p) for p in given if not is_head(p) and p not in target]
  mismatched = [(_name(p), tuple(np.shape(given[p])), leaf.shape) for p, leaf in target.items()
                if not is_head(p) and p in given and tuple(np.shape(given[p])) != leaf.shape]
  if missing or unexpected or mismatched:
    raise convert.WeightMismatchError(
        'The pretrained variables do not fit the model apart from its classifier:'
        + convert._listing('shape mismatches (pretrained vs model)',
                           [f'{name} {got} vs {want}' for name, got, want in mismatched])
        + convert._listing('missing', missing) + convert._listing('unexpected', unexpected)
        + '\n  Only the classifier may differ (e.g. the number of classes); the rest of the architecture must be '
        'the one the weights were converted for.',
        missing=missing, unexpected=unexpected, mismatched=mismatched)
  out: dict[str, dict] = {c: {} for c in COLLECTIONS}
  for path, leaf in target.items():
    if not is_head(path):
      convert._set(out[path[0]], path[1:], np.asarray(given[path], dtype=leaf.dtype))
  head = {p: leaf for p, leaf in target.items() if is_head(p)}
  if all(p in given and tuple(np.shape(given[p])) == leaf.shape for p, leaf in head.items()):
    for path, leaf in head.items():
      convert._set(out[path[0]], path[1:], np.asarray(given[path], dtype=leaf.dtype))
    return out
  old = given.get(('params', 'classifier', 'kernel'))
  logging.info('New %d-class classifier (pretrained: %s).', model.num_classes,
               'none' if old is None else f'{np.shape(old)[-1]} classes')
  kernel = head[('params', 'classifier', 'kernel')]
  # The same initializers as models.DenseNet's classifier.
  dense = nn.Dense(model.num_classes, kernel_init=models.dense_kernel_init, bias_init=nn.initializers.zeros,
                   param_dtype=model.param_dtype)
  new = dense.init(rng, jnp.zeros((1, kernel.shape[0]), model.param_dtype))['params']
  out['params']['classifier'] = jax.tree.map(np.asarray, jax.device_get(flax.core.unfreeze(new)))
  return out
