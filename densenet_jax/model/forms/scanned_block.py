"""A dense block computed a group of layers at a time under `jax.lax.scan`: same function, less code.

Written out layer by layer, every layer of a dense block reads a different number of channels, so XLA
compiles every layer's kernels anew and a deep DenseNet takes minutes to compile. Here the layers of a
block are split into groups of `layers_per_scan`, and every layer of a group reads the group's widest
input: a prefix of the block's output buffer, zero-padded where later layers have not written yet. The
layer's first BatchNorm scale and bias and its first convolution kernel are zero-padded to that width,
so the padded channels are normalized to relu(0 * x + 0) = 0 and multiplied by zero weights: the result,
the gradients and the variables are exactly those of the unrolled block. XLA compiles one loop body
per group instead of one set of kernels per layer; the price is the padded channels' work in the first
BatchNorm-ReLU and convolution of each layer.

The backward pass is written by hand (`jax.custom_vjp`). A channel that a layer must not see is one
its zero-padded parameters ignore, so the backward pass can read every layer's input from the block's
*final* output buffer instead of keeping one buffer per layer. It keeps the output buffer, the batch
moments, each layer's bottleneck output (the activations `memory_efficient=True` keeps), that output's
moments and the layer's dropout masks (packed eight to a byte), and recomputes the rest, so activation
memory grows linearly with depth. The gradient through the moments comes from the kept ones
(`layers.moments_gradient`), not from reducing the feature maps again.

In training mode the BatchNorm statistics of a channel are computed once, when the channel is written
(as in the unrolled block); they are returned for the running averages and are not differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax.model import layers
from densenet_jax.model.forms import dense_layer
from densenet_jax.model.layers import Moments

Array = jax.Array
Tree = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The static shape of a dense block, how it is grouped, and what each of its layers computes."""

  input_channels: int
  num_layers: int
  layers_per_scan: int
  layer: dense_layer.LayerSpec

  def __post_init__(self):
    if self.layers_per_scan < 1:
      raise ValueError(f'layers_per_scan must be at least 1, got {self.layers_per_scan}.')

  @property
  def growth_rate(self) -> int:
    return self.layer.growth_rate

  @property
  def output_channels(self) -> int:
    return self.input_width(self.num_layers)

  def input_width(self, layer: int) -> int:
    """Channels that layer `layer` (0-based) reads: the block input and every earlier layer's output."""
    return self.input_channels + layer * self.growth_rate

  def groups(self) -> list[range]:
    n = self.layers_per_scan
    return [range(start, min(start + n, self.num_layers)) for start in range(0, self.num_layers, n)]


# ----------------------------------------------------------------------------------------------
# The variables of a group, stacked and padded: one array per kind of variable, one row per layer.


# Padding and slicing as lax primitives: jnp.pad and jnp indexing trace a nested function for every new shape,
# and a deep model has a new shape at every layer (docs/performance.md, "Compile time").
def _pad_last(x: Array, width: int, axis: int = -1) -> Array:
  padding = [(0, 0, 0)] * x.ndim
  padding[axis] = (0, width - x.shape[axis], 0)
  return jax.lax.pad(x, np.zeros((), x.dtype), padding)


def _prefix(x: Array, width: int) -> Array:
  """The first `width` channels (last axis) of x."""
  return jax.lax.slice_in_dim(x, 0, width, axis=-1)


def _pad_layer(layer: Tree, width: int) -> dict[str, Any]:
  """A layer's params or batch_stats with its first BatchNorm and convolution padded to `width` inputs."""
  padded = dict(layer)
  padded['norm1'] = {name: _pad_last(v, width) for name, v in layer['norm1'].items()}
  if 'conv1' in layer:
    padded['conv1'] = {'kernel': _pad_last(layer['conv1']['kernel'], width, axis=-2)}
  return padded


def stack_groups(spec: BlockSpec, per_layer: Sequence[Tree]) -> list[Any]:
  """Per group, the layers' variables padded to the group's width and stacked along a new first axis."""
  stacked = []
  for group in spec.groups():
    width = spec.input_width(group[-1])
    padded = [_pad_layer(per_layer[i], width) for i in group]
    stacked.append(jax.tree.map(lambda *rows: jnp.stack(rows), *padded))
  return stacked


# ----------------------------------------------------------------------------------------------
# The forward pass, shared by training (batch moments) and evaluation (running statistics).


