"""Trains a DenseNet: python train.py --config=configs/imagenet_121.py --workdir=DIR

Any config field can be overridden: --config.num_epochs=10 --config.dtype=bfloat16. The same command runs on one
CPU, several GPUs or every host of a TPU pod (see README.md); running it again with the same workdir resumes where
the last run stopped.
"""

from densenet_jax.training import stopping

stopping.install()  # First: a SIGTERM or Ctrl-C while JAX and TensorFlow load ends with one line and exit 0.

from densenet_jax import cli, platform  # noqa: E402

platform.prepare_environment()  # Before TensorFlow is imported and before JAX computes anything.

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from densenet_jax.training import loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and curves (local or gs://BUCKET/...).',
                    required=True)
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/quickstart.py.', lock_config=True)
flags.mark_flags_as_required(['config'])


def main(argv):
  cli.start(argv)
  final = cli.run_reporting_failures(lambda: loop.train_and_evaluate(FLAGS.config, FLAGS.workdir))
  logging.info('Final metrics: %s', final)
  print(cli.format_metrics(final))


if __name__ == '__main__':
  cli.main(main)
