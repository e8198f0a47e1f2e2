"""Evaluates saved weights: python evaluate.py --config=configs/imagenet_121.py --checkpoint=DIR

--checkpoint takes a training workdir (its latest checkpoint), one of its checkpoints/<step> directories, or
weights written by `python -m densenet_jax.weights convert`. Prints top-1 and top-5 accuracy and the loss.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from densenet_jax import config_validation, parallel, reporting, xla_flags
from densenet_jax import train as training

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config file of the model and dataset.', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Workdir, checkpoint directory or converted weights.')
flags.DEFINE_string('workdir', None, 'Alias of --checkpoint for a training workdir.')
flags.DEFINE_string('split', None, 'Split to evaluate (default: config.eval_split).')
flags.DEFINE_boolean('ten_crop', False, 'ImageNet: sum the logits of 10 crops (4 corners, center, flips).')
flags.mark_flags_as_required(['config'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  checkpoint = FLAGS.checkpoint or FLAGS.workdir
  if not checkpoint:
    raise app.UsageError('Give --checkpoint=DIR (or --workdir=DIR).')
  xla_flags.set_defaults()  # Before JAX starts its backend, as train.py does.
  reporting.show_only_own_info_logs()
  parallel.maybe_initialize_distributed()
  try:
    metrics = training.evaluate_checkpoint(FLAGS.config, checkpoint, split=FLAGS.split, ten_crop=FLAGS.ten_crop)
  except (config_validation.ConfigError, FileNotFoundError) as error:
    print(f'Error: {error}', file=sys.stderr)
    sys.exit(2)
  print(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
