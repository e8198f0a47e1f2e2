"""Parameter count, multiply-adds and the shape after every stage of a DenseNet, without compiling.

    python -m densenet_jax.summary densenet121
    python -m densenet_jax.summary densenet_bc_l100_k12 --num_classes=100

Everything is read off one abstract trace (`jax.eval_shape`), so even DenseNet-264 takes a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax import models


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str  # 'stem', 'block1', 'transition1', ..., 'classifier'
  output_shape: tuple[int, ...]  # per image: (H, W, C), or (num_classes,) for the classifier


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  num_params: int
  multiply_adds: int  # per image, convolutions and the classifier (what the paper's FLOPs count)
  input_shape: tuple[int, int, int]
  stages: tuple[Stage, ...]

  def format(self, title: str = '') -> str:
    h, w, c = self.input_shape
    lines = [
        f'{title}{": " if title else ""}{self.num_params:,} parameters, '
        f'{self.multiply_adds / 1e9:.2f} G multiply-adds per {h}x{w}x{c} image',
        f'  {"stage":<14}output',
    ]
    lines += [f'  {s.name:<14}{"x".join(map(str, s.output_shape))}' for s in self.stages]
    return '\n'.join(lines)


def default_input_shape(model: models.DenseNet) -> tuple[int, int, int]:
  size = 224 if model.stem == 'imagenet' else 32
  return (size, size, model.input_channels)


def summarize(model: models.DenseNet, input_shape: Sequence[int] | None = None) -> ModelSummary:
  """Counts parameters and multiply-adds per image and records each stage's output shape."""
  input_shape = tuple(input_shape or default_input_shape(model))
  stages: list[Stage] = []
  multiply_adds = 0

  def record(next_fun, args, kwargs, context):
    nonlocal multiply_adds
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__':
      return out
    module = context.module
    if isinstance(module, nn.Conv) and isinstance(module.parent, models.Transition):
      pass  # Counted with its Transition below.
    elif isinstance(module, nn.Conv):
      in_channels = args[0].shape[-1] // module.feature_group_count
      multiply_adds += math.prod(out.shape[1:]) * math.prod(module.kernel_size) * in_channels
    elif isinstance(module, nn.Dense):
      multiply_adds += args[0].shape[-1] * out.shape[-1]
      stages.append(Stage('classifier', tuple(out.shape[1:])))
    elif isinstance(module, models.DenseBlock):
      if not stages:  # The first block's input is the stem's output.
        stages.append(Stage('stem', tuple(args[0].shape[1:])))
      stages.append(Stage(module.name, tuple(out.shape[1:])))
    elif isinstance(module, models.Transition):
      # The usual convention (and the paper's): the 1x1 conv at the transition's input resolution.
      # The implementation pools first and does a quarter of these (docs/performance.md).
      multiply_adds += math.prod(args[0].shape[1:]) * out.shape[-1]
      stages.append(Stage(module.name, tuple(out.shape[1:])))
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
    )
  return ModelSummary(
      num_params=count_params(variables['params']),
      multiply_adds=multiply_adds,
      input_shape=input_shape,
      stages=tuple(stages),
  )


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', nargs='+', choices=sorted(models.MODELS), metavar='MODEL',
                      help=f'one or more of: {", ".join(models.MODELS)}')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='classifier outputs (default: 1000 for ImageNet models, 10 otherwise)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='input height and width (default: 224 for ImageNet models, 32 otherwise)')
  args = parser.parse_args(argv)
  for i, name in enumerate(args.model):
    if args.num_classes is None:
      model = models.MODELS[name]()  # The registry's default: 1000 or 10 classes.
    else:
      model = models.create_model(name, num_classes=args.num_classes)
    input_shape = None
    if args.image_size:
      input_shape = (args.image_size, args.image_size, model.input_channels)
    print(('\n' if i else '') + summarize(model, input_shape).format(name))


if __name__ == '__main__':
  main()
