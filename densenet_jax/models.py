"""DenseNet (Huang et al., CVPR 2017) as Flax Linen modules.

The modules follow the paper and the original Torch code exactly (see docs/models.md):

* `DenseLayer`: BN-ReLU-Conv3x3, or with a bottleneck BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k).
* `DenseBlock`: grows its input by `growth_rate` channels per layer with `jnp.concatenate`.
* `Transition`: BN-ReLU-Conv1x1 with compression, then 2x2 average pooling.
* `DenseNet`: a CIFAR stem (one 3x3 conv) or an ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max pool),
  dense blocks separated by transitions, and a BN-ReLU-global-average-pool-Dense head.

Named variants live in a registry: `create_model('densenet121', num_classes=1000)`. Any CIFAR-style
DenseNet(-BC) is available from `cifar_densenet(depth, growth_rate, ...)`.

Images are NHWC. `memory_efficient=True` recomputes concat -> BN -> ReLU -> first conv of every dense
layer in the backward pass (Pleiss et al., 2017), so that the activations kept for the backward pass
grow linearly instead of quadratically with depth.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from densenet_jax import layers, memory, scanned_block, xla_flags

Array = jax.Array
Dtype = Any

BATCH_NORM_MOMENTUM = 0.9  # Flax convention: running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1).
BATCH_NORM_EPSILON = 1e-5
BOTTLENECK_WIDTH = 4  # The bottleneck 1x1 conv produces 4 * growth_rate channels.

# He initialization with fan-out, from a normal distribution: N(0, sqrt(2 / (kh * kw * out_channels))).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in the original code.
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class _Layers(nn.Module):
  """Shared constructors so every module builds BN / conv / dropout the same way."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def norm_relu(self, name: str) -> layers.BatchNormReLU:
    # Every BatchNorm of DenseNet is followed by a ReLU; the pair is one module (see layers.py).
    return layers.BatchNormReLU(
        momentum=BATCH_NORM_MOMENTUM,
        epsilon=BATCH_NORM_EPSILON,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
    )

  def conv(self, features: int, kernel: int, name: str, stride: int = 1) -> nn.Conv:
    # Symmetric padding (kernel // 2 on every side), as in Torch; 'SAME' differs on even inputs.
    pad = kernel // 2
    # 1x1 convolutions as matrix products (layers.py); the others are XLA's convolutions.
    fast_conv = layers.pointwise_conv if kernel == 1 and stride == 1 else None
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=name,
        conv_general_dilated=fast_conv,
    )


class DenseLayer(_Layers):
  """One layer of a dense block: reads all earlier feature maps, adds `growth_rate` new ones.

  The input is the *list* of feature maps of the block so far (and, in training, their batch
  moments), not their concatenation: the layer normalizes and concatenates them in one pass, and
  with `memory_efficient=True` that pass is recomputed in the backward pass instead of stored.
  """

  growth_rate: int = 12
  bottleneck: bool = False
  dropout_rate: float = 0.0
  memory_efficient: bool = False

  def setup(self):
    self.norm1 = self.norm_relu('norm1')
    if self.bottleneck:
      self.conv1 = self.conv(BOTTLENECK_WIDTH * self.growth_rate, 1, 'conv1')
      self.norm2 = self.norm_relu('norm2')
      self.conv2 = self.conv(self.growth_rate, 3, 'conv2')
    else:
      self.conv1 = self.conv(self.growth_rate, 3, 'conv1')
    self.dropout = nn.Dropout(self.dropout_rate)

  def __call__(
      self, features: Sequence[Array], batch_moments: Sequence[layers.Moments] | None, train: bool
  ) -> Array:
    layer = _dense_layer
    if self.memory_efficient:
      # Keep only conv outputs for the backward pass and recompute the normalized concatenation
      # from the layer inputs (which the block keeps alive anyway): linear instead of quadratic memory.
      layer = nn.remat(
          layer,
          static_argnums=(3,),
          policy=jax.checkpoint_policies.save_only_these_names(_BOTTLENECK_OUTPUT),
      )
    return layer(self, tuple(features), batch_moments and tuple(batch_moments), train)


_BOTTLENECK_OUTPUT = 'dense_layer_bottleneck_output'


def _dense_layer(layer: DenseLayer, features, batch_moments, train: bool) -> Array:
  x = layer.norm1(features, train, batch_moments)
  x = layer.conv1(x)
  x = layer.dropout(x, deterministic=not train)
  if layer.bottleneck:
    x = checkpoint_name(x, _BOTTLENECK_OUTPUT)
    x = layer.norm2([x], train)
    x = layer.conv2(x)
    x = layer.dropout(x, deterministic=not train)
  return x


