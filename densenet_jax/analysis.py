"""Looking inside a DenseNet: feature reuse (the paper's Figure 5), channel growth, activations, memory.

    model, variables = load_model(WORKDIR)          # a training workdir or converted weights (io/loading.py)
    reuse = feature_reuse(variables['params'])      # one BlockReuse per dense block
    plot_feature_reuse(reuse)                       # the heat maps of Figure 5

Feature reuse. Inside a dense block with L layers, layer l reads the concatenation
[block input (k0 channels), output of layer 1 (k channels), ..., output of layer l-1], and its first conv (the
3x3 conv of a plain layer, the 1x1 bottleneck conv of a -BC layer) holds one slice of input channels per source.
Cell [t, s] of a block's matrix is the mean absolute weight of the slice of target t's first conv that reads
source s: sum |w| over the slice divided by the number of its weights (kh * kw * channels of s * outputs). The
division by the channels of s is the paper's "normalized by the number of input feature maps" (the block input
has k0 channels, every layer k); kh * kw * outputs is the same for every source of one target, so it changes
no row's pattern and only puts targets with different kernels (3x3 or 1x1 dense-layer convs, the 1x1 transition
conv) on one per-weight scale. The classifier's cell of source s averages |w| over the rows of its Dense kernel
that read the channels of s, and over all classes. The weights are the raw parameters, as in the paper: the
BatchNorm in front of every conv (and the final BatchNorm in front of the classifier) is not folded in.

Layout of a block's (L + 1) x (L + 1) matrix:
    rows (targets)   0 .. L-1: dense layers 1 .. L;  L: the transition after the block, or the classifier after
                     the last block
    columns (sources) 0: the block input (stem or previous transition);  s = 1 .. L: the output of layer s
Layer t + 1 reads sources 0 .. t, so cells with s > t are NaN; the last row reads every source. The paper draws
the transpose (source on the vertical axis, target on the horizontal one), as plot_feature_reuse does.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax import memory, platform
from densenet_jax import model as model_lib
from densenet_jax.model import abstract_variables
from densenet_jax.platform import xla_flags
from densenet_jax.io.loading import load_model

Params = Mapping[str, Any]
__all__ = ['abstract_variables', 'load_model']  # Re-exported: the notebooks' one import.


# ----------------------------------------------------------------------------------------------
# Feature reuse (Figure 5).


@dataclasses.dataclass(frozen=True)
class BlockReuse:
  """The feature-reuse matrix of one dense block (layout in the module docstring)."""

  name: str  # 'block1', ...
  matrix: np.ndarray  # (L + 1, L + 1) float64: [target, source]; NaN where the target does not read the source
  output_name: str | None  # the last row's layer: 'transition1', ..., 'classifier'; None: no classifier (row NaN)
  source_channels: tuple[int, ...]  # channels of each source: (k0, k, ..., k)

  @property
  def num_layers(self) -> int:
    return len(self.source_channels) - 1


def mean_abs_by_source(kernel: Any, source_channels: Sequence[int]) -> np.ndarray:
  """Mean |w| of each source's slice of input channels (axis -2 of an HWIO conv or an (in, out) Dense kernel)."""
  kernel = np.asarray(kernel)
  if kernel.shape[-2] != sum(source_channels):
    raise ValueError(
        f'A kernel of shape {kernel.shape} reads {kernel.shape[-2]} input channels, but the sources have '
        f'{sum(source_channels)} ({" + ".join(map(str, source_channels))}).'
    )
  slices = np.split(np.abs(kernel), np.cumsum(source_channels)[:-1], axis=-2)
  # float64 sums: a constant slice gives exactly its constant back.
  return np.array([np.mean(s, dtype=np.float64) for s in slices])


def feature_reuse(params: Params) -> tuple[BlockReuse, ...]:
  """The matrices of the paper's Figure 5, one per dense block, from a DenseNet's parameters.

  Works for plain and -BC models, CIFAR and ImageNet stems, trained, converted or freshly initialized
  parameters (`variables['params']`). The block input width k0 and the growth rate k are read off the
  kernels. Weights without a classifier (a backbone) leave the last block's last row NaN.
  """
  if 'params' in params:
    raise ValueError("feature_reuse takes the parameters: pass variables['params'], not variables.")
  block_names = _numbered(params, 'block')
  if not block_names:
    raise ValueError(f'No dense blocks (block1, block2, ...) among the parameters {sorted(params)}.')
  result = []
  for b, name in enumerate(block_names, 1):
    block = params[name]
    layers = [block[layer] for layer in _numbered(block, 'layer')]
    block_input = _kernel(layers[0]['conv1']).shape[-2]
    growth_rate = _kernel(layers[0].get('conv2', layers[0]['conv1'])).shape[-1]
    sources = (block_input,) + (growth_rate,) * len(layers)
    matrix = np.full((len(layers) + 1, len(layers) + 1), np.nan)
    for t, layer in enumerate(layers):
      matrix[t, : t + 1] = mean_abs_by_source(_kernel(layer['conv1']), sources[: t + 1])
    is_last = b == len(block_names)
    output_name = 'classifier' if is_last else f'transition{b}'
    if output_name in params:
      consumer = params[output_name] if is_last else params[output_name]['conv']
      matrix[-1] = mean_abs_by_source(_kernel(consumer), sources)
    elif is_last:
      output_name = None
    else:
      raise ValueError(f'{name} is followed by another block but the parameters lack {output_name}.')
    result.append(BlockReuse(name, matrix, output_name, sources))
  return tuple(result)


