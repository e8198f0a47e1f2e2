"""densenet-export (or python -m densenet_jax.export) --checkpoint=PATH --output=DIR
[--format=stablehlo,saved_model] [--with_preprocessing] [--platforms=cpu]

Exports the inference function of a workdir, one of its checkpoints or converted weights (see
densenet_jax/export/__init__.py for what is written), then reloads every format in a fresh process without this
project's code and checks its logits against JAX's on random images (--verify, on by default; float32: largest
absolute difference <= --tolerance).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import flags

from densenet_jax import cli, export as export_lib
from densenet_jax import inference

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Workdir, checkpoint directory or converted weights.', required=True)
flags.DEFINE_string('output', None, 'Folder to write the exports to.', required=True)
flags.DEFINE_list('format', list(export_lib.FORMATS), 'Formats: stablehlo (jax.export), saved_model (TensorFlow).')
flags.DEFINE_boolean('with_preprocessing', False, 'The exported function takes uint8 images of the input size and '
                     'normalizes them.')
flags.DEFINE_list('platforms', ['cpu'], 'Platforms the StableHLO is lowered for: cpu, cuda, rocm, tpu.')
flags.DEFINE_boolean('verify', True, 'Reload each export in a fresh process and compare its logits with JAX\'s.')
flags.DEFINE_float('tolerance', 1e-5, 'Largest absolute logit difference --verify accepts.')


def export_and_verify() -> dict:
  predictor = inference.load_predictor(FLAGS.checkpoint)
  metadata = export_lib.export(
      predictor.model, predictor.variables, FLAGS.output, spec=predictor.spec, class_names=predictor.class_names,
      formats=FLAGS.format, with_preprocessing=FLAGS.with_preprocessing, platforms=FLAGS.platforms)
  print(f'Wrote {", ".join(metadata["files"].values())} and {export_lib.METADATA_FILE} to {FLAGS.output}')
  if FLAGS.verify and jax.default_backend() in FLAGS.platforms:
    inputs = export_lib.reference_inputs(predictor.spec, FLAGS.with_preprocessing)
    normalized = export_lib.reference_inputs(predictor.spec, False)
    diffs = export_lib.verify_in_fresh_process(FLAGS.output, inputs, predictor.logits(normalized), FLAGS.format)
    print(f'Reloaded in a fresh process, largest |logit difference| per batch size: {json.dumps(diffs)}')
    worst = max(max(d.values()) for d in diffs.values())
    if not np.isfinite(worst) or worst > FLAGS.tolerance:
      print(f'Error: the exports differ from JAX by {worst:.3g} > --tolerance={FLAGS.tolerance:g}.', file=sys.stderr)
      sys.exit(1)
  return metadata


def export(argv: list[str]) -> None:
  cli.start(argv)
  cli.run_reporting_failures(export_and_verify)


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(export, argv)
