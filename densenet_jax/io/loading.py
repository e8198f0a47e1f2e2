"""Loading what a user points at: a training workdir, one of its checkpoints, or converted weights.

    model, variables = load_model(path)     # any of: a workdir, WORKDIR/checkpoints/<step>, converted weights
    variables = load_variables(path)        # {'params', 'batch_stats'} as numpy arrays
    config = run_config(path)               # the config the weights were trained with

Evaluation, prediction, analysis and fine-tuning (config.init_from) all read weights through here, so a checkpoint
means the same model everywhere. Nothing here imports the training loop, and orbax only when weights are read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from densenet_jax import config as config_lib
from densenet_jax import model as model_lib
from densenet_jax import platform
from densenet_jax.io import checkpoints, storage
from densenet_jax.io import workdir as workdir_lib

IMAGENET_CLASSES = 1000


def recorded_config(workdir: str) -> dict[str, Any] | None:
  """The config.json of `workdir` as a dict, or None if it has none yet."""
  path = f'{workdir}/{workdir_lib.CONFIG_FILE}'
  return workdir_lib.read_config_json(path) if storage.exists(path) else None


def with_form(config: ml_collections.ConfigDict, backend: str,
              recorded: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """A copy of `config` with concrete form fields: each one `config` sets, else the one `recorded` (a run's
  config.json) holds, else `platform.choose`'s for `backend`. So a run keeps the form it started with."""
  filled = config.copy_and_resolve_references()
  for field in workdir_lib.FORM_FIELDS:
    if filled[field] is None and recorded and recorded.get(field) is not None:
      filled[field] = recorded[field]
  for field, value in platform.choose(filled, backend).model_options().items():
    filled[field] = value
  return filled


def find_config(path: str) -> str | None:
  """config.json of a workdir, given the workdir or one of its WORKDIR/{checkpoints,best}/<step> directories."""
  path = storage.absolute(path)
  candidates = [path]
  if os.path.basename(os.path.dirname(path)) in (workdir_lib.CHECKPOINTS_DIR, workdir_lib.BEST_DIR):
    candidates.append(os.path.dirname(os.path.dirname(path)))
  for directory in candidates:
    candidate = f'{directory}/{workdir_lib.CONFIG_FILE}'
    if storage.isfile(candidate):
      return candidate
  return None


def read_config(config_path: str) -> ml_collections.ConfigDict:
  """A run's config.json, completed with the fields added since at their defaults."""
  resolved = config_lib.with_defaults(workdir_lib.read_config_json(config_path))
  reference = config_lib.get_config()
  # JSON has no tuples: give tuple fields (lr_boundaries_epochs) back their type, which validate() checks.
  return ml_collections.ConfigDict({
      k: tuple(v) if isinstance(v, list) and isinstance(reference.get(k), tuple) else v for k, v in resolved.items()})


def run_config(path: str) -> ml_collections.ConfigDict:
  """The config a checkpoint was trained with: its workdir's config.json; for converted ImageNet weights (1000
  classes, no config of their own) the paper's ImageNet evaluation setup."""
  config_path = find_config(path)
  if config_path is not None:
    return read_config(config_path)
  metadata = checkpoints.read_metadata(checkpoint_path(path))
  if metadata.get('num_classes') != IMAGENET_CLASSES:
    raise config_lib.ConfigError(
        f'{path} records no training config (no {workdir_lib.CONFIG_FILE} beside it) and holds no 1000-class '
        'ImageNet classifier; pass --config=FILE naming the dataset its classifier was trained on.')
  config = config_lib.get_config()
  # The model itself is read from the weights; the config names the data and how to evaluate it.
  config.model = metadata['model'] if metadata.get('model') in model_lib.MODELS else 'densenet121'
  config.dataset = 'imagenet2012'
  config.eval_split = 'validation'
  return config


def checkpoint_candidates(path: str) -> list[str]:
  """The checkpoints `path` means, best first: a workdir's complete checkpoints newest first, or `path` itself."""
  path = storage.absolute(path)
  directory = f'{path}/{workdir_lib.CHECKPOINTS_DIR}'
  is_workdir = storage.isdir(directory) or storage.isfile(f'{path}/{workdir_lib.CONFIG_FILE}')
  if not is_workdir:
    return [path]
  steps = checkpoints.complete_steps(directory)
  if not steps:
    raise FileNotFoundError(
        f'{path} is a workdir without any complete checkpoint (its run has not finished an epoch yet, or its '
        'checkpoints were set aside as damaged); train it first, or give a checkpoint directory.')
  return [f'{directory}/{step}' for step in reversed(steps)]