class DenseBlock(_Layers):
  """`num_layers` dense layers; the output concatenates the input and every layer's output.

  With `layers_per_scan` = n > 0 the block is computed n layers at a time under `jax.lax.scan`
  (scanned_block.py): the same variables and function, compiled once per group of n layers instead
  of once per layer.
  """

  num_layers: int = 6
  growth_rate: int = 12
  bottleneck: bool = False
  dropout_rate: float = 0.0
  memory_efficient: bool = False
  layers_per_scan: int = 0

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if self.layers_per_scan and not self.is_initializing():
      return self._scanned(x, train)
    features = [x]
    # A channel's batch statistics are the same for every layer that reads it: compute them once.
    batch_moments = [layers.moments(x)] if train else None
    for i in range(self.num_layers):
      new = DenseLayer(
          growth_rate=self.growth_rate,
          bottleneck=self.bottleneck,
          dropout_rate=self.dropout_rate,
          memory_efficient=self.memory_efficient,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'layer{i + 1}',
      )(features, batch_moments, train)
      new = layers.gradient_barrier(new)  # Later layers' gradient contributions: summed once.
      features.append(new)
      if train:
        batch_moments.append(layers.moments(new))
    return jnp.concatenate(features, axis=-1)

  def _scanned(self, x: Array, train: bool) -> Array:
    # The same variables, initialized by the unrolled layers above, computed by scanned_block.py.
    spec = scanned_block.BlockSpec(
        input_channels=x.shape[-1],
        num_layers=self.num_layers,
        growth_rate=self.growth_rate,
        bottleneck=self.bottleneck,
        layers_per_scan=self.layers_per_scan,
        dropout_rate=self.dropout_rate,
        epsilon=BATCH_NORM_EPSILON,
        dtype=self.dtype,
    )
    names = [f'layer{i + 1}' for i in range(self.num_layers)]
    params = [self.variables['params'][name] for name in names]
    running = [self.variables['batch_stats'][name] for name in names]
    if not train:
      return scanned_block.evaluate(spec, x, params, running)
    dropout_key = self.make_rng('dropout') if self.dropout_rate else None
    output, batch = scanned_block.train(spec, x, params, dropout_key)
    # Like every BatchNorm, a train-mode call needs mutable=['batch_stats'] (flax raises otherwise).
    for name, layer_running, layer_batch in zip(names, running, batch):
      self.put_variable('batch_stats', name, {
          norm: {
              'mean': layers.running_average(layer_running[norm]['mean'], stats.mean, BATCH_NORM_MOMENTUM),
              'var': layers.running_average(layer_running[norm]['var'], stats.var, BATCH_NORM_MOMENTUM),
          }
          for norm, stats in layer_batch.items()
      })
    return output


class Transition(_Layers):
  """BN-ReLU-Conv1x1 to `out_channels`, then 2x2 average pooling with stride 2."""

  out_channels: int = 0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = self.norm_relu('norm')([x], train)
    conv = self.conv(self.out_channels, 1, 'conv')
    if self.dropout_rate:
      x = nn.Dropout(self.dropout_rate)(conv(x), deterministic=not train)
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    # A 1x1 convolution and average pooling commute: pooling first does a quarter of the matmul.
    return conv(nn.avg_pool(x, (2, 2), strides=(2, 2)))


Stem = Literal['cifar', 'imagenet']


