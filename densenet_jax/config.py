"""The config schema: every field the training loop reads, with the paper's shared recipe, and its checks.

Every file in configs/ starts from `get_config()` and overrides a few fields; any field can also be overridden on
the command line, e.g. `--config.num_epochs=10`. `validate` and `validate_against_data` check a config before
anything is compiled, so that a typo costs a second, not an hour: every problem raises ConfigError with the field's
name and what to do. No TensorFlow, no I/O.
"""

from __future__ import annotations

import difflib
import json
import math

import ml_collections

from densenet_jax import data
from densenet_jax.model import registry
from densenet_jax.model.forms import kernels

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
ARCHITECTURE_FIELDS = {'depth': int, 'growth_rate': int, 'bottleneck': bool, 'compression': float}


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model: a name of densenet_jax.model.MODELS, or 'cifar_densenet' built from `architecture`.
  config.model = 'densenet_bc_l100_k12'
  config.architecture = ml_collections.ConfigDict()  # depth, growth_rate, bottleneck, compression
  config.dropout_rate = 0.0
  # How the model is computed; every form is the same function (docs/performance.md). None: the form measured
  # fastest on the backend the run computes on (on CPUs, per CPU family), chosen once by densenet_jax/platform and
  # recorded in the workdir's config.json, which a resumed run and every loader reuse.
  # memory_efficient: recompute each layer's normalized input in the backward pass. layers_per_scan n > 0: compute
  # each dense block n layers at a time under jax.lax.scan (needs memory_efficient), several times faster to
  # compile; 0: every layer written out.
  config.memory_efficient = ml_collections.FieldReference(None, field_type=bool)
  config.layers_per_scan = ml_collections.FieldReference(None, field_type=int)
  # Examples per BatchNorm statistics group in training (e.g. the per-device batch: per-device BatchNorm, as
  # Goyal et al. 2017 use for large batches). None: the whole global batch, the statistics of one device's run.
  config.batch_norm_group_size = ml_collections.FieldReference(None, field_type=int)
  config.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU. Parameters stay float32.
  # How convolutions and max pooling are written for the compiler (densenet_jax/model/forms/kernels.py): 'xla' or 'cpu'.
  config.kernels = ml_collections.FieldReference(None, field_type=str)
  # How dropout's keep masks are drawn, the same bits either way: 'jax' or 'elementwise'.
  config.dropout_masks = ml_collections.FieldReference(None, field_type=str)

  # Data (densenet_jax.data).
  config.dataset = 'cifar10'
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.download = False  # let TFDS download and prepare a missing dataset (needs internet)
  config.augment = True
  config.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset default
  config.eval_split = 'test'
  config.ten_crop_eval = False  # ImageNet: also report the 10-crop error

  # Optimization: SGD, Nesterov momentum 0.9, weight decay 1e-4 on every parameter (paper, Sec. 4.2).
  config.batch_size = 64  # global, over all devices of all hosts
  config.gradient_accumulation_steps = 1  # split each batch into this many sequential micro-batches
  config.num_epochs = 300
  config.learning_rate = 0.1
  # Large batches (Goyal et al. 2017, https://arxiv.org/abs/1706.02677); the paper uses neither. An integer n:
  # learning_rate is the rate per n images, scaled linearly to batch_size (0.1 per 256 is 1.6 at batch 4096).
  config.lr_reference_batch_size = ml_collections.FieldReference(None, field_type=int)
  # Epochs of linear warmup from 0 to the peak rate before the step schedule (whose boundaries do not move).
  config.warmup_epochs = 0.0
  config.lr_boundaries_epochs = (150, 225)  # the learning rate is divided by 10 at each
  config.lr_decay_factor = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4

  # Evaluation, logging, checkpoints.
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3
  config.keep_best_checkpoint = False  # SVHN: keep the checkpoint with the lowest eval error
  config.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tune from a checkpoint
  config.seed = 0
  config.progress_bar = True
  # Compiled steps are kept here and reused by any later run of the same model, batch and devices: a resume,
  # a rerun or an evaluation skips most of XLA's compile time. '' keeps nothing.
  config.compilation_cache_dir = '~/.cache/densenet_jax/compilation_cache'

  return config


def with_defaults(resolved: dict) -> dict:
  """A run's resolved config (its config.json) completed with the fields added since, at their defaults."""
  return {**json.loads(get_config().to_json_best_effort(sort_keys=True)), **resolved}


