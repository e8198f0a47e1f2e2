"""Parameter count, multiply-adds and the shape after every stage of a DenseNet, without compiling.

    python -m densenet_jax.summary densenet121
    python -m densenet_jax.summary densenet_bc_l100_k12 --num_classes=100

Everything is read off one abstract trace (`jax.eval_shape`), so even DenseNet-264 takes a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from densenet_jax import model as model_lib


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


def default_input_shape(model: model_lib.DenseNet) -> tuple[int, int, int]:
  size = 224 if model.stem == 'imagenet' else 32
  return (size, size, model.input_channels)


def summarize(model: model_lib.DenseNet, input_shape: Sequence[int] | None = None) -> ModelSummary:
  """Counts parameters and multiply-adds per image and records each stage's output shape.

  Multiply-adds follow the paper's convention: every convolution at the resolution of its output, a transition's
  1x1 convolution at its input resolution (the model pools first and does a quarter of that), and the classifier.
  """
  input_shape = tuple(input_shape or default_input_shape(model))
  images = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  variables = model_lib.abstract_variables(model)
  params = variables['params']
  maps = jax.eval_shape(functools.partial(model.apply, features=True), variables, images)
  stages = [Stage(name, tuple(maps[name].shape[1:])) for name in model.stage_names]
  stages.append(Stage('classifier', (model.num_classes,)))

  def convolution(kernel, output_height, output_width) -> int:
    return output_height * output_width * math.prod(kernel.shape)

  stem_stride = 2 if model.stem == 'imagenet' else 1
  height, width = (math.ceil(d / stem_stride) for d in input_shape[:2])
  multiply_adds = convolution(params['stem_conv']['kernel'], height, width)
  for b in range(1, len(model.block_sizes) + 1):
    block_height, block_width = maps[f'block{b}'].shape[1:3]
    multiply_adds += sum(convolution(conv['kernel'], block_height, block_width)
                         for layer in params[f'block{b}'].values() for name, conv in layer.items()
                         if name.startswith('conv'))
    if f'transition{b}' in params:
      multiply_adds += convolution(params[f'transition{b}']['conv']['kernel'], block_height, block_width)
  multiply_adds += math.prod(params['classifier']['kernel'].shape)
  return ModelSummary(count_params(params), multiply_adds, input_shape, tuple(stages))


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('model', nargs='+', choices=sorted(model_lib.MODELS), metavar='MODEL',
                      help=f'one or more of: {", ".join(model_lib.MODELS)}')
  parser.add_argument('--num_classes', type=int, default=None,
                      help='classifier outputs (default: 1000 for ImageNet models, 10 otherwise)')
  parser.add_argument('--image_size', type=int, default=None,
                      help='input height and width (default: 224 for ImageNet models, 32 otherwise)')
  args = parser.parse_args(argv)
  for i, name in enumerate(args.model):
    if args.num_classes is None:
      model = model_lib.MODELS[name]()  # The registry's default: 1000 or 10 classes.
    else:
      model = model_lib.create_model(name, num_classes=args.num_classes)
    input_shape = None
    if args.image_size:
      input_shape = (args.image_size, args.image_size, model.input_channels)
    print(('\n' if i else '') + summarize(model, input_shape).format(name))


if __name__ == '__main__':
  main()