def _forward(spec, x, group_params, group_keys, group_stats):
  """(output buffer, block moments, per group: (bottleneck outputs and their moments, packed dropout masks)).

  Training when `group_stats` is None: every layer normalizes with the batch moments of the channels it
  reads, which are computed once per channel and carried along with the buffer.
  """
  train = group_stats is None
  buffer = _pad_last(x, spec.output_channels)  # The block input, then zeros where the layers will write.
  carry_moments = None
  if train:
    first = layers.moments(x, spec.layer.batch_norm_group_size)
    carry_moments = Moments(*(_pad_last(m, spec.output_channels) for m in first))

  saved = []
  group_stats = group_stats or [None] * len(group_params)
  for group, params, keys, stats in zip(spec.groups(), group_params, group_keys, group_stats):
    group_width = spec.input_width(group[-1])

    def body(carry, row, group_width=group_width):
      buffer, block_moments = carry
      index, params, key, stats = row
      masks = dense_layer.layer_keep_masks(spec.layer, key, buffer.shape[:-1])  # kept for the backward pass
      bottom_keep, top_keep = masks
      norm1 = Moments(*(_prefix(m, group_width) for m in block_moments)) if train else Moments(**stats['norm1'])
      z = dense_layer.dense_layer_bottom(spec.layer, params, _prefix(buffer, group_width), norm1, bottom_keep)
      new, z_moments = z, None
      if spec.layer.bottleneck:
        norm2 = None if train else Moments(**stats['norm2'])
        new, z_moments = dense_layer.dense_layer_top(spec.layer, params, z, norm2, top_keep)
      position = spec.input_width(index)
      buffer = jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), position, axis=-1)
      if train:
        block_moments = Moments(*(
            jax.lax.dynamic_update_slice_in_dim(m, new_m, position, axis=-1)
            for m, new_m in zip(block_moments, layers.moments(new, spec.layer.batch_norm_group_size))
        ))
      bottleneck = (z, z_moments) if train and spec.layer.bottleneck else None
      return (buffer, block_moments), (bottleneck, masks)

    rows = (jnp.arange(group.start, group.stop), params, keys, stats)
    (buffer, carry_moments), keep = jax.lax.scan(body, (buffer, carry_moments), rows)
    saved.append(keep)
  return buffer, carry_moments, saved


# ----------------------------------------------------------------------------------------------
# Training: forward with batch moments, backward by hand from the final buffer.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(spec: BlockSpec, x: Array, group_params: list[Any], group_keys: list[Any]):
  return _train_forward(spec, x, group_params, group_keys)[0]  # XLA drops the unused residuals.


def _train_forward(spec, x, group_params, group_keys):
  buffer, block_moments, saved = _forward(spec, x, group_params, group_keys, None)
  bottlenecks, bottleneck_moments = zip(*[(None, None) if kept is None else kept for kept, _ in saved])
  group_masks = [masks for _, masks in saved]
  residuals = (x, buffer, block_moments, group_params, group_masks, list(bottlenecks), list(bottleneck_moments))
  return (buffer, (block_moments, list(bottleneck_moments))), residuals


