"""The paper's models by name, builders for any DenseNet, models from a config, and new heads for fine-tuning.

    create_model('densenet121', num_classes=1000)                         # a flax.linen.Module
    cifar_densenet(58, 8, bottleneck=True, compression=0.5)               # any DenseNet(-BC), L = 6n + 4
    from_config(config, num_classes=10, input_channels=3)                 # what a training config describes
    init_variables(model, rng, images)                                    # model.init, compiled to run once
    replace_head(variables, model, rng)                                   # pretrained weights, new classifier
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from densenet_jax.model import forms
from densenet_jax.model.densenet import DenseNet
from densenet_jax.model.layers import dense_kernel_init

COLLECTIONS = ('params', 'batch_stats')
# The DenseNet attributes (and config fields) that choose how, not what, the model computes.
FORM_FIELDS = forms.FORM_ATTRIBUTES
_SHOWN_KEYS = 20  # names listed per category in an error message; the exception holds them all


def imagenet_densenet(
    block_sizes: Sequence[int], growth_rate: int = 32, *, num_classes: int = 1000, **overrides
) -> DenseNet:
  """An ImageNet DenseNet-BC (bottleneck, compression 0.5, 2k stem channels)."""
  kwargs = dict(block_sizes=tuple(block_sizes), growth_rate=growth_rate, num_classes=num_classes, stem='imagenet',
                stem_channels=2 * growth_rate, bottleneck=True, compression=0.5)
  return _build(kwargs, overrides)


def cifar_densenet(
    depth: int,
    growth_rate: int,
    *,
    bottleneck: bool,
    compression: float,
    num_classes: int = 10,
    num_blocks: int = 3,
    **overrides,
) -> DenseNet:
  """A CIFAR/SVHN-style DenseNet of total depth L = `depth` with `num_blocks` equal blocks.

  Depth counts the stem conv, the transition convs, the classifier and every conv of the dense layers (two per
  bottleneck layer). With three blocks: L = 3n + 4 without bottleneck and L = 6n + 4 with bottleneck, where n is
  the number of dense layers per block.
  """
  convs_per_layer = 2 if bottleneck else 1
  other_layers = num_blocks + 1  # stem conv + (num_blocks - 1) transitions + classifier
  per_block = convs_per_layer * num_blocks
  if depth <= other_layers or (depth - other_layers) % per_block:
    kind = 'with bottleneck (DenseNet-B/BC)' if bottleneck else 'without bottleneck'
    valid = ', '.join(str(per_block * n + other_layers) for n in range(1, 5))
    raise ValueError(
        f'Impossible depth {depth} for a {num_blocks}-block DenseNet {kind}: depth must be {per_block}n + '
        f'{other_layers} for a whole number n >= 1 of layers per block (e.g. {valid}, ...).'
    )
  if not 0.0 < compression <= 1.0:
    raise ValueError(f'compression must be in (0, 1], got {compression}.')
  n = (depth - other_layers) // per_block
  kwargs = dict(
      block_sizes=(n,) * num_blocks, growth_rate=growth_rate, num_classes=num_classes, stem='cifar',
      # The paper's counts need 16 stem channels for plain DenseNets and 2k for -B/-BC.
      stem_channels=2 * growth_rate if bottleneck else 16, bottleneck=bottleneck, compression=compression,
  )
  return _build(kwargs, overrides)


def _build(kwargs: dict[str, Any], overrides: dict[str, Any]) -> DenseNet:
  valid = {f.name for f in dataclasses.fields(DenseNet)} - {'parent', 'name'}
  unknown = sorted(set(overrides) - valid)
  if unknown:
    raise TypeError(f'Unknown DenseNet option(s) {unknown}; valid options: {sorted(valid)}.')
  return DenseNet(**{**kwargs, **overrides})


_cifar = functools.partial(cifar_densenet, bottleneck=False, compression=1.0)
_cifar_bc = functools.partial(cifar_densenet, bottleneck=True, compression=0.5)

MODELS: dict[str, Callable[..., DenseNet]] = {
    # ImageNet (Table 1 of the paper), 224x224 inputs, 1000 classes by default.
    'densenet121': functools.partial(imagenet_densenet, (6, 12, 24, 16), 32),
    'densenet169': functools.partial(imagenet_densenet, (6, 12, 32, 32), 32),
    'densenet201': functools.partial(imagenet_densenet, (6, 12, 48, 32), 32),
    'densenet264': functools.partial(imagenet_densenet, (6, 12, 64, 48), 32),
    'densenet161': functools.partial(imagenet_densenet, (6, 12, 36, 24), 48),
    # CIFAR / SVHN (Table 2 of the paper), 32x32 inputs, 10 classes by default.
    'densenet_l40_k12': functools.partial(_cifar, 40, 12),
    'densenet_l100_k12': functools.partial(_cifar, 100, 12),
    'densenet_l100_k24': functools.partial(_cifar, 100, 24),
    'densenet_bc_l100_k12': functools.partial(_cifar_bc, 100, 12),
    'densenet_bc_l250_k24': functools.partial(_cifar_bc, 250, 24),
    'densenet_bc_l190_k40': functools.partial(_cifar_bc, 190, 40),
}


def create_model(name: str, *, num_classes: int, **overrides) -> DenseNet:
  """Builds a named DenseNet of the paper, e.g. `create_model('densenet121', num_classes=1000)`.

  `overrides` set any other `DenseNet` attribute: dtype, memory_efficient, dropout_rate, kernels, ...
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}. Valid names: {", ".join(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **overrides)


def from_config(config: Any, *, num_classes: int, input_channels: int, **overrides) -> DenseNet:
  """The DenseNet a training config describes: `config.model` names a registry model, or 'cifar_densenet' with
  `config.architecture` (depth, growth_rate, bottleneck, compression). `overrides` win over the config.

  The config's form fields (FORM_FIELDS) must be concrete by now: an entry point fills them in with
  densenet_jax.platform.choose, once, before it builds the model."""
  options = dict(
      num_classes=num_classes,
      dropout_rate=config.dropout_rate,
      **{field: config.get(field) for field in FORM_FIELDS},
      batch_norm_group_size=config.get('batch_norm_group_size'),
      dtype=jnp.dtype(config.dtype),
      input_channels=input_channels,
  ) | overrides
  if config.model == 'cifar_densenet':
    return cifar_densenet(**dict(config.architecture), **options)
  return create_model(config.model, **options)


def describe(model: DenseNet) -> str:
  """One line naming the architecture, for messages."""
  compression = f', compression={model.compression:g}' if model.compression != 1 else ''
  return (f'{model.stem} stem with {model.stem_channels} channels, blocks {tuple(model.block_sizes)}, growth rate '
          f'{model.growth_rate}, {"bottleneck" if model.bottleneck else "no bottleneck"}{compression}, '
          f'{model.num_classes} classes')


def init_variables(module: nn.Module, rng: jax.Array, *args: Any, compiler_options: dict[str, Any] | None = None,
                   **kwargs: Any) -> dict[str, Any]:
  """`module.init(rng, *args, **kwargs)`, jit-compiled with XLA `compiler_options` (None: XLA's defaults).

  `densenet_jax.platform.run_once_options(backend)` gives the options for a program that runs once: on the CPU they
  initialize a deep DenseNet in seconds instead of minutes, with jax.jit(module.init)'s values (docs/performance.md,
  "Compile time of the initialization", says where bit for bit). `args` are arrays (the example inputs); options
  such as `train=False` go in `kwargs`, which are not traced."""
  init = jax.jit(functools.partial(module.init, **kwargs))
  return init.lower(rng, *args).compile(compiler_options=compiler_options)(rng, *args)


def abstract_variables(model: DenseNet) -> dict[str, Any]:
  """The variable tree of `model` as ShapeDtypeStructs (nothing is computed; shapes do not depend on image size)."""
  size = model.min_input_size
  images = jax.ShapeDtypeStruct((1, size, size, model.input_channels), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images)


# ----------------------------------------------------------------------------------------------
# Pretrained variables for a model with another classifier.


class WeightMismatchError(ValueError):
  """Weights do not fit a model. `missing`, `unexpected`: key names; `mismatched`: (key, shape given, shape the
  model needs), in model order."""

  def __init__(self, message: str, *, missing: list[str], unexpected: list[str],
               mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]):
    super().__init__(message)
    self.missing = missing
    self.unexpected = unexpected
    self.mismatched = mismatched


