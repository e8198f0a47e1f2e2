"""One dense layer as a pure function of its parameters, shared by every form of a dense block.

BN-ReLU-Conv3x3 (DenseNet), or with a bottleneck BN-ReLU-Conv1x1(4k)-BN-ReLU-Conv3x3(k) (DenseNet-B). Split in two
halves (`dense_layer_bottom`, `dense_layer_top`) so that the scanned block's hand-written backward pass can keep
the bottleneck output between them, as `memory_efficient` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from densenet_jax.model import layers
from densenet_jax.model.forms import dropout_masks
from densenet_jax.model.forms import kernels as kernel_sets
from densenet_jax.model.layers import BOTTLENECK_WIDTH, Moments

Array = jax.Array
Params = Mapping[str, Any]

BOTTLENECK_OUTPUT = 'dense_layer_bottleneck_output'  # what memory_efficient keeps of each layer
DROPOUT_MASK = 'dense_layer_dropout_mask'  # and its packed dropout masks


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What a dense layer computes, apart from its parameters."""

  growth_rate: int
  bottleneck: bool
  dropout_rate: float
  dtype: Any
  kernels: kernel_sets.Kernels
  epsilon: float = layers.BATCH_NORM_EPSILON
  batch_norm_group_size: int | None = None  # examples per BatchNorm statistics group; None: the whole batch
  dropout_masks: str = 'jax'  # how keep masks are drawn: a name of kernels.DROPOUT_MASKS (the same bits)

  @property
  def bottom_channels(self) -> int:
    """Channels of the first convolution's output: the bottleneck's, or the new feature map's."""
    return BOTTLENECK_WIDTH * self.growth_rate if self.bottleneck else self.growth_rate


def dropout(x: Array, rate: float, mask: Array | None, kernels: kernel_sets.Kernels) -> Array:
  """Inverted dropout, as flax.linen.Dropout computes it, with the packed keep mask `mask` (`keep_mask`) and
  `kernels`' hook on x; the identity without a mask."""
  if mask is None:
    return x
  keep = dropout_masks.unpack(mask, x.shape)
  return jnp.where(keep, kernels.dropout_input(x) / (1.0 - rate), jnp.zeros_like(x))


def keep_mask(key: Array | None, rate: float, shape: tuple[int, ...], draw: str = 'jax') -> Array | None:
  """The keep mask of a dropout of `rate` on an array of `shape`, drawn from `key` by `kernels.DROPOUT_MASKS[draw]`
  and packed eight values to a byte (`dropout_masks.pack`); None without a key.

  Packed, a mask is drawn once, by the kernel that packs it: XLA fuses a mask's elementwise code into each of its
  consumers, so a mask used in the forward and the backward pass would otherwise be drawn in both. A backward
  pass that recomputes a layer reads the packed mask instead of drawing it again (`DROPOUT_MASK`).
  """
  if key is None or rate == 0.0:
    return None
  mask = kernel_sets.DROPOUT_MASKS[draw](key, 1.0 - rate, shape)
  return checkpoint_name(dropout_masks.pack(mask), DROPOUT_MASK)


def layer_keep_masks(spec: LayerSpec, key: Array | None, batch_shape: tuple[int, ...]):
  """The packed keep masks of a layer's dropouts after its first and its second convolution, drawn from the
  layer's key (None without a key or a second convolution); `batch_shape`: the layer input's shape without
  channels."""
  if key is None or spec.dropout_rate == 0.0:
    return None, None
  bottom_key, top_key = jax.random.split(key)
  bottom = keep_mask(bottom_key, spec.dropout_rate, (*batch_shape, spec.bottom_channels), spec.dropout_masks)
  top = (keep_mask(top_key, spec.dropout_rate, (*batch_shape, spec.growth_rate), spec.dropout_masks)
         if spec.bottleneck else None)
  return bottom, top


def dense_layer_bottom(spec: LayerSpec, params: Params, x: Array, stats: Moments, keep: Array | None) -> Array:
  """BN-ReLU-conv of the layer input x: the bottleneck 1x1 conv (DenseNet-B) or the layer's 3x3 conv, then dropout
  with the packed keep mask `keep` (None: none)."""
  norm = params['norm1']
  y = layers.normalize_relu(x, stats, norm['scale'], norm['bias'], spec.epsilon, spec.dtype)
  kernel = params['conv1']['kernel'].astype(spec.dtype)
  conv = spec.kernels.conv1x1 if spec.bottleneck else spec.kernels.conv3x3
  return dropout(conv(y, kernel), spec.dropout_rate, keep, spec.kernels)


def dense_layer_top(spec: LayerSpec, params: Params, z: Array, stats: Moments | None, keep: Array | None):
  """BN-ReLU-conv3x3 of a bottleneck output z, then dropout with the packed keep mask `keep` (None: none);
  (new feature map, the moments z was normalized with).

  `stats` None: training, normalize with z's batch moments.
  """
  stats = layers.moments(z, spec.batch_norm_group_size) if stats is None else stats
  norm = params['norm2']
  y = layers.normalize_relu(z, stats, norm['scale'], norm['bias'], spec.epsilon, spec.dtype)
  new = spec.kernels.conv3x3(y, params['conv2']['kernel'].astype(spec.dtype))
  return dropout(new, spec.dropout_rate, keep, spec.kernels), stats


def dense_layer(
    spec: LayerSpec, params: Params, x: Array, stats: Moments, bottleneck_stats: Moments | None, key: Array | None
) -> tuple[Array, Moments | None]:
  """One dense layer: `growth_rate` new channels from x, the concatenation of every earlier feature map.

  `stats` normalize x (batch moments in training, running averages in evaluation); `bottleneck_stats` those of
  the bottleneck output (None in training: its batch moments). Returns the new feature map and the moments the
  bottleneck output was normalized with (None without a bottleneck).
  """
  bottom_keep, top_keep = layer_keep_masks(spec, key, x.shape[:-1])
  z = dense_layer_bottom(spec, params, x, stats, bottom_keep)
  if not spec.bottleneck:
    return z, None
  return dense_layer_top(spec, params, checkpoint_name(z, BOTTLENECK_OUTPUT), bottleneck_stats, top_keep)