def checkpoint_path(path: str) -> str:
  """The checkpoint `path` means: a workdir's latest complete checkpoint, or `path` itself."""
  return checkpoint_candidates(path)[0]


def load_variables(path: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} as numpy arrays from a workdir (its newest intact checkpoint), one of its
  checkpoints, or converted weights. A damaged checkpoint of a workdir is skipped with a warning (not set aside:
  the run owning the workdir may be running)."""
  *newer, oldest = checkpoint_candidates(path)
  for candidate in newer:
    try:
      return checkpoints.load_variables(candidate)
    except checkpoints.CheckpointCorruptError as error:
      logging.warning('Skipping %s: %s', candidate, error)
  return checkpoints.load_variables(oldest)


def load_model(path: str, **overrides) -> tuple[model_lib.DenseNet, dict[str, Any]]:
  """(model, variables) from a training workdir, one of its checkpoints/<step> directories, or converted weights.

  The architecture comes from the run's config.json or from the converted weights' metadata; the numbers of classes
  and input channels from the weights. The model computes in float32, in the form its run recorded (or, for
  converted weights, the backend's, `with_form`) unless `overrides` say otherwise. Raises ValueError if the
  weights do not fit it.
  """
  path = storage.absolute(path)
  variables = load_variables(path)
  config_path = find_config(path)
  config = read_config(config_path) if config_path is not None else config_lib.get_config()
  for field in workdir_lib.FORM_FIELDS & set(overrides):
    config[field] = overrides[field]
  form = {field: with_form(config, jax.default_backend())[field] for field in workdir_lib.FORM_FIELDS}
  options = {'dtype': jnp.float32, **overrides, **form}
  if config_path is not None:
    params = variables['params']
    model = model_lib.from_config(
        config, num_classes=_kernel(params['classifier']).shape[-1],
        input_channels=_kernel(params['stem_conv']).shape[-2], **options)
  else:
    model = _model_from_metadata(path, checkpoints.read_metadata(path)).clone(**options)
  _check_fits(model, variables, path)
  return model, variables


def _kernel(module_params: Mapping[str, Any]) -> Any:
  return module_params['kernel']


def _model_from_metadata(path: str, metadata: Mapping[str, Any]) -> model_lib.DenseNet:
  if metadata.get('num_classes') is None:
    raise ValueError(
        f'{path} holds no classifier (backbone weights) or no metadata; read its variables with '
        'densenet_jax.io.loading.load_variables(path).'
    )
  if metadata.get('architecture'):
    architecture = {**metadata['architecture'], 'block_sizes': tuple(metadata['architecture']['block_sizes'])}
    return model_lib.DenseNet(**architecture, num_classes=metadata['num_classes'])
  if metadata.get('model') in model_lib.MODELS:
    return model_lib.create_model(metadata['model'], num_classes=metadata['num_classes'])
  raise ValueError(f'The metadata of {path} names no architecture: {dict(metadata)}.')


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {name: tuple(np.shape(leaf)) for name, leaf in traverse_util.flatten_dict(tree, sep='/').items()}


def _check_fits(model: model_lib.DenseNet, variables: Mapping[str, Any], path: str) -> None:
  want, got = _shapes(model_lib.abstract_variables(model)['params']), _shapes(variables['params'])
  if want != got:
    wrong = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    details = '; '.join(f'{k}: model {want.get(k)}, checkpoint {got.get(k)}' for k in wrong[:5])
    recorded = find_config(path) or 'their metadata'
    raise model_lib.WeightMismatchError(
        f'The weights at {path} do not fit the architecture recorded with them in {recorded} ({details}): another '
        'model wrote them. Evaluate or fine-tune them with the config of the run that wrote them.',
        missing=[k for k in wrong if k not in got], unexpected=[k for k in wrong if k not in want],
        mismatched=[(k, got[k], want[k]) for k in wrong if k in got and k in want])
