"""Evaluates saved weights: python evaluate.py --checkpoint=DIR [--split=test] [--ten_crop]

--checkpoint takes a training workdir (its latest checkpoint), one of its checkpoints/<step> directories, or
weights written by `python -m densenet_jax.weights convert`. The model is the one the weights record; the data
and batch size are those of the workdir's config.json, or for converted ImageNet weights the paper's ImageNet
evaluation. --config=FILE (with --config.field=value overrides) evaluates on another setup. Prints top-1 and top-5
accuracy and the loss.
"""

from densenet_jax.training import stopping

stopping.install()  # First: a SIGTERM or Ctrl-C while JAX and TensorFlow load ends with one line and exit 0.

from densenet_jax import cli, platform  # noqa: E402

platform.prepare_environment()  # Before TensorFlow is imported and before JAX computes anything.

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from densenet_jax import evaluation  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file of the dataset (default: the run\'s own).',
                                lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Workdir, checkpoint directory or converted weights.')
flags.DEFINE_string('workdir', None, 'Alias of --checkpoint for a training workdir.')
flags.DEFINE_string('split', None, 'Split to evaluate (default: config.eval_split).')
flags.DEFINE_boolean('ten_crop', False, 'ImageNet: sum the logits of 10 crops (4 corners, center, flips).')


def main(argv):
  checkpoint = FLAGS.checkpoint or FLAGS.workdir
  if not checkpoint:
    raise app.UsageError('Give --checkpoint=DIR (or --workdir=DIR).')
  cli.start(argv)
  metrics = cli.run_reporting_failures(lambda: evaluation.evaluate_checkpoint(
      checkpoint, FLAGS.config, split=FLAGS.split, ten_crop=FLAGS.ten_crop))
  print(cli.format_metrics(metrics))


if __name__ == '__main__':
  cli.main(main)
