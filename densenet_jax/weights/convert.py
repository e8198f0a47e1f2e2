"""Name and layout mapping: PyTorch (torchvision / timm) and Keras applications weights -> Flax variables.

Every Flax leaf has exactly one source name; conversion walks the *model's* variable tree (so nothing is guessed
from the file), checks that the file holds exactly those names with the right shapes, and transposes:

| Flax | PyTorch | Keras applications |
|---|---|---|
| `stem_conv/kernel` (kh, kw, in, out) | `features.conv0.weight` (out, in, kh, kw) | `conv1_conv/kernel` (kh, kw, in, out) |
| `stem_norm/{scale,bias,mean,var}` | `features.norm0.{weight,bias,running_mean,running_var}` | `conv1_bn/{gamma,beta,moving_mean,moving_variance}` |
| `block{b}/layer{l}/norm1`, `conv1` | `features.denseblock{b}.denselayer{l}.norm1`, `conv1` | `conv{b+1}_block{l}_0_bn`, `conv{b+1}_block{l}_1_conv` |
| `block{b}/layer{l}/norm2`, `conv2` | `...denselayer{l}.norm2`, `conv2` | `conv{b+1}_block{l}_1_bn`, `conv{b+1}_block{l}_2_conv` |
| `transition{b}/norm`, `conv` | `features.transition{b}.norm`, `conv` | `pool{b+1}_bn`, `pool{b+1}_conv` |
| `final_norm` | `features.norm5` | `bn` |
| `classifier/{kernel,bias}` (in, out) | `classifier.{weight,bias}` (out, in) | `predictions/{kernel,bias}` (in, out) |

Keras BatchNormalization uses epsilon 1.001e-5, this project 1e-5 (PyTorch's). Eval-mode BN computes
(x - mean) / sqrt(var + eps), so converting var_flax = var_keras + (1.001e-5 - 1e-5) (in float64, then rounded
to float32) gives the same denominator and the same outputs, with the model left unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import flax
import jax
import numpy as np
from absl import logging
from flax import traverse_util

from densenet_jax import model as model_lib
from densenet_jax.model import registry
from densenet_jax.model.registry import WeightMismatchError
from densenet_jax.weights import formats
from densenet_jax.weights.formats import KERAS_BN_EPSILON, Path


Variables = dict[str, dict[str, Any]]


# ------------------------------------------------------------------------------------------------------------
# The model's variables, in the order the network uses them.


@dataclasses.dataclass(frozen=True)
class _Leaf:
  collection: str  # 'params' or 'batch_stats'
  path: Path  # module path + leaf name, e.g. ('block1', 'layer1', 'norm1', 'scale')
  shape: tuple[int, ...]
  dtype: Any

  @property
  def module(self) -> Path:
    return self.path[:-1]


_TOP_RANK = {'stem_conv': (0,), 'stem_norm': (1,), 'final_norm': (3,), 'classifier': (4,)}
_SUB_RANK = {'norm1': 0, 'conv1': 1, 'norm2': 2, 'conv2': 3, 'norm': 0, 'conv': 1}
_LEAF_RANK = {'kernel': 0, 'scale': 0, 'bias': 1, 'mean': 2, 'var': 3}


def _rank(path: Path) -> tuple:
  top, *rest = path
  match = re.fullmatch(r'(block|transition)(\d+)', top)
  rank = [(2, int(match[2]), match[1] == 'transition') if match else _TOP_RANK[top]]
  for part in rest[:-1]:
    layer = re.fullmatch(r'layer(\d+)', part)
    rank.append(int(layer[1]) if layer else _SUB_RANK[part])
  return (*rank, _LEAF_RANK[rest[-1]])


@functools.lru_cache(maxsize=16)
def model_leaves(model: model_lib.DenseNet) -> tuple[_Leaf, ...]:
  """Every variable of `model` (shapes only, nothing is computed), stem first, classifier last."""
  shapes = model_lib.abstract_variables(model)
  leaves = []
  for collection in ('params', 'batch_stats'):
    flat = jax.tree_util.tree_flatten_with_path(shapes.get(collection, {}))[0]
    for key_path, leaf in flat:
      path = tuple(k.key for k in key_path)
      leaves.append(_Leaf(collection, path, tuple(leaf.shape), leaf.dtype))
  return tuple(sorted(leaves, key=lambda leaf: _rank(leaf.path)))


def _set(tree: dict, path: Path, value) -> None:
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------------------------------------------------
# Which DenseNet a file holds.


def _infer(source: Mapping[str, np.ndarray], fmt: formats.Format) -> tuple[str | None, model_lib.DenseNet] | None:
  """(registry name or None, DenseNet) for the architecture the keys and shapes describe, or None."""
  def shape(*path):
    array = source.get(fmt.key(path))
    return None if array is None else fmt.flax_shape(path, tuple(array.shape))

  stem = shape('stem_conv', 'kernel')
  if stem is None or len(stem) != 4:
    return None
  layers: dict[int, set[int]] = {}
  for key in source:
    match = fmt.layer_pattern.match(key)
    if match:
      layers.setdefault(int(match[1]) - fmt.block_offset, set()).add(int(match[2]))
  num_blocks = len(layers)
  if num_blocks == 0 or sorted(layers) != list(range(1, num_blocks + 1)):
    return None
  block_sizes = tuple(max(layers[b]) for b in range(1, num_blocks + 1))
  bottleneck = shape('block1', 'layer1', 'conv2', 'kernel') is not None
  last_conv = shape('block1', 'layer1', 'conv2' if bottleneck else 'conv1', 'kernel')
  transition = shape('transition1', 'conv', 'kernel')
  if last_conv is None or (num_blocks > 1 and transition is None):
    return None
  num_classes = fmt.num_classes(source)
  kwargs = dict(
      block_sizes=block_sizes,
      growth_rate=last_conv[-1],
      stem='imagenet' if shape('stem_norm', 'scale') is not None else 'cifar',
      stem_channels=stem[-1],
      bottleneck=bottleneck,
      input_channels=stem[-2],
  )
  for name, build in model_lib.MODELS.items():
    candidate = build() if num_classes is None else build(num_classes=num_classes)
    same = all(getattr(candidate, k) == v for k, v in kwargs.items())
    if same and (transition is None or math.floor(candidate.compression * transition[2]) == transition[3]):
      return name, candidate
  compression = 1.0 if transition is None else round(transition[3] / transition[2], 6)
  num_classes = num_classes or 1000
  return None, model_lib.DenseNet(**kwargs, compression=compression, num_classes=num_classes)


def _resolve_model(model, source, fmt) -> tuple[model_lib.DenseNet, str]:
  """The DenseNet to fill and how to name it in messages."""
  if model is None:
    found = _infer(source, fmt)
    if found is None:
      raise ValueError(
          f'Cannot tell which DenseNet these {fmt.framework} weights belong to (no '
          f'{fmt.key(("stem_conv", "kernel"))!r} or no dense layers named like '
          f'{fmt.key(("block1", "layer1", "norm1", "scale"))!r}); pass the model explicitly.')
    name, net = found
    return net, name or f'DenseNet ({model_lib.describe(net)})'
  if isinstance(model, str):
    if model not in model_lib.MODELS:
      raise ValueError(f'Unknown model {model!r}. Valid names: {", ".join(model_lib.MODELS)}.')
    num_classes = fmt.num_classes(source)
    net = model_lib.MODELS[model]() if num_classes is None else model_lib.create_model(model, num_classes=num_classes)
    return net, model
  if isinstance(model, model_lib.DenseNet):
    return model, f'the given DenseNet ({model_lib.describe(model)})'
  raise TypeError(f'model must be a name from densenet_jax.model.MODELS or a DenseNet, got {type(model)}.')


# ------------------------------------------------------------------------------------------------------------
# The conversion itself.


def _mismatch_message(source_label, label, net, fmt, source, missing, unexpected, mismatched) -> str:
  lines = [f'{fmt.framework} weights from {source_label} do not fit {label}.']
  if mismatched:
    key, got, want = mismatched[0]
    lines.append(f'  First mismatching key: {key} has shape {got} in the file but {want} in the model.')
  file_classes = fmt.num_classes(source)
  if file_classes is not None and file_classes != net.num_classes:
    lines.append(
        f'  The classifier has {file_classes} outputs in the file, {net.num_classes} in the model. Convert with the file\'s number of '
        'classes (the default when the model is given by name) and give the model a new head with '
        'densenet_jax.weights.replace_head(variables, model, rng) to fine-tune.')
  message = '\n'.join(lines)
  if mismatched:
    message += registry.format_keys('shape mismatches', [f'{k} {got} vs {want}' for k, got, want in mismatched])
  message += registry.format_keys('missing keys', missing) + registry.format_keys('unexpected keys', unexpected)
  found = _infer(source, fmt)
  if found is not None:
    name, net = found
    message += f'\n  The file looks like {name or "a DenseNet"} ({model_lib.describe(net)}).'
  return message


def convert(source: Mapping[str, np.ndarray], model, fmt: formats.Format, source_label: str) -> Variables:
  """Flax variables of `model` (name, DenseNet or None) from `source`, a flat {key: array} dict."""
  net, label = _resolve_model(model, source, fmt)
  fmt.check(net)
  leaves = model_leaves(net)
  if not any(key in source for key in fmt.classifier_keys()):
    logging.warning('%s has no classifier (%s): converting the backbone only; use replace_head() to add one.',
                    source_label, ' / '.join(fmt.classifier_keys()))
    leaves = [leaf for leaf in leaves if leaf.module != ('classifier',)]
  expected = {fmt.key(leaf.path): leaf for leaf in leaves}
  missing = [key for key in expected if key not in source]
  unexpected = [key for key in source if key not in expected]
  mismatched = []
  for key, leaf in expected.items():
    want = fmt.source_shape(leaf.path, leaf.shape)
    if key in source and tuple(np.shape(source[key])) != want:
      mismatched.append((key, tuple(np.shape(source[key])), want))
  if missing or unexpected or mismatched:
    raise WeightMismatchError(
        _mismatch_message(source_label, label, net, fmt, source, missing, unexpected, mismatched),
        missing=missing, unexpected=unexpected, mismatched=mismatched)
  variables: Variables = {'params': {}, 'batch_stats': {}}
  for key, leaf in expected.items():
    array = fmt.to_flax(leaf.path, np.asarray(source[key]))
    # A copy: np.asarray of a CPU torch tensor shares its memory, and the caller may go on changing the tensor
    # (training, load_state_dict) after converting.
    _set(variables[leaf.collection], leaf.path, np.array(array, dtype=leaf.dtype, order='C', copy=True))
  return variables


# ------------------------------------------------------------------------------------------------------------
# PyTorch.


def _tensor_to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch.Tensor; torch itself is not imported here
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':  # numpy has no bfloat16
      value = value.float()
    return value.numpy()
  return np.asarray(value)


_OLD_STYLE = re.compile(r'(denselayer\d+\.(?:norm|relu|conv))\.([12])\.')
_WRAPPER_PREFIXES = ('module.', '_orig_mod.')  # DataParallel / DistributedDataParallel, torch.compile


def normalize_torch_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torchvision-style names -> numpy arrays: strips `module.` / `_orig_mod.` prefixes, renames old-style
  `denselayerN.norm.1` keys to `denselayerN.norm1`, drops BatchNorm's `num_batches_tracked` counters."""
  if hasattr(state_dict, 'state_dict') and callable(state_dict.state_dict):  # a torch.nn.Module
    state_dict = state_dict.state_dict()
  out: dict[str, np.ndarray] = {}
  for original, value in state_dict.items():
    key = original
    while key.startswith(_WRAPPER_PREFIXES):
      key = key.split('.', 1)[1]
    if key.endswith('.num_batches_tracked'):
      continue
    key = _OLD_STYLE.sub(r'\1\2.', key)
    if key in out:
      raise ValueError(f'Two entries of the state dict are both {key!r} once prefixes and old-style names are '
                       f'normalized (the second is {original!r}).')
    out[key] = _tensor_to_numpy(value)
  return out


