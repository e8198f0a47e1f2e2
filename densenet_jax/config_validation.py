"""Checks a config before anything is compiled, so that a typo costs a second, not an hour.

Every problem raises ConfigError with the field's name and what to do; train.py turns it into a
one-paragraph message and exit code 2.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys

import jax
import ml_collections
from absl import flags

from densenet_jax import defaults, input_pipeline, models

RESOLVED_CONFIG_FILE = defaults.RESOLVED_CONFIG_FILE
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
ARCHITECTURE_FIELDS = {'depth': int, 'growth_rate': int, 'bottleneck': bool, 'compression': float}


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and the fix."""


def parse_flags(argv: list[str]) -> list[str]:
  """Flags parser for absl's app.run: an override of a field the config lacks (a typo such as
  --config.batch_sise=3) prints one paragraph and exits with code 2, like every config error."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:  # absl's own message for a malformed flag value.
    print(f'FATAL Flags parsing error: {error}\nPass --helpshort or --helpfull to see help on flags.',
          file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as error:
    # ml_collections rejects the unknown field while parsing, as KeyError("'name'\nDid you mean ...").
    text = error
    while isinstance(text, BaseException) and text.args:  # AttributeError(KeyError(message))
      text = text.args[0]
    match = re.match(r"\W*(\w+)'?\s*(Did you mean .*)?", str(text), re.DOTALL)
    if match is None:
      raise
    field, hint = match.group(1), match.group(2)
    overrides = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.')]
    culprit = next((arg for arg in overrides if field in arg[len('--config.'):].split('.')), None)
    if culprit is None:
      raise
    hint = f' {hint.strip()}' if hint else ''
    print(f'Config error: {culprit}: the config has no field {field!r}.{hint} The fields, with their '
          'meaning, are listed in densenet_jax/defaults.py.', file=sys.stderr)
    sys.exit(2)


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
  reference = defaults.get_config()
  for key in config.keys():
    if key not in reference:
      close = difflib.get_close_matches(key, list(reference.keys()), n=1)
      hint = f' Did you mean {close[0]!r}?' if close else ''
      raise ConfigError(f'Unknown config field {key!r}.{hint} Valid fields: {", ".join(sorted(reference))}.')
    expected, value = reference[key], config[key]
    if isinstance(expected, ml_collections.ConfigDict) or value is None or expected is None:
      continue
    numeric = isinstance(expected, float) and isinstance(value, int) and not isinstance(value, bool)
    if not isinstance(value, type(expected)) and not numeric:
      raise ConfigError(
          f'config.{key} must be a {type(expected).__name__} (like {expected!r}), got {value!r}.'
      )


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks fields, types and values that do not need the data or the devices."""
  _check_known_fields(config)
  if config.model == 'cifar_densenet':
    given = set(config.architecture.keys())
    if given != set(ARCHITECTURE_FIELDS):
      raise ConfigError(
          "config.model='cifar_densenet' needs config.architecture with exactly the fields "
          f'{sorted(ARCHITECTURE_FIELDS)}; got {sorted(given)}.'
      )
    try:
      models.cifar_densenet(**config.architecture.to_dict())
    except (ValueError, TypeError) as error:
      raise ConfigError(f'config.architecture: {error}') from None
  elif config.model not in models.MODELS:
    raise ConfigError(
        f'config.model={config.model!r} is not a model. Use one of {", ".join(models.MODELS)}, '
        "or 'cifar_densenet' with config.architecture."
    )
  elif len(config.architecture):
    raise ConfigError(
        f'config.architecture is only read when config.model is "cifar_densenet", not {config.model!r}; '
        'remove it.'
    )
  if config.dataset not in input_pipeline.DATASET_NAMES:
    raise ConfigError(
        f'config.dataset={config.dataset!r} is not a dataset. Use one of '
        f'{", ".join(input_pipeline.DATASET_NAMES)}.'
    )
  if config.dtype not in COMPUTE_DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r}: use one of {", ".join(COMPUTE_DTYPES)}.')
  for field in ('batch_size', 'num_epochs', 'gradient_accumulation_steps', 'log_every_steps',
                'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints'):
    if config[field] < 1:
      raise ConfigError(f'config.{field} must be at least 1, got {config[field]}.')
  if config.layers_per_scan < 0 or (config.layers_per_scan and not config.memory_efficient):
    raise ConfigError(
        f'config.layers_per_scan={config.layers_per_scan} needs a whole number >= 0, and when positive also '
        '--config.memory_efficient=True (a scanned dense block keeps only what memory_efficient keeps).'
    )
  if not 0.0 <= config.dropout_rate < 1.0:
    raise ConfigError(f'config.dropout_rate must be in [0, 1), got {config.dropout_rate}.')
  if config.learning_rate <= 0:
    raise ConfigError(f'config.learning_rate must be positive, got {config.learning_rate}.')
  boundaries = list(config.lr_boundaries_epochs)
  if boundaries != sorted(boundaries) or any(not 0 < b < config.num_epochs for b in boundaries):
    raise ConfigError(
        f'config.lr_boundaries_epochs={tuple(boundaries)} must be increasing epochs inside the run '
        f'(0 < boundary < num_epochs={config.num_epochs}). Scale them with num_epochs, e.g. '
        f'--config.lr_boundaries_epochs="({config.num_epochs // 2},{3 * config.num_epochs // 4})".'
    )
  if config.batch_size % config.gradient_accumulation_steps:
    raise ConfigError(
        f'config.batch_size={config.batch_size} is not divisible by '
        f'config.gradient_accumulation_steps={config.gradient_accumulation_steps}.'
    )


def validate_against_data(config: ml_collections.ConfigDict, info, device_count: int) -> None:
  """Checks that need the dataset's facts and the number of devices."""
  per_step = device_count * config.gradient_accumulation_steps
  if config.batch_size % per_step:
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be divisible by the number of devices '
        f'({device_count}) times config.gradient_accumulation_steps '
        f'({config.gradient_accumulation_steps}) = {per_step}. Use a multiple of {per_step}.'
    )
  if config.eval_split not in info.eval_splits:
    raise ConfigError(
        f'config.eval_split={config.eval_split!r}: {info.name} has {", ".join(info.eval_splits)}.'
    )
  if config.keep_best_checkpoint and 'test' not in info.eval_splits:
    raise ConfigError(f'config.keep_best_checkpoint reports the test split, which {info.name} lacks.')
  if info.num_train_examples < config.batch_size:
    raise ConfigError(
        f'config.batch_size={config.batch_size} exceeds the {info.num_train_examples} training '
        f'examples of {info.name}.'
    )


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses to continue a run of another config in `workdir`; records the config of a new run.

  Fields that do not change the result (logging, progress bar, checkpoints kept, compilation cache) may differ.
  """
  path = os.path.join(workdir, RESOLVED_CONFIG_FILE)
  resolved = json.loads(config.to_json_best_effort(sort_keys=True))
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    cosmetic = {'log_every_steps', 'progress_bar', 'keep_checkpoints', 'compilation_cache_dir'}
    previous = defaults.with_defaults(previous)  # A field added since the run started ran at its default.
    changed = sorted(k for k in set(previous) | set(resolved)
                     if k not in cosmetic and previous.get(k) != resolved.get(k))
    if changed:
      details = '; '.join(f'{k}: {previous.get(k)!r} -> {resolved.get(k)!r}' for k in changed[:8])
      raise ConfigError(
          f'{workdir} holds a run with another config ({details}). Use a new --workdir for a new '
          f'run, or delete {path} to resume that run with the new config anyway.'
      )
    return
  if jax.process_index() != 0:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(resolved, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