def normalize_targets(reuse: Sequence[BlockReuse]) -> tuple[BlockReuse, ...]:
  """Every row divided by its largest cell: how much each target reads each source relative to its favourite.

  BatchNorm normalizes every conv output channel wherever it is read, so the overall scale of a conv's weights
  is arbitrary (weight decay and the gradients settle it); the relative weights within a row are not. The
  classifier, followed by no BatchNorm, has a meaningful scale, which this view drops too.
  """
  result = []
  for block in reuse:
    peak = np.max(np.where(np.isnan(block.matrix), -np.inf, block.matrix), axis=1, keepdims=True)
    with np.errstate(divide='ignore', invalid='ignore'):  # rows of NaN (no classifier) or zeros stay NaN
      result.append(dataclasses.replace(block, matrix=np.where(peak > 0, block.matrix / peak, np.nan)))
  return tuple(result)


def _numbered(tree: Params, prefix: str) -> list[str]:
  """Keys `prefix1`, `prefix2`, ... in numeric order; a gap means a broken tree."""
  numbers = sorted(int(m.group(1)) for key in tree if (m := re.fullmatch(rf'{prefix}(\d+)', key)))
  if numbers != list(range(1, len(numbers) + 1)):
    raise ValueError(f'Expected {prefix}1 .. {prefix}{len(numbers)}, found {prefix} numbers {numbers}.')
  return [f'{prefix}{n}' for n in numbers]


def _kernel(module_params: Params) -> Any:
  return module_params['kernel']


# ----------------------------------------------------------------------------------------------
# Architecture: channel growth, activations, memory.


def paper_depth(model: model_lib.DenseNet) -> int:
  """The paper's depth L: the stem conv, every dense-layer conv (two per bottleneck layer), the transition convs
  and the classifier (121 for DenseNet-121, 100 for DenseNet-BC L=100)."""
  convs_per_layer = 2 if model.bottleneck else 1
  return 1 + convs_per_layer * sum(model.block_sizes) + (len(model.block_sizes) - 1) + 1


def channel_growth(model: model_lib.DenseNet) -> dict[str, tuple[int, ...]]:
  """Channels of each block after 0, 1, ..., L layers: (k0, k0 + k, ..., k0 + L * k), read off the kernels.

  Entry l is what dense layer l + 1 reads; the last entry is the block's output, which the next transition
  (or the classifier) reads.
  """
  params = abstract_variables(model)['params']
  growth = {}
  for name in _numbered(params, 'block'):
    block = params[name]
    layers = [block[layer] for layer in _numbered(block, 'layer')]
    inputs = [_kernel(layer['conv1']).shape[-2] for layer in layers]
    last = layers[-1]
    growth[name] = (*inputs, inputs[-1] + _kernel(last.get('conv2', last['conv1'])).shape[-1])
  return growth


def block_activations(model: model_lib.DenseNet, variables: Mapping[str, Any], images: Any) -> dict[str, np.ndarray]:
  """Eval-mode feature maps of a batch of NHWC images after the stem and after every block and transition.

  Returns {'stem': ..., 'block1': ..., 'transition1': ..., ..., 'blockB': ...} in network order, each
  (batch, height, width, channels) as numpy.
  """
  maps = jax.jit(functools.partial(model.apply, features=True))(variables, jnp.asarray(images, jnp.float32))
  return {name: np.asarray(maps[name]) for name in model.stage_names}


@dataclasses.dataclass(frozen=True)
class MemoryPoint:
  """Temporary memory of one compiled training step, naive and memory-efficient."""

  depth: int
  naive_bytes: int
  efficient_bytes: int