class DenseNet(_Layers):
  """A DenseNet for images of shape (batch, height, width, input_channels).

  Attributes:
    block_sizes: number of dense layers in each block.
    growth_rate: k, the channels each dense layer adds.
    num_classes: outputs of the classifier.
    stem: 'cifar' (3x3 conv, stride 1) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    stem_channels: output channels of the stem conv (16 for plain CIFAR DenseNets, 2k otherwise).
    bottleneck: use BN-ReLU-Conv1x1(4k) before each 3x3 conv (the "B" of DenseNet-BC).
    compression: theta; a transition maps m channels to floor(theta * m) (the "C").
    dropout_rate: dropout after every conv except the stem's, in train mode only.
    memory_efficient: recompute concat-BN-ReLU-conv of each dense layer in the backward pass.
    layers_per_scan: 0 writes every dense layer out; n > 0 computes each dense block n layers at a
      time under jax.lax.scan, each layer reading its group's widest input through zero-padded
      parameters (scanned_block.py): the same function and variables, far less to compile, the padded
      channels' work on top. Needs memory_efficient=True, whose memory it keeps by construction.
    input_channels: channels the input images must have (checked, with a clear message).
    dtype: computation dtype (e.g. jnp.bfloat16); parameters stay in `param_dtype`.
  """

  block_sizes: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_classes: int = 1000
  stem: Stem = 'imagenet'
  stem_channels: int = 64
  bottleneck: bool = True
  compression: float = 0.5
  dropout_rate: float = 0.0
  memory_efficient: bool = False
  layers_per_scan: int = 0
  input_channels: int = 3

  @property
  def min_input_size(self) -> int:
    """Smallest height/width that leaves at least one pixel in the last block."""
    stem_stride = 4 if self.stem == 'imagenet' else 1
    return stem_stride * 2 ** (len(self.block_sizes) - 1)

  def _check_input(self, x: Array) -> None:
    expected = f'(batch, height, width, {self.input_channels})'
    if x.ndim != 4:
      raise ValueError(
          f'DenseNet expects a batch of NHWC images of shape {expected}, got an array of rank '
          f'{x.ndim} with shape {tuple(x.shape)}. Add a batch axis for a single image '
          '(x[None]) and put channels last.'
      )
    if x.shape[-1] != self.input_channels:
      raise ValueError(
          f'DenseNet expects {self.input_channels} input channels (shape {expected}), got shape '
          f'{tuple(x.shape)}. Images must be channels-last (NHWC); for other channel counts '
          f'build the model with input_channels={x.shape[-1]}.'
      )
    if min(x.shape[1:3]) < self.min_input_size:
      raise ValueError(
          f'Input images of size {x.shape[1]}x{x.shape[2]} are too small for this DenseNet: '
          f'with the {self.stem} stem and {len(self.block_sizes)} blocks, height and width '
          f'must be at least {self.min_input_size}.'
      )

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    """Returns float32 logits of shape (batch, num_classes)."""
    self._check_input(x)
    if self.layers_per_scan < 0 or (self.layers_per_scan and not self.memory_efficient):
      raise ValueError(
          f'layers_per_scan={self.layers_per_scan}: use 0 (every dense layer written out) or a positive '
          'number of layers per scan together with memory_efficient=True (a scanned block keeps only '
          "what memory_efficient keeps: it has no variant that stores every layer's input)."
      )
    # A scanned block needs no rematerialization: its backward pass is written by hand.
    if self.memory_efficient and not self.layers_per_scan and not memory.remat_is_effective():
      warnings.warn(
          'memory_efficient=True saves no memory on XLA:CPU unless XLA_FLAGS contains '
          f'{xla_flags.KEEP_REMAT_ON_CPU} when JAX starts (see densenet_jax/xla_flags.py).',
          stacklevel=2,
      )
    x = jnp.asarray(x, self.dtype)
    shared = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    if self.stem == 'imagenet':
      x = self.conv(self.stem_channels, 7, 'stem_conv', stride=2)(x)
      x = self.norm_relu('stem_norm')([x], train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = self.conv(self.stem_channels, 3, 'stem_conv')(x)

    for b, num_layers in enumerate(self.block_sizes):
      x = DenseBlock(
          num_layers=num_layers,
          growth_rate=self.growth_rate,
          bottleneck=self.bottleneck,
          dropout_rate=self.dropout_rate,
          memory_efficient=self.memory_efficient,
          layers_per_scan=self.layers_per_scan,
          name=f'block{b + 1}',
          **shared,
      )(x, train)
      if b + 1 < len(self.block_sizes):
        x = Transition(
            out_channels=int(math.floor(self.compression * x.shape[-1])),
            dropout_rate=self.dropout_rate,
            name=f'transition{b + 1}',
            **shared,
        )(x, train)

    x = self.norm_relu('final_norm')([x], train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
        self.num_classes,
        kernel_init=dense_kernel_init,
        bias_init=nn.initializers.zeros,
        name='classifier',
        **shared,
    )(x)
    return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------------------------
# Builders and the registry of the paper's models.


def imagenet_densenet(
    block_sizes: Sequence[int], growth_rate: int = 32, *, num_classes: int = 1000, **overrides
) -> DenseNet:
  """An ImageNet DenseNet-BC (bottleneck, compression 0.5, 2k stem channels)."""
  kwargs = dict(
      block_sizes=tuple(block_sizes),
      growth_rate=growth_rate,
      num_classes=num_classes,
      stem='imagenet',
      stem_channels=2 * growth_rate,
      bottleneck=True,
      compression=0.5,
  )
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

  Depth counts the stem conv, the transition convs, the classifier and every conv of the dense
  layers (two per bottleneck layer). With three blocks: L = 3n + 4 without bottleneck and
  L = 6n + 4 with bottleneck, where n is the number of dense layers per block.
  """
  convs_per_layer = 2 if bottleneck else 1
  other_layers = num_blocks + 1  # stem conv + (num_blocks - 1) transitions + classifier
  per_block = convs_per_layer * num_blocks
  if depth <= other_layers or (depth - other_layers) % per_block:
    kind = 'with bottleneck (DenseNet-B/BC)' if bottleneck else 'without bottleneck'
    valid = ', '.join(str(per_block * n + other_layers) for n in range(1, 5))
    raise ValueError(
        f'Impossible depth {depth} for a {num_blocks}-block DenseNet {kind}: depth must be '
        f'{per_block}n + {other_layers} for a whole number n >= 1 of layers per block '
        f'(e.g. {valid}, ...).'
    )
  if not 0.0 < compression <= 1.0:
    raise ValueError(f'compression must be in (0, 1], got {compression}.')
  n = (depth - other_layers) // per_block
  kwargs = dict(
      block_sizes=(n,) * num_blocks,
      growth_rate=growth_rate,
      num_classes=num_classes,
      stem='cifar',
      # The paper's counts need 16 stem channels for plain DenseNets and 2k for -B/-BC.
      stem_channels=2 * growth_rate if bottleneck else 16,
      bottleneck=bottleneck,
      compression=compression,
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

  `overrides` set any other `DenseNet` attribute: dtype, memory_efficient, dropout_rate, ...
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}. Valid names: {", ".join(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **overrides)
