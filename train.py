"""Trains a DenseNet: python train.py --config=configs/imagenet_121.py --workdir=DIR

Any config field can be overridden: --config.num_epochs=10 --config.dtype=bfloat16. The same command runs on
one CPU, several GPUs or every host of a TPU pod (see README.md); running it again with the same workdir
resumes where the last run stopped.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from densenet_jax import checkpoints, config_validation, input_pipeline, parallel, reporting, xla_flags
from densenet_jax import train as training

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and curves.', required=True)
config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/quickstart.py.', lock_config=True)
flags.mark_flags_as_required(['config'])


# Failures the user can act on: one paragraph and an exit code, no traceback. 2: fix the input; 1: the run
# stopped (its complete checkpoints are kept).
FAILURES = {
    config_validation.ConfigError: ('Config error', 2),
    training.TrainingDiverged: ('Training stopped', 1),
    FileNotFoundError: ('Error', 2),  # A dataset not prepared, a missing image folder or init_from.
    input_pipeline.BadImageError: ('Data error', 2),
    checkpoints.CheckpointWriteError: ('Checkpoint error', 1),
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  xla_flags.set_defaults()  # Before JAX starts its backend: nothing has computed yet.
  reporting.show_only_own_info_logs()
  parallel.maybe_initialize_distributed()
  try:
    final = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except tuple(FAILURES) as error:
    label, exit_code = next(v for k, v in FAILURES.items() if isinstance(error, k))
    print(f'{label}: {error}', file=sys.stderr)
    sys.exit(exit_code)
  logging.info('Final metrics: %s', final)
  print(' '.join(f'{k}={v:.4f}' if isinstance(v, float) else f'{k}={v}' for k, v in final.items()))


if __name__ == '__main__':
  app.run(main, flags_parser=config_validation.parse_flags)