def from_torch_state_dict(state_dict: Mapping[str, Any], model: str | model_lib.DenseNet | None = None, *,
                          source_label: str = 'the state dict') -> Variables:
  """Flax variables {'params', 'batch_stats'} (numpy float32 arrays) from a torchvision / timm DenseNet.

  Args:
    state_dict: {name: torch.Tensor or numpy array} (or a torch.nn.Module). Accepts `module.` prefixes,
      old-style `norm.1` / `conv.1` names and ignores `num_batches_tracked`.
    model: a registry name ('densenet121', ...; the number of classes is then read from the file's
      classifier), a `densenet_jax.model.DenseNet` (its num_classes must match the file's), or None to infer
      the architecture from the names and shapes.
    source_label: how error messages name the source (readers pass the file name).

  A state dict without `classifier.*` converts to variables without 'classifier' (see replace_head).
  Raises WeightMismatchError naming the first mismatching key with both shapes and listing missing and
  unexpected keys.
  """
  return convert(normalize_torch_keys(state_dict), model, formats.TorchFormat(), source_label)


def to_torch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The inverse: torchvision-named numpy arrays (without `num_batches_tracked`) in network order."""
  fmt = formats.TorchFormat()
  out = []
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {}))).items():
      array = np.asarray(leaf)
      if array.ndim == 4:
        array = np.transpose(array, (3, 2, 0, 1))
      elif array.ndim == 2:
        array = array.T
      out.append((_rank(path), fmt.key(path), np.ascontiguousarray(array)))
  return {key: array for _, key, array in sorted(out, key=lambda item: item[0])}


def infer_model(source: Mapping[str, Any], framework: str = 'torch') -> tuple[str | None, model_lib.DenseNet]:
  """(registry name or None, DenseNet) that a flat weight dict describes; framework 'torch' or 'keras'.

  Raises ValueError when the keys do not look like a DenseNet.
  """
  fmt = {'torch': formats.TorchFormat, 'keras': formats.KerasFormat}[framework]()
  if framework == 'torch':
    source = normalize_torch_keys(source)
  found = _infer(source, fmt)
  if found is None:
    raise ValueError(f'These {fmt.framework} weights do not look like a DenseNet '
                     f'(no {fmt.key(("stem_conv", "kernel"))!r} or no dense layers).')
  return found


# ------------------------------------------------------------------------------------------------------------
# Keras applications.


# keras-applications 1.0 (which made the weight files keras.applications still downloads) named the stem
# 'conv1/conv' and 'conv1/bn' and the classifier 'fc1000'; tf.keras renamed them 'conv1_conv', 'conv1_bn',
# 'predictions'.
_KERAS_LAYER_ALIASES = {'fc1000': 'predictions'}


def keras_layer_name(name: str) -> str:
  """Today's Keras applications layer name for `name` ('conv1/conv' -> 'conv1_conv', 'fc1000' -> 'predictions')."""
  name = name.replace('/', '_')
  return _KERAS_LAYER_ALIASES.get(name, name)


