"""Trains a DenseNet: densenet-train (or python train.py) --config=configs/imagenet_121.py --workdir=DIR

Any config field can be overridden: --config.num_epochs=10 --config.dtype=bfloat16. The same command runs on one
CPU, several GPUs or every host of a TPU pod (see README.md); running it again with the same workdir resumes where
the last run stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import flags, logging
from ml_collections import config_flags

from densenet_jax import cli
from densenet_jax.training import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and curves (local or gs://BUCKET/...).',
                    required=True)
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/quickstart.py.', lock_config=True)
flags.mark_flags_as_required(['config'])


def train(argv: list[str]) -> None:
  cli.start(argv)
  final = cli.run_reporting_failures(lambda: loop.train_and_evaluate(FLAGS.config, FLAGS.workdir))
  logging.info('Final metrics: %s', final)
  print(cli.format_metrics(final))


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(train, argv)