class ConfigError(ValueError):
  """A config that cannot run; the message names the field and the fix."""


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
  reference = get_config()
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


def _non_finite_numbers(value, name: str):
  """(name, value) of every NaN or infinite float in `value`, a field of any type: ConfigDicts, dicts, tuples
  and lists are walked, so that a NaN nested anywhere is found."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    for key, item in value.items():
      yield from _non_finite_numbers(item, f'{name}.{key}')
  elif isinstance(value, (tuple, list)):
    for i, item in enumerate(value):
      yield from _non_finite_numbers(item, f'{name}[{i}]')
  elif isinstance(value, float) and not math.isfinite(value):
    yield name, value


def _check_finite(config: ml_collections.ConfigDict) -> None:
  """NaN passes every range check (each comparison is False) and would only show as a NaN loss after
  compiling; an infinity is never a meaningful rate, factor or number of epochs."""
  found = next(_non_finite_numbers(config, 'config'), None)
  if found is not None:
    name, value = found
    raise ConfigError(f'{name}={value} is not a finite number: give a finite value (the defaults and the meaning '
                      'of every field are in densenet_jax/config.py).')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_architecture(architecture: ml_collections.ConfigDict) -> None:
  """The fields of a 'cifar_densenet': their types and ranges here, then the depth rule of the builder
  (registry.cifar_densenet), so that a bad value is named before the model is built or traced."""
  given = set(architecture.keys())
  if given != set(ARCHITECTURE_FIELDS):
    raise ConfigError(
        "config.model='cifar_densenet' needs config.architecture with exactly the fields "
        f'{sorted(ARCHITECTURE_FIELDS)}; got {sorted(given)}.'
    )
  depth, growth_rate = architecture.depth, architecture.growth_rate
  bottleneck, compression = architecture.bottleneck, architecture.compression
  if not _is_int(depth) or depth < 1:
    raise ConfigError(f'config.architecture.depth must be a positive whole number of layers (e.g. 100 for '
                      f'DenseNet-BC L=100), got {depth!r}.')
  if not _is_int(growth_rate) or growth_rate < 1:
    raise ConfigError(f'config.architecture.growth_rate must be a positive whole number of channels that each '
                      f'dense layer adds (the paper uses 12, 24 or 40), got {growth_rate!r}.')
  if not isinstance(bottleneck, bool):
    raise ConfigError(f'config.architecture.bottleneck must be True (DenseNet-B/BC) or False, got {bottleneck!r}.')
  if not isinstance(compression, (int, float)) or isinstance(compression, bool) or not 0 < compression <= 1:
    raise ConfigError(f'config.architecture.compression must be a number in (0, 1]: the fraction of channels a '
                      f'transition keeps (0.5 for DenseNet-BC, 1 for none), got {compression!r}.')
  try:
    registry.cifar_densenet(depth, growth_rate, bottleneck=bottleneck, compression=compression)
  except (ValueError, TypeError) as error:
    raise ConfigError(f'config.architecture.depth={depth}: {error}') from None


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks fields, types and values that do not need the data or the devices."""
  _check_known_fields(config)
  _check_finite(config)
  if config.model == 'cifar_densenet':
    _check_architecture(config.architecture)
  elif config.model not in registry.MODELS:
    raise ConfigError(
        f'config.model={config.model!r} is not a model. Use one of {", ".join(registry.MODELS)}, '
        "or 'cifar_densenet' with config.architecture."
    )
  elif len(config.architecture):
    raise ConfigError(
        f'config.architecture is only read when config.model is "cifar_densenet", not {config.model!r}; '
        'remove it.'
    )
  if config.dataset not in data.DATASET_NAMES:
    raise ConfigError(
        f'config.dataset={config.dataset!r} is not a dataset. Use one of '
        f'{", ".join(data.DATASET_NAMES)}.'
    )
  for field, names in (('kernels', kernels.KERNELS), ('dropout_masks', kernels.DROPOUT_MASKS)):
    if config[field] is not None and config[field] not in names:
      raise ConfigError(f'config.{field}={config[field]!r}: use one of {", ".join(names)}, or None for the '
                        'measured default of the backend.')
  if config.dtype not in COMPUTE_DTYPES:
    raise ConfigError(f'config.dtype={config.dtype!r}: use one of {", ".join(COMPUTE_DTYPES)}.')
  if config.dtype == 'float16':
    # float16 gradients underflow without loss scaling, which the training step does not do.
    raise ConfigError("config.dtype='float16' is not supported for training: it needs loss scaling, which this "
                      "training step does not do. Use 'bfloat16' (GPU/TPU) or 'float32'.")
  if config.augment and config.dataset in data.WITHOUT_AUGMENTATION:
    raise ConfigError(f'config.augment=True, but {config.dataset} has no data augmentation in its recipe; set '
                      '--config.augment=False.')
  for field in ('batch_size', 'num_epochs', 'gradient_accumulation_steps', 'log_every_steps',
                'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints'):
    if config[field] < 1:
      raise ConfigError(f'config.{field} must be at least 1, got {config[field]}.')
  scan = config.layers_per_scan
  if scan is not None and (scan < 0 or (scan > 0 and config.memory_efficient is False)):
    raise ConfigError(
        f'config.layers_per_scan={config.layers_per_scan} needs a whole number >= 0, and when positive also '
        '--config.memory_efficient=True (a scanned dense block keeps only what memory_efficient keeps).'
    )
  if not 0.0 <= config.dropout_rate < 1.0:
    raise ConfigError(f'config.dropout_rate must be in [0, 1), got {config.dropout_rate}.')
  if config.learning_rate <= 0:
    raise ConfigError(f'config.learning_rate must be positive, got {config.learning_rate}.')
  if config.lr_decay_factor <= 0:
    raise ConfigError(f'config.lr_decay_factor must be positive (0.1 divides the learning rate by 10 at each '
                      f'boundary), got {config.lr_decay_factor}.')
  if config.weight_decay < 0:
    raise ConfigError(f'config.weight_decay must be 0 or more (the paper uses 1e-4), got {config.weight_decay}.')
  if config.image_size is not None and config.image_size < 1:
    raise ConfigError(f'config.image_size must be a positive number of pixels (the side images are resized to) or '
                      f'None for the dataset\'s own size, got {config.image_size}.')
  if config.lr_reference_batch_size is not None and config.lr_reference_batch_size < 1:
    raise ConfigError(f'config.lr_reference_batch_size must be a positive number of images (e.g. 256) or None, '
                      f'got {config.lr_reference_batch_size}.')
  boundaries = list(config.lr_boundaries_epochs)
  if not 0 <= config.warmup_epochs < config.num_epochs or (boundaries and config.warmup_epochs > boundaries[0]):
    raise ConfigError(
        f'config.warmup_epochs={config.warmup_epochs} must be >= 0 and end before the run ends '
        f'(num_epochs={config.num_epochs}) and by the first learning-rate boundary '
        f'({boundaries[0] if boundaries else "none"}).'
    )
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
  group = config.batch_norm_group_size
  micro_batch = config.batch_size // config.gradient_accumulation_steps
  if group is not None and (group < 1 or micro_batch % group):
    raise ConfigError(
        f'config.batch_norm_group_size={group} must divide the batch of each step, batch_size / '
        f'gradient_accumulation_steps = {micro_batch}; or use None for the whole batch.'
    )


