"""Weight files -> flat {name: numpy array} dicts, and straight to Flax variables with `load_weights_file`.

| suffix | what | needs |
|---|---|---|
| .pth, .pt, .bin | a pickled PyTorch state dict (torchvision, timm, `torch.save(model.state_dict())`, or a training checkpoint holding one under 'state_dict' / 'model_state_dict' / 'model') | torch |
| .safetensors | timm / Hugging Face hub files | safetensors (numpy API; no torch) |
| .h5, .hdf5 | Keras weights: the legacy format of keras.applications' cached files and `model.save('x.h5')` (read directly), or Keras 3 `model.save_weights('x.weights.h5')` | h5py; Keras 3 files also keras |
| .keras | a Keras 3 saved model | keras |
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping

import numpy as np
from absl import logging

from densenet_jax import model as model_lib
from densenet_jax.weights import convert

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
SAFETENSORS_SUFFIXES = ('.safetensors',)
KERAS_SUFFIXES = ('.h5', '.hdf5', '.keras')
SUPPORTED_FORMATS = ('PyTorch state dicts (.pth, .pt, .bin), safetensors (.safetensors) and Keras weights '
                     '(.h5, .keras)')
_CHECKPOINT_ENTRIES = ('state_dict', 'model_state_dict', 'model')  # where training checkpoints keep the weights
_KERAS_APPLICATIONS = {'densenet121': 'DenseNet121', 'densenet169': 'DenseNet169', 'densenet201': 'DenseNet201'}


class WeightFileError(ValueError):
  """A weight file that cannot be read; the message says which formats work."""


def file_format(path: str | os.PathLike) -> str:
  """'torch', 'safetensors' or 'keras' from the file name; WeightFileError for anything else."""
  name = os.fspath(path).lower()
  for fmt, suffixes in (('torch', TORCH_SUFFIXES), ('safetensors', SAFETENSORS_SUFFIXES),
                        ('keras', KERAS_SUFFIXES)):
    if name.endswith(suffixes):
      return fmt
  raise WeightFileError(f'Unsupported weight file {os.fspath(path)!r}: supported are {SUPPORTED_FORMATS}.')


def _check_exists(path) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No weight file at {path!r}.')
  return path


def _unreadable(path, kind: str, error: Exception, hint: str = '') -> WeightFileError:
  return WeightFileError(f'Cannot read {path!r} as {kind}: {type(error).__name__}: {error}'.rstrip()
                         + f'{hint}\nSupported are {SUPPORTED_FORMATS}.')


def _is_tensor(value) -> bool:
  return hasattr(value, 'detach') or isinstance(value, np.ndarray)


def _find_state_dict(obj, path):
  if isinstance(obj, Mapping) and obj and all(_is_tensor(v) for v in obj.values()):
    return obj
  if isinstance(obj, Mapping):
    for entry in _CHECKPOINT_ENTRIES:
      inner = obj.get(entry)
      if isinstance(inner, Mapping) and inner and all(_is_tensor(v) for v in inner.values()):
        return inner
    raise WeightFileError(
        f'{path!r} holds a dict whose entries are not all tensors and that has no state dict under '
        f'{" / ".join(map(repr, _CHECKPOINT_ENTRIES))}; its keys: {sorted(map(str, obj))[:20]}. Load it in PyTorch '
        'and save the model weights alone: torch.save(model.state_dict(), "weights.pth").')
  raise WeightFileError(f'{path!r} holds a {type(obj).__name__}, not a state dict. Save the weights alone: '
                        'torch.save(model.state_dict(), "weights.pth").')


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """{name: numpy array} of a PyTorch (.pth/.pt/.bin) or safetensors file, names as stored."""
  fmt = file_format(path)
  path = _check_exists(path)
  if fmt == 'safetensors':
    try:
      from safetensors.numpy import load_file
    except ImportError as error:
      raise ImportError('Reading .safetensors files needs the safetensors package: pip install safetensors') from error
    try:
      return dict(load_file(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers and dtypes
      raise _unreadable(path, 'safetensors', error) from error
  if fmt != 'torch':
    raise WeightFileError(f'{path!r} is a Keras file, not a PyTorch state dict: use read_keras_file.')
  try:
    import torch
  except ImportError as error:
    raise ImportError(
        f'Reading {path!r} needs PyTorch (any CPU build: pip install torch). Without PyTorch, use the '
        '.safetensors version of the weights (timm / Hugging Face hub), which needs only the safetensors '
        'package.') from error
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as error:
    hint = ''
    if 'weights_only' in str(error) or 'Weights only load failed' in str(error):
      hint = ('\nThe file holds Python objects besides tensors (e.g. a pickled model); they are not unpickled '
              'for safety. Load it in PyTorch yourself and save model.state_dict().')
    raise _unreadable(path, 'a PyTorch file', error, hint) from error
  return {str(k): convert._tensor_to_numpy(v) for k, v in _find_state_dict(obj, path).items()}


def _decode(value) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)


def _legacy_epsilons(root) -> dict[str, float]:
  """BatchNorm epsilons from the model config that `model.save('x.h5')` stores (weights-only files have none)."""
  if 'model_config' not in root.attrs:
    return {}
  try:
    layers = json.loads(_decode(root.attrs['model_config']))['config']['layers']
    return {convert.keras_layer_name(layer['config']['name']): float(layer['config']['epsilon'])
            for layer in layers if layer.get('class_name') == 'BatchNormalization'}
  except (KeyError, TypeError, ValueError) as error:
    logging.warning('Could not read BatchNorm epsilons from the model config (%s); assuming Keras '
                    'applications\' %g.', error, convert.KERAS_BN_EPSILON)
    return {}


def _read_legacy_h5(group) -> dict[str, np.ndarray]:
  weights = {}
  for layer_name in map(_decode, group.attrs['layer_names']):
    layer = group[layer_name]
    for weight_name in map(_decode, layer.attrs['weight_names']):
      # Keras 2 weight names are 'conv1/conv/kernel:0'; layer names as in convert.keras_layer_name.
      key = f'{convert.keras_layer_name(layer_name)}/{weight_name.split("/")[-1].split(":")[0]}'
      weights[key] = np.asarray(layer[weight_name])
  return weights


def _keras3_layout(path, layers) -> tuple[str, int | None]:
  """(registry name, classes or None) of a Keras 3 weights file: a Keras DenseNet-N has N - 1 convolutions."""
  convs = [name for name in layers if re.fullmatch(r'conv2d(_\d+)?', name)]
  name = f'densenet{len(convs) + 1}'
  if name not in _KERAS_APPLICATIONS:
    raise WeightFileError(f'{path!r} is a Keras 3 weights file with {len(convs)} convolutions, which is none of '
                          f'the Keras applications {", ".join(_KERAS_APPLICATIONS.values())}.')
  dense = layers.get('dense')
  if dense is None or 'vars' not in dense or not len(dense['vars']):
    return name, None
  return name, int(dense['vars']['0'].shape[-1])


def _read_keras3_h5(path, name: str, num_classes: int | None):
  # Keras 3 `save_weights` names layers by class and creation order ('conv2d_57', 'batch_normalization_3'), so
  # the architecture is rebuilt and Keras itself loads the file.
  keras = _import_keras(path)
  application = getattr(keras.applications, _KERAS_APPLICATIONS[name])
  if num_classes is None:
    keras_model = application(weights=None, include_top=False)
  else:
    keras_model = application(weights=None, include_top=True, classes=num_classes)
  try:
    keras_model.load_weights(path)
  except Exception as error:
    raise _unreadable(path, f'Keras 3 weights of {_KERAS_APPLICATIONS[name]}', error) from error
  return convert.keras_model_weights(keras_model)


def _check_zip(path: str) -> None:
  """A .keras file is a zip archive; Keras reports a truncated one as 'File not found', so check it here."""
  import zipfile  # pylint: disable=import-outside-toplevel

  try:
    with zipfile.ZipFile(path) as archive:
      damaged = archive.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as error:
    raise WeightFileError(
        f'{path!r} exists but is not a readable .keras file (a zip archive): {error}. It is probably truncated '
        '(an interrupted download or copy); download or save it again.') from error
  if damaged is not None:
    raise WeightFileError(f'{path!r} is a damaged .keras file: the entry {damaged!r} fails its CRC check; '
                          'download or save it again.')


def _import_keras(path):
  try:
    import keras
  except ImportError as error:
    raise ImportError(f'Reading {path!r} needs Keras (pip install tensorflow-cpu keras).') from error
  return keras


def read_keras_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """({'layer_name/weight_name': array}, {bn layer: epsilon}) of a Keras .h5 / .keras file.

  The epsilons are known for files that store the model config (.keras, `model.save('x.h5')`); for weights-only
  files the converter assumes Keras applications' 1.001e-5.
  """
  fmt = file_format(path)
  path = _check_exists(path)
  if fmt != 'keras':
    raise WeightFileError(f'{path!r} is not a Keras file: use read_state_dict.')
  if path.lower().endswith('.keras'):
    _check_zip(path)
    keras = _import_keras(path)
    try:
      keras_model = keras.saving.load_model(path, compile=False)
    except Exception as error:
      raise _unreadable(path, 'a Keras model', error) from error
    return convert.keras_model_weights(keras_model)
  try:
    import h5py
  except ImportError as error:
    raise ImportError(f'Reading {path!r} needs h5py (pip install h5py).') from error
  try:
    file = h5py.File(path, 'r')
  except Exception as error:
    raise _unreadable(path, 'an HDF5 file', error) from error
  with file:
    root = file
    if 'layer_names' not in root.attrs and 'model_weights' in root:  # model.save('x.h5')
      root = root['model_weights']
    if 'layer_names' in root.attrs:
      return _read_legacy_h5(root), _legacy_epsilons(file)
    keras3 = _keras3_layout(path, file['layers']) if 'layers' in file else None
  if keras3 is not None:
    return _read_keras3_h5(path, *keras3)
  raise WeightFileError(f'{path!r} is an HDF5 file but not one of Keras\'s weight formats (no "layer_names" '
                        f'attribute, no "model_weights" or "layers" group). Supported are {SUPPORTED_FORMATS}.')


def read_weights(path: str | os.PathLike) -> tuple[str, dict[str, np.ndarray], dict[str, float]]:
  """(framework 'torch' or 'keras', flat weights, Keras BN epsilons by layer) of any supported file."""
  if file_format(path) == 'keras':
    return ('keras', *read_keras_file(path))
  return 'torch', read_state_dict(path), {}


@dataclasses.dataclass(frozen=True)
class ConvertedWeights:
  """A weight file converted: the DenseNet it holds (registry name when it is one) and its Flax variables."""

  name: str | None
  model: model_lib.DenseNet
  variables: convert.Variables
  framework: str  # 'torch' or 'keras'


def convert_file(path: str | os.PathLike, model: str | model_lib.DenseNet | None = None) -> ConvertedWeights:
  """The model and its Flax variables {'params', 'batch_stats'} from any supported weight file. `model`: a registry
  name, a DenseNet, or None to infer the architecture from the file (every array is then checked against it)."""
  framework, weights, epsilons = read_weights(path)
  label = os.path.basename(os.fspath(path))
  name, net = (model, None) if isinstance(model, str) else (None, model)
  if model is None:
    name, net = convert.infer_model(weights, framework)
  target = name or net
  if framework == 'keras':
    variables = convert.from_keras(weights, target, epsilon=epsilons, source_label=label)
  else:
    variables = convert.from_torch_state_dict(weights, target, source_label=label)
  classifier = variables['params'].get('classifier')
  num_classes = None if classifier is None else int(classifier['kernel'].shape[-1])
  if net is None:
    net = model_lib.MODELS[name]() if num_classes is None else model_lib.create_model(name, num_classes=num_classes)
  elif num_classes is not None and net.num_classes != num_classes:
    net = net.clone(num_classes=num_classes)
  return ConvertedWeights(name, net, variables, framework)


def load_weights_file(path: str | os.PathLike, model: str | model_lib.DenseNet | None = None) -> convert.Variables:
  """Flax variables {'params', 'batch_stats'} from any supported weight file (convert_file without the model)."""
  return convert_file(path, model).variables
