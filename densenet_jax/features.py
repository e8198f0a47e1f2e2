"""Feature maps of every stage of a DenseNet, for transfer learning, retrieval or dense prediction.

    info = feature_info(model, (224, 224, 3))     # [FeatureInfo('stem', stride=4, channels=64, ...), ...]
    maps = extract_features(model, variables, images)
    maps['block2'].shape                          # (batch, 28, 28, 512) for DenseNet-121 at 224x224
    maps['pre_logits'].shape                      # (batch, 1024): the pooled features the classifier reads

jax, flax and numpy only. Works with backbone weights (no classifier): features=True never builds the classifier.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax import model as model_lib

PRE_LOGITS = 'pre_logits'


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """One output of extract_features: name, stride (input pixels per feature pixel; None for the pooled
  pre_logits), channels, and its shape for one image of the input shape asked about."""

  name: str
  stride: int | None
  channels: int
  shape: tuple[int, ...]


def stage_strides(model: model_lib.DenseNet) -> dict[str, int]:
  """Nominal stride of each stage: the stem's, doubled by every transition's 2x2 average pooling."""
  stride = model.stem_stride
  strides = {'stem': stride}
  for b in range(1, len(model.block_sizes) + 1):
    strides[f'block{b}'] = stride
    if b < len(model.block_sizes):
      stride *= 2
      strides[f'transition{b}'] = stride
  return strides


def feature_info(model: model_lib.DenseNet, input_shape: tuple[int, int, int]) -> list[FeatureInfo]:
  """Name, stride, channels and shape of every feature map extract_features returns, in network order, then
  'pre_logits'. Computed with jax.eval_shape: nothing is run, no weights are needed."""
  shapes = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x, features=True)[0],
      jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  strides = {**stage_strides(model), PRE_LOGITS: None}
  return [FeatureInfo(name, strides[name], shapes[name].shape[-1], tuple(shapes[name].shape[1:]))
          for name in (*model.stage_names, PRE_LOGITS)]


@functools.lru_cache(maxsize=8)
def _compiled_features(model: model_lib.DenseNet):
  return jax.jit(functools.partial(model.apply, features=True))


def extract_features(model: model_lib.DenseNet, variables: Mapping[str, Any], images: Any) -> dict[str, np.ndarray]:
  """Eval-mode feature maps of a batch of preprocessed NHWC images (as the model's eval input).

  Returns {'stem', 'block1', 'transition1', ..., 'blockB', 'pre_logits'} as numpy: each stage (batch, height,
  width, channels), 'pre_logits' (batch, channels) after the final BatchNorm-ReLU and global average pooling, so
  that pre_logits @ classifier kernel + bias are the logits. `variables` may lack the classifier.
  """
  maps = _compiled_features(model)(dict(variables), jnp.asarray(images, jnp.float32))
  return {name: np.asarray(value) for name, value in maps.items()}