def validate_input_size(info: data.DatasetInfo, min_input_size: int, model_name: str) -> None:
  """Checks that the dataset's images are large enough for the model's downsampling."""
  height, width = info.image_shape[:2]
  if min(height, width) < min_input_size:
    raise ConfigError(
        f'The images of {info.name} are {height}x{width}, too small for config.model={model_name!r}, which needs '
        f'at least {min_input_size}x{min_input_size}. Set --config.image_size={min_input_size} or larger (datasets '
        'that resize), or use a model with fewer downsampling stages (a CIFAR model).')


def validate_against_data(config: ml_collections.ConfigDict, info: data.DatasetInfo, device_count: int) -> None:
  """Checks that need the dataset's facts and the number of devices."""
  per_step = device_count * config.gradient_accumulation_steps
  if config.batch_size % per_step:
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be divisible by the number of devices '
        f'({device_count}) times config.gradient_accumulation_steps '
        f'({config.gradient_accumulation_steps}) = {per_step}. Use a multiple of {per_step}.'
    )
  group, per_device = config.batch_norm_group_size, config.batch_size // per_step
  if group is not None and group % per_device and per_device % group:
    raise ConfigError(
        f'config.batch_norm_group_size={group} must be a multiple or a divisor of the per-device batch '
        f'({per_device} on {device_count} devices), so that each group lies on whole devices.'
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