def _train_backward(spec, residuals, cotangents):
  x, buffer, block_moments, group_params, group_masks, bottlenecks, bottleneck_moments = residuals
  d_buffer = cotangents[0]  # The moments are statistics for the running averages: not differentiated.
  d_moments = Moments(*(jnp.zeros_like(m) for m in block_moments))
  growth = spec.growth_rate
  # The gradient through the batch moments, from the moments kept from the forward pass: no reduction again.
  moments_gradient = functools.partial(layers.moments_gradient, group_size=spec.layer.batch_norm_group_size)

  d_group_params = []
  groups = zip(spec.groups(), group_params, group_masks, bottlenecks, bottleneck_moments)
  for group, params, masks, z, z_moments in reversed(list(groups)):
    group_width = spec.input_width(group[-1])
    inputs = _prefix(buffer, group_width)
    norm1 = Moments(*(_prefix(m, group_width) for m in block_moments))

    def body(carry, row, inputs=inputs, norm1=norm1, group_width=group_width):
      d_buffer, d_moments = carry
      index, params, (bottom_keep, top_keep), z, z_moments = row
      position = spec.input_width(index)
      new = jax.lax.dynamic_slice_in_dim(buffer, position, growth, axis=-1)
      # Every later layer has added its share of this layer's output gradient; add the share that
      # flows through the batch moments of the new channels.
      d_new = jax.lax.dynamic_slice_in_dim(d_buffer, position, growth, axis=-1)
      new_moments, d_new_moments = (
          Moments(*(jax.lax.dynamic_slice_in_dim(m, position, growth, axis=-1) for m in ms))
          for ms in (block_moments, d_moments))
      d_new = d_new + moments_gradient(new, new_moments, d_new_moments)

      def bottom(inputs, norm1, params):
        return dense_layer.dense_layer_bottom(spec.layer, params, inputs, norm1, bottom_keep)

      if spec.layer.bottleneck:
        def top(z, z_moments, params):
          return dense_layer.dense_layer_top(spec.layer, params, z, z_moments, top_keep)[0]

        _, top_vjp = jax.vjp(top, z, z_moments, params)
        d_z, d_z_moments, d_params_top = top_vjp(d_new)
        d_z = d_z + moments_gradient(z, z_moments, d_z_moments)
      else:
        d_z, d_params_top = d_new, None
      _, bottom_vjp = jax.vjp(bottom, inputs, norm1, params)
      d_inputs, d_norm1, d_params = bottom_vjp(d_z)
      if d_params_top is not None:
        d_params = jax.tree.map(jnp.add, d_params, d_params_top)
      d_buffer = d_buffer.at[..., :group_width].add(d_inputs)
      d_moments = Moments(*(d.at[..., :group_width].add(dn) for d, dn in zip(d_moments, d_norm1)))
      return (d_buffer, d_moments), d_params

    rows = (jnp.arange(group.start, group.stop), params, masks, z, z_moments)
    (d_buffer, d_moments), d_params = jax.lax.scan(body, (d_buffer, d_moments), rows, reverse=True)
    d_group_params.append(d_params)

  c0 = spec.input_channels
  x_moments, d_x_moments = (Moments(*(_prefix(m, c0) for m in ms)) for ms in (block_moments, d_moments))
  d_x = _prefix(d_buffer, c0) + moments_gradient(x, x_moments, d_x_moments)
  return d_x.astype(x.dtype), d_group_params[::-1], [None] * len(group_masks)  # keys: no gradient


_train.defvjp(_train_forward, _train_backward)


# ----------------------------------------------------------------------------------------------
# Entry points for DenseBlock.


def _group_keys(spec: BlockSpec, layer_keys: Sequence[Array | None]) -> list[Any]:
  """Per group, its layers' dropout keys stacked (None without dropout)."""
  if layer_keys[0] is None:
    return [None] * len(spec.groups())
  return [jnp.stack(layer_keys[group.start:group.stop]) for group in spec.groups()]


def train(spec: BlockSpec, x: Array, params: Sequence[Tree], layer_keys: Sequence[Array | None]):
  """The block's output in training mode, and each layer's batch statistics (not differentiated).

  `params[i]` are the params of layer i as `DenseLayer` has them, `layer_keys[i]` its dropout key (or None). Returns (output, stats) where
  stats[i] = {'norm1': Moments, 'norm2': Moments} (norm2 only with a bottleneck), the batch mean and
  variance each BatchNorm of layer i normalized with.
  """
  x = x.astype(spec.layer.dtype)
  output, (block_moments, bottleneck_moments) = _train(
      spec, x, stack_groups(spec, params), _group_keys(spec, layer_keys)
  )
  block_moments = jax.lax.stop_gradient(block_moments)
  stats = []
  for group, group_moments in zip(spec.groups(), bottleneck_moments):
    for row, i in enumerate(group):
      width = spec.input_width(i)
      layer_stats = {'norm1': Moments(*(_prefix(m, width) for m in block_moments))}
      if group_moments is not None:
        layer_stats['norm2'] = Moments(*(jax.lax.stop_gradient(m[row]) for m in group_moments))
      stats.append(layer_stats)
  return output, stats


def evaluate(spec: BlockSpec, x: Array, params: Sequence[Tree], batch_stats: Sequence[Tree]) -> Array:
  """The block's output in evaluation mode (running statistics); differentiable by JAX as usual."""
  x = x.astype(spec.layer.dtype)
  output, _, _ = _forward(
      spec, x, stack_groups(spec, params), _group_keys(spec, [None]), stack_groups(spec, batch_stats)
  )
  return output
