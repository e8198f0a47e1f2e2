"""An independent PyTorch DenseNet: the counterpart of `densenet_jax.model` for tests and benchmarks.

Written from the paper (not copied from torchvision), with a module tree whose state-dict keys are exactly
torchvision's for the ImageNet models:

    features.conv0, features.norm0, features.relu0, features.pool0             (ImageNet stem)
    features.denseblock{b}.denselayer{l}.{norm1, relu1, conv1, norm2, relu2, conv2}
    features.transition{b}.{norm, relu, conv, pool}
    features.norm5, classifier

CIFAR-style models use the same names: `features.conv0` is the 3x3 stem (no norm0 / pool0) and the plain
(no bottleneck) layers have only norm1 / relu1 / conv1. The final norm is `features.norm5` whatever the number
of blocks (torchvision's name). Dropout follows the paper and `densenet_jax.model`: after every conv except the
stem's (torchvision drops only after the last conv of a layer); `memory_efficient=True` recomputes
concat -> BN -> ReLU -> first conv in the backward pass with `torch.utils.checkpoint`.

Importing this module needs PyTorch; nothing else in densenet_jax imports it.

    from benchmarks.torch_reference import build_torch_densenet
    net = build_torch_densenet('densenet121').eval()          # or a densenet_jax.model.DenseNet
    logits = net(images_nchw)
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from densenet_jax import model as model_lib
from densenet_jax.model import layers

# model_lib.py uses Flax's momentum convention (running = 0.9 * running + 0.1 * batch); PyTorch's is the complement.
_TORCH_BN_MOMENTUM = 1.0 - layers.BATCH_NORM_MOMENTUM


def _norm(channels: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(channels, eps=layers.BATCH_NORM_EPSILON, momentum=_TORCH_BN_MOMENTUM)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2, bias=False)


class DenseLayer(nn.Module):
  """BN-ReLU-Conv3x3(k), or with a bottleneck BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k)."""

  def __init__(self, in_channels: int, growth_rate: int, bottleneck: bool, dropout_rate: float,
               memory_efficient: bool):
    super().__init__()
    self.bottleneck = bottleneck
    self.dropout_rate = dropout_rate
    self.memory_efficient = memory_efficient
    first_out = layers.BOTTLENECK_WIDTH * growth_rate if bottleneck else growth_rate
    self.norm1 = _norm(in_channels)
    self.relu1 = nn.ReLU(inplace=True)
    self.conv1 = _conv(in_channels, first_out, 1 if bottleneck else 3)
    if bottleneck:
      self.norm2 = _norm(first_out)
      self.relu2 = nn.ReLU(inplace=True)
      self.conv2 = _conv(first_out, growth_rate, 3)

  def _first(self, *features: torch.Tensor) -> torch.Tensor:
    x = torch.cat(features, 1)
    return self.conv1(self.relu1(self.norm1(x)))

  def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
    if self.memory_efficient and self.training and any(f.requires_grad for f in features):
      x = torch_checkpoint.checkpoint(self._first, *features, use_reentrant=False)
    else:
      x = self._first(*features)
    x = F.dropout(x, self.dropout_rate, self.training)
    if self.bottleneck:
      x = self.conv2(self.relu2(self.norm2(x)))
      x = F.dropout(x, self.dropout_rate, self.training)
    return x


class DenseBlock(nn.ModuleDict):
  """`num_layers` dense layers named denselayer1..L; returns [input, out_1, ..., out_L] concatenated."""

  def __init__(self, num_layers: int, in_channels: int, growth_rate: int, **layer_kwargs):
    super().__init__()
    for i in range(num_layers):
      self[f'denselayer{i + 1}'] = DenseLayer(in_channels + i * growth_rate, growth_rate, **layer_kwargs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    features = [x]
    for layer in self.values():
      features.append(layer(features))
    return torch.cat(features, 1)


class Transition(nn.Sequential):
  """BN-ReLU-Conv1x1-(dropout)-AvgPool 2x2/2."""

  def __init__(self, in_channels: int, out_channels: int, dropout_rate: float):
    layers = OrderedDict(norm=_norm(in_channels), relu=nn.ReLU(inplace=True), conv=_conv(in_channels, out_channels, 1))
    if dropout_rate:
      layers['dropout'] = nn.Dropout(dropout_rate)  # no parameters: the state-dict keys stay torchvision's
    layers['pool'] = nn.AvgPool2d(2, stride=2)
    super().__init__(layers)


class TorchDenseNet(nn.Module):
  """DenseNet on NCHW images; same hyperparameters as `densenet_jax.model.DenseNet`."""

  def __init__(self, block_sizes=(6, 12, 24, 16), growth_rate: int = 32, num_classes: int = 1000,
               stem: str = 'imagenet', stem_channels: int = 64, bottleneck: bool = True,
               compression: float = 0.5, dropout_rate: float = 0.0, memory_efficient: bool = False,
               input_channels: int = 3):
    super().__init__()
    if stem not in ('imagenet', 'cifar'):
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}.")
    layers = OrderedDict()
    if stem == 'imagenet':
      layers['conv0'] = _conv(input_channels, stem_channels, 7, stride=2)
      layers['norm0'] = _norm(stem_channels)
      layers['relu0'] = nn.ReLU(inplace=True)
      layers['pool0'] = nn.MaxPool2d(3, stride=2, padding=1)
    else:
      layers['conv0'] = _conv(input_channels, stem_channels, 3)
    channels = stem_channels
    layer_kwargs = dict(bottleneck=bottleneck, dropout_rate=dropout_rate, memory_efficient=memory_efficient)
    for b, num_layers in enumerate(block_sizes):
      layers[f'denseblock{b + 1}'] = DenseBlock(num_layers, channels, growth_rate, **layer_kwargs)
      channels += num_layers * growth_rate
      if b + 1 < len(block_sizes):
        out_channels = int(math.floor(compression * channels))
        layers[f'transition{b + 1}'] = Transition(channels, out_channels, dropout_rate)
        channels = out_channels
    layers['norm5'] = _norm(channels)
    self.features = nn.Sequential(layers)
    self.classifier = nn.Linear(channels, num_classes)
    self._initialize()

  def _initialize(self) -> None:
    # The paper's init (as model_lib.py): He fan-out normal convs, BN (1, 0), Torch-default Linear weight, bias 0.
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
      elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
      elif isinstance(module, nn.Linear):
        nn.init.zeros_(module.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.features(x))
    return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_torch_densenet(model: str | model_lib.DenseNet, *, num_classes: int | None = None) -> TorchDenseNet:
  """The PyTorch twin of a Flax DenseNet: a registry name ('densenet121', ...) or a `model_lib.DenseNet`.

  With a name, `num_classes` defaults to the registry's (1000 for ImageNet models, 10 for CIFAR models).
  Parameters are freshly initialized; load weights with `load_state_dict`.
  """
  if isinstance(model, str):
    if model not in model_lib.MODELS:
      raise ValueError(f'Unknown model {model!r}. Valid names: {", ".join(model_lib.MODELS)}.')
    model = model_lib.MODELS[model]() if num_classes is None else model_lib.create_model(model, num_classes=num_classes)
  elif num_classes is not None:
    model = model.clone(num_classes=num_classes)
  return TorchDenseNet(
      block_sizes=tuple(model.block_sizes),
      growth_rate=model.growth_rate,
      num_classes=model.num_classes,
      stem=model.stem,
      stem_channels=model.stem_channels,
      bottleneck=model.bottleneck,
      compression=model.compression,
      dropout_rate=model.dropout_rate,
      memory_efficient=model.memory_efficient,
      input_channels=model.input_channels,
  )