def format_keys(title: str, keys: Sequence[str]) -> str:
  """'\\n  title (n): a, b, ...' with at most 20 names, for error messages."""
  shown = ', '.join(keys[:_SHOWN_KEYS])
  more = f', ... ({len(keys) - _SHOWN_KEYS} more)' if len(keys) > _SHOWN_KEYS else ''
  return f'\n  {title} ({len(keys)}): {shown}{more}'


def _flat(variables: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  flat = {}
  for collection in COLLECTIONS:
    tree = flax.core.unfreeze(variables.get(collection, {}))
    for path, leaf in traverse_util.flatten_dict(tree).items():
      flat[(collection, *path)] = leaf
  return flat


def _network_order(path: tuple[str, ...]) -> tuple:
  """Sort key of a variable path in the order the network uses it: stem, block1, transition1, ..., classifier."""
  stage = {'stem_conv': 0, 'stem_norm': 1, 'final_norm': 3, 'classifier': 4}.get(path[1], 2)
  return (stage, *((int(part) if part.isdigit() else part) for part in re.split(r'(\d+)', '/'.join(path[1:]))),
          path[0])


def replace_head(variables: Mapping[str, Any], model: DenseNet, rng: jax.Array) -> dict[str, dict]:
  """Variables for `model` from pretrained `variables`: everything but the classifier must fit exactly; the
  classifier is kept when its shape fits `model` and otherwise newly initialized (as `model.init` would, from
  `rng`), also when `variables` have none. Returns nested dicts of numpy arrays in the model's param dtype.
  """
  target = dict(sorted(_flat(abstract_variables(model)).items(), key=lambda item: _network_order(item[0])))
  given = _flat(variables)
  is_head = lambda path: path[1] == 'classifier'
  name = '/'.join
  missing = [name(p) for p in target if not is_head(p) and p not in given]
  unexpected = [name(p) for p in given if not is_head(p) and p not in target]
  mismatched = [(name(p), tuple(np.shape(given[p])), tuple(leaf.shape)) for p, leaf in target.items()
                if not is_head(p) and p in given and tuple(np.shape(given[p])) != tuple(leaf.shape)]
  if missing or unexpected or mismatched:
    raise WeightMismatchError(
        f'The pretrained variables do not fit the model ({describe(model)}) apart from its classifier:'
        + format_keys('shape mismatches (pretrained vs model)', [f'{k} {got} vs {want}' for k, got, want in mismatched])
        + format_keys('missing', missing) + format_keys('unexpected', unexpected)
        + '\n  Only the classifier may differ (e.g. the number of classes); the rest of the architecture must be '
        'the one the weights were trained or converted for.',
        missing=missing, unexpected=unexpected, mismatched=mismatched)
  head = {p: leaf for p, leaf in target.items() if is_head(p)}
  keep_head = all(p in given and tuple(np.shape(given[p])) == tuple(leaf.shape) for p, leaf in head.items())
  flat = {p: np.array(given[p], dtype=leaf.dtype) for p, leaf in target.items() if keep_head or not is_head(p)}
  if not keep_head:
    old = given.get(('params', 'classifier', 'kernel'))
    logging.info('New %d-class classifier (pretrained: %s).', model.num_classes,
                 'none' if old is None else f'{np.shape(old)[-1]} classes')
    in_features = head[('params', 'classifier', 'kernel')].shape[0]
    # The same initializers as DenseNet's classifier.
    dense = nn.Dense(model.num_classes, kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros,
                     param_dtype=model.param_dtype)
    new = init_variables(dense, rng, jnp.zeros((1, in_features), model.param_dtype))['params']
    flat.update({('params', 'classifier', k): np.asarray(v) for k, v in new.items()})
  nested = traverse_util.unflatten_dict(flat)
  return {collection: nested.get(collection, {}) for collection in COLLECTIONS}
