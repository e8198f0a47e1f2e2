"""densenet-tpu-compile (or python -m densenet_jax.tpu_compile) --config=configs/imagenet_121.py
--topology=v5p:4x4x4 [--config.batch_size=N]

Compiles the config's train and eval steps for the TPU topology on this machine (no TPU needed, libtpu is:
pip install -r requirements-tpu.txt) and prints per-chip memory, FLOPs, bytes, a roofline and the collectives.
Exit code 1 when a step does not fit the chips' HBM, 2 for a config error. docs/tpu.md explains the numbers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from densenet_jax import cli
from densenet_jax.tpu_compile import check

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/imagenet_121.py.', lock_config=True)
flags.DEFINE_string('topology', None, "libtpu topology: 'v5p:4x4x4', 'v5e:2x2', 'v4:2x2x2', 'v6e:4x4', ...")
flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over the data-center network (multislice).')
flags.DEFINE_list('chips_per_host_bounds', None, "Chips per host, e.g. '2,2,2' (libtpu's default: 2,2,1).")
flags.DEFINE_list('steps', ['train', 'eval'], 'Steps to compile: train, eval or both.')
flags.DEFINE_string('json', None, 'Also write the whole report to this JSON file.')
flags.mark_flags_as_required(['config', 'topology'])


def compile_check(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'Unexpected arguments: {argv[1:]}')
  if not check.libtpu_available():
    print(f'Error: {check.LibtpuMissingError.__doc__.strip()} pip install -r requirements-tpu.txt', file=sys.stderr)
    sys.exit(2)
  bounds = tuple(int(b) for b in FLAGS.chips_per_host_bounds) if FLAGS.chips_per_host_bounds else None
  try:
    run = cli.run_reporting_failures(lambda: check.run_check(
        FLAGS.config, FLAGS.topology, which=tuple(FLAGS.steps), num_slices=FLAGS.num_slices,
        chips_per_host_bounds=bounds))
  except check.DoesNotFitError as error:  # XLA refused to compile it
    print(f'Does not fit: {error}', file=sys.stderr)
    sys.exit(1)
  print(check.format_report(run))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(run, f, indent=1, default=list)
  try:
    check.check_fits(run)
  except check.DoesNotFitError as error:
    print(f'Does not fit: {error}', file=sys.stderr)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(compile_check, argv)
