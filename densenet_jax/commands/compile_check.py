"""densenet-compile-check (or python -m densenet_jax.compile_check) --config=configs/imagenet_161.py
(--topology=v5p:4x4x4 | --gpu=rtx4090) [--config.batch_size=N] [--max_batch]

Compiles the config's train and eval steps for a TPU slice or NVIDIA GPUs on this machine (no accelerator needed;
its compiler is: requirements-tpu.txt, requirements-gpu.txt) and prints per chip or GPU: memory against the device's,
FLOPs, bytes, a roofline, the kernels and the collectives. --max_batch instead searches, per block form, for the
largest batch that fits. Exit code 1 when a step does not fit, 2 for a config error. docs/tpu.md and docs/gpu.md
explain the numbers.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from absl import flags
from ml_collections import config_flags

from densenet_jax import cli
from densenet_jax.compile_check import check, search, specs, targets

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/imagenet_121.py.', lock_config=True)
flags.DEFINE_string('topology', None, "A TPU slice as libtpu names it: 'v5p:4x4x4', 'v5e:2x2', 'v4:2x2x2', ...")
flags.DEFINE_string('gpu', None, f"NVIDIA GPUs: NAME, NAME:GPUS or NAME:HOSTSxGPUS ('h100', 'h100:8', 'h100:2x8'); "
                    f"NAME is one of {', '.join(g.name for g in specs.GPUS)}.")
flags.DEFINE_integer('num_slices', 1, 'Slices of --topology joined over the data-center network (multislice).')
flags.DEFINE_list('chips_per_host_bounds', None, "Chips per host, e.g. '2,2,2' (libtpu's default: 2,2,1).")
flags.DEFINE_list('steps', ['train', 'eval'], 'Steps to compile: train, eval or both.')
flags.DEFINE_bool('max_batch', False, 'Search for the largest batch per device whose train step fits, per block '
                  'form (mostly 3 or 4 compiles each, from the config\'s batch).')
flags.DEFINE_list('forms', list(search.FORMS), f'Block forms for --max_batch: {", ".join(search.FORMS)}.')
flags.DEFINE_integer('batch_resolution', 8, '--max_batch finds the largest multiple of this per device.', lower_bound=1)
flags.DEFINE_string('json', None, 'Also write the whole report to this JSON file.')
flags.mark_flags_as_required(['config'])


def target() -> targets.Target:
  if (FLAGS.topology is None) == (FLAGS.gpu is None):
    raise SystemExit('Error: give one of --topology (a TPU slice) or --gpu (NVIDIA GPUs).')
  try:
    if FLAGS.gpu:
      return targets.gpus(FLAGS.gpu)
    bounds = tuple(int(b) for b in FLAGS.chips_per_host_bounds) if FLAGS.chips_per_host_bounds else None
    return targets.tpu(FLAGS.topology, num_slices=FLAGS.num_slices, chips_per_host_bounds=bounds)
  except (targets.CompilerMissingError, ValueError) as error:
    print(f'Error: {error}', file=sys.stderr)
    sys.exit(2)


def write_json(report) -> None:
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(report, f, indent=1, default=list)


def max_batch(chosen: targets.Target) -> None:
  unknown = set(FLAGS.forms) - set(search.FORMS)
  if unknown:
    raise SystemExit(f'Error: unknown --forms {sorted(unknown)}; known: {", ".join(search.FORMS)}.')

  def tried(form, batch, fraction):
    verdict = ('XLA refuses it' if fraction is None else
               f'{100 * fraction:.0f}% of its memory: {"fits" if fraction <= 1 else "does not fit"}')
    print(f'  {form}: {batch} per {chosen.unit}, {verdict}', flush=True)

  found = cli.run_reporting_failures(lambda: search.search(
      FLAGS.config, chosen, FLAGS.forms, resolution=FLAGS.batch_resolution, on_try=tried))
  print(f'Largest train batch per {chosen.unit} on {chosen.name} ({chosen.spec.device_kind}), a multiple of '
        f'{FLAGS.batch_resolution}:')
  for form, result in found.items():
    run = result['run']
    if run is None:
      print(f'  {form}: none (not even {FLAGS.batch_resolution} per {chosen.unit})')
      continue
    step = run['steps']['train']
    print(f"  {form}: {result['batch_per_device']} per {chosen.unit}, peak "
          f"{step['memory']['peak_per_chip'] / check.GIB:.2f} GiB = {100 * step['memory']['fraction_of_hbm']:.0f}% "
          f"of its memory, <= {step['roofline']['images_per_second_per_chip']:,.0f} img/s by the roofline")
  write_json(found)


def compile_check(argv: list[str]) -> None:
  if len(argv) > 1:
    raise SystemExit(f'Unexpected arguments: {argv[1:]}')
  chosen = target()
  if FLAGS.max_batch:
    max_batch(chosen)
    return
  try:  # XLA refuses to compile a step that cannot fit, or the compiled step needs more than the device has
    run = cli.run_reporting_failures(lambda: check.run_check(FLAGS.config, chosen, which=tuple(FLAGS.steps)))
    print(check.format_report(run))
    write_json(run)
    check.check_fits(run)
  except check.DoesNotFitError as error:
    print(f'Does not fit: {error}', file=sys.stderr)
    sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(compile_check, argv)
