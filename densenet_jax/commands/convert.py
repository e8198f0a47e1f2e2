"""Pretrained weight files -> orbax checkpoints: densenet-convert {convert,inspect}.

    densenet-convert convert --source=densenet121-a639ec97.pth --model=densenet121 --output=DIR
    densenet-convert inspect --source=model.safetensors

`python -m densenet_jax.weights` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from densenet_jax import model as model_lib
from densenet_jax.io import checkpoints, cloud, storage
from densenet_jax.summary import count_params
from densenet_jax.weights import convert, readers

_EXPECTED_ERRORS = (convert.WeightMismatchError, readers.WeightFileError, FileExistsError, FileNotFoundError,
                    ImportError, ValueError, cloud.CloudStorageError)


def _architecture(model: model_lib.DenseNet) -> dict:
  return dict(block_sizes=list(model.block_sizes), growth_rate=model.growth_rate, stem=model.stem,
              stem_channels=model.stem_channels, bottleneck=model.bottleneck, compression=model.compression,
              input_channels=model.input_channels)


def run_convert(args) -> None:
  cloud.check_bucket(args.output, '--output')
  if storage.exists(args.output) and not args.overwrite:  # before the (slow) conversion
    raise FileExistsError(f'{storage.absolute(args.output)} already exists; pass --overwrite to replace it.')
  converted = readers.convert_file(args.source, args.model)
  name, model, variables, framework = converted.name, converted.model, converted.variables, converted.framework
  label = os.path.basename(args.source)
  classifier = variables['params'].get('classifier')
  num_classes = None if classifier is None else int(classifier['kernel'].shape[-1])
  metadata = dict(model=name, num_classes=num_classes, architecture=_architecture(model),
                  source=os.path.abspath(args.source), source_framework=framework)
  path = checkpoints.save_variables(args.output, variables, metadata=metadata, overwrite=args.overwrite)
  head = f'{num_classes} classes' if num_classes else 'no classifier (backbone only)'
  print(f'{label} ({framework}) -> {path}\n'
        f'  {name or "DenseNet"}: {count_params(variables["params"]):,} parameters, {head}\n'
        f'  load with densenet_jax.weights.load_variables({path!r})')


def run_inspect(args) -> None:
  framework, weights, _ = readers.read_weights(args.source)
  print(f'{args.source}: {framework} weights, {len(weights)} arrays')
  name, model = convert.infer_model(weights, framework)
  print(f'  {name or "not a registry model"}: {model_lib.describe(model)}')


def _program_name() -> str:
  """The name the usage line shows: how the command was started."""
  name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ''
  return 'python -m densenet_jax.weights' if name in ('', '__main__.py', '-c') else name


def main(argv: Sequence[str] | None = None) -> None:
  """The converter on `argv` (default: the command line's arguments); densenet_jax.launch.convert starts it."""
  parser = argparse.ArgumentParser(prog=_program_name(), description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  conv = commands.add_parser('convert', help='convert a weight file to an orbax checkpoint')
  conv.add_argument('--source', required=True,
                    help=f'weight file: {readers.SUPPORTED_FORMATS}')
  conv.add_argument('--model', choices=sorted(model_lib.MODELS), metavar='MODEL', default=None,
                    help='registry name (default: inferred from the file and checked); the number of classes '
                         'is the file\'s')
  conv.add_argument('--output', required=True, help='checkpoint directory to create')
  conv.add_argument('--overwrite', action='store_true', help='replace an existing output directory')
  conv.set_defaults(run=run_convert)
  insp = commands.add_parser('inspect', help='say which DenseNet a weight file holds')
  insp.add_argument('--source', required=True, help=f'weight file: {readers.SUPPORTED_FORMATS}')
  insp.set_defaults(run=run_inspect)
  args = parser.parse_args(argv)
  try:
    args.run(args)
  except _EXPECTED_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)
