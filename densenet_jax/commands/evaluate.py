"""Evaluates saved weights: densenet-evaluate (or python evaluate.py) --checkpoint=DIR [--split=test] [--ten_crop]

--checkpoint takes a training workdir (its latest checkpoint), one of its checkpoints/<step> directories, or
weights written by `densenet-convert convert` (python -m densenet_jax.weights convert). The model is the one the
weights record; the data and batch size are those of the workdir's config.json, or for converted ImageNet weights
the paper's ImageNet evaluation. --config=FILE (with --config.field=value overrides) evaluates on another setup.
Prints top-1 and top-5 accuracy and the loss.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags
from ml_collections import config_flags

from densenet_jax import cli, evaluation

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file of the dataset (default: the run\'s own).',
                                lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Workdir, checkpoint directory or converted weights.')
flags.DEFINE_string('workdir', None, 'Alias of --checkpoint for a training workdir.')
flags.DEFINE_string('split', None, 'Split to evaluate (default: config.eval_split).')
flags.DEFINE_boolean('ten_crop', False, 'ImageNet: sum the logits of 10 crops (4 corners, center, flips).')


def evaluate(argv: list[str]) -> None:
  checkpoint = FLAGS.checkpoint or FLAGS.workdir
  if not checkpoint:
    raise app.UsageError('Give --checkpoint=DIR (or --workdir=DIR).')
  cli.start(argv)
  metrics = cli.run_reporting_failures(lambda: evaluation.evaluate_checkpoint(
      checkpoint, FLAGS.config, split=FLAGS.split, ten_crop=FLAGS.ten_crop))
  print(cli.format_metrics(metrics))


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(evaluate, argv)