def _weight_name(variable) -> str:
  # Keras 3: 'kernel'; tf.keras 2: 'conv1_conv/kernel:0'.
  return variable.name.split('/')[-1].split(':')[0]


def _all_layers(model) -> Iterable:
  for layer in model.layers:
    if hasattr(layer, 'layers'):  # a nested Model
      yield from _all_layers(layer)
    else:
      yield layer


def keras_model_weights(keras_model) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """{'layer/weight': array} and {bn layer: epsilon} of a Keras model."""
  weights, epsilons = {}, {}
  for layer in _all_layers(keras_model):
    name = keras_layer_name(layer.name)
    for variable in layer.weights:
      value = variable.numpy() if hasattr(variable, 'numpy') else np.asarray(variable)
      weights[f'{name}/{_weight_name(variable)}'] = np.asarray(value)
    if hasattr(layer, 'moving_variance'):
      epsilons[name] = float(layer.epsilon)
  return weights, epsilons


def from_keras(source, model: str | model_lib.DenseNet | None = None, *,
               epsilon: float | Mapping[str, float] = KERAS_BN_EPSILON,
               source_label: str | None = None) -> Variables:
  """Flax variables from a Keras applications DenseNet121 / 169 / 201.

  Args:
    source: a Keras model, or {'layer_name/weight_name': array} (weight names gamma, beta, moving_mean,
      moving_variance, kernel, bias), e.g. from `densenet_jax.weights.read_keras_file`.
    model: as in from_torch_state_dict (a name, a DenseNet or None to infer).
    epsilon: the BatchNorm epsilon of the Keras layers (1.001e-5 in Keras applications), or one per layer name;
      ignored for a Keras model, whose layers say it themselves. It is folded into the running variance.
  """
  epsilons, default = (dict(epsilon), KERAS_BN_EPSILON) if isinstance(epsilon, Mapping) else ({}, epsilon)
  if hasattr(source, 'layers'):
    source_label = source_label or f'the Keras model {source.name!r}'
    source, epsilons = keras_model_weights(source)
  source_label = source_label or 'the weights dict'
  source = {key: np.asarray(value) for key, value in source.items()}
  return convert(source, model, formats.KerasFormat(epsilons, float(default)), source_label)