def activation_memory_vs_depth(
    depths: Sequence[int],
    *,
    growth_rate: int = 12,
    bottleneck: bool = True,
    compression: float = 0.5,
    batch_size: int = 16,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 10,
) -> tuple[MemoryPoint, ...]:
  """Activation memory of a training step of CIFAR-style DenseNets of each depth, naive and memory_efficient.

  Every step is compiled (not run) and measured with memory.train_step_temp_bytes, two compilations per depth.
  On CPU the comparison needs XLA_FLAGS to contain platform.xla_flags.KEEP_REMAT_ON_CPU before JAX starts; without it
  both variants would report the same memory, so that is an error.
  """
  if not platform.remat_is_effective(jax.default_backend()):
    raise RuntimeError(
        'On XLA:CPU memory_efficient=True saves nothing unless XLA_FLAGS contains '
        f'{xla_flags.KEEP_REMAT_ON_CPU}; call densenet_jax.platform.prepare_environment() before JAX starts.'
    )
  points = []
  for depth in depths:
    model = model_lib.cifar_densenet(depth, growth_rate, bottleneck=bottleneck, compression=compression,
                                  num_classes=num_classes, input_channels=input_shape[-1])
    naive, efficient = (
        memory.train_step_temp_bytes(model.clone(memory_efficient=flag), batch_size, input_shape)
        for flag in (False, True)
    )
    points.append(MemoryPoint(depth, naive, efficient))
  return tuple(points)


# ----------------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, no pyplot state: they display as the last expression of a notebook cell).


def plot_feature_reuse(reuse: Sequence[BlockReuse], *, title: str | None = None, label: str = 'mean |w|',
                       dpi: int = 90):
  """One heat map per block, drawn as in the paper: source s vertically, target layer horizontally.

  The last column is the transition (T) or the classifier (C). Each block has its own color scale from 0 to
  its largest cell, named `label`; blank cells are connections that do not exist.
  """
  from matplotlib.figure import Figure  # matplotlib only when drawing

  fig = Figure(figsize=(4.2 * len(reuse), 4.0), dpi=dpi, layout='constrained')
  axes = fig.subplots(1, len(reuse), squeeze=False)[0]
  for ax, block in zip(axes, reuse):
    shown = np.ma.masked_invalid(block.matrix.T)
    image = ax.imshow(shown, cmap='viridis', vmin=0.0, vmax=np.nanmax(block.matrix), interpolation='nearest')
    num_layers = block.num_layers
    last = {None: '-', 'classifier': 'C'}.get(block.output_name, 'T')
    targets = _labelled_layers(num_layers)
    ax.set_xticks([t - 1 for t in targets] + [num_layers], [*map(str, targets), last])
    ax.set_yticks(sorted({0, *targets, num_layers}))
    ax.tick_params(labelsize=7)
    ax.set_xlabel('target layer (T: transition, C: classifier)')
    ax.set_ylabel('source layer (0: block input)')
    ax.set_title(block.name)
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
  if title:
    fig.suptitle(title)
  return fig


def _labelled_layers(num_layers: int) -> list[int]:
  """Layers that get a tick label: all up to 16, else 1 and every 4th (DenseNet-121 has blocks of 24)."""
  if num_layers <= 16:
    return list(range(1, num_layers + 1))
  return [1, *range(4, num_layers - 1, 4)]  # ends before the last column's label


def plot_feature_maps(activations: Mapping[str, np.ndarray], *, num_channels: int = 6, image: Any = None,
                      dpi: int = 80):
  """For each stage of block_activations (first image of the batch): the mean over channels and the
  `num_channels` channels with the largest mean activation; `image` (H, W, C), if given, is shown first."""
  from matplotlib.figure import Figure  # matplotlib only when drawing

  rows = len(activations) + (image is not None)
  fig = Figure(figsize=(1.5 * (num_channels + 1), 1.55 * rows), dpi=dpi, layout='constrained')
  axes = fig.subplots(rows, num_channels + 1, squeeze=False)
  for ax in axes.flat:
    ax.set_axis_off()
  if image is not None:
    image = np.asarray(image, np.float64)
    image = (image - image.min()) / max(image.max() - image.min(), 1e-12)
    axes[0, 0].imshow(image.squeeze(), cmap='gray')
    axes[0, 0].set_title('input', fontsize=8)
  for row, (name, maps) in zip(axes[rows - len(activations):], activations.items()):
    maps = maps[0]
    strongest = np.argsort(maps.mean(axis=(0, 1)))[::-1][:num_channels]
    row[0].imshow(maps.mean(axis=-1), cmap='magma')
    row[0].set_title(f'{name} {"x".join(map(str, maps.shape))}\nmean of channels', fontsize=7)
    for ax, channel in zip(row[1:], strongest):
      ax.imshow(maps[..., channel], cmap='magma')
      ax.set_title(f'channel {channel}', fontsize=7)
  return fig
