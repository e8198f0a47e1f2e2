"""Predicts the classes of image files: densenet-predict (or python predict.py) --checkpoint=DIR IMAGE_OR_FOLDER...
[--top_k=5]

--checkpoint takes a training workdir (its latest checkpoint), one of its checkpoints/<step> directories, or
weights written by `densenet-convert convert` (python -m densenet_jax.weights convert). The model, its input size,
the preprocessing (the eval pipeline's) and the class names come from what the checkpoint records. Folders are
searched recursively for .jpg/.jpeg/.png/.bmp/.gif files. Prints the top-k classes with their probabilities per
image; an unreadable file gets one line on stderr, the other files are still predicted, and the exit code is then 2.
--json=FILE also writes the results as JSON. Any of these paths may be gs://BUCKET/... (docs/cloud_storage.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app, flags

from densenet_jax import cli, data, inference
from densenet_jax.data import image_files
from densenet_jax.io import cloud

FLAGS = flags.FLAGS
flags.DEFINE_string('checkpoint', None, 'Workdir, checkpoint directory or converted weights.')
flags.DEFINE_integer('top_k', 5, 'Classes printed per image.')
flags.DEFINE_integer('batch_size', inference.DEFAULT_BATCH_SIZE, 'Images per forward pass.')
flags.DEFINE_string('json', None, 'Also write the predictions (and errors) to this JSON file.')


def predict_paths(paths: list[str]) -> None:
  for what, path in (('--checkpoint', FLAGS.checkpoint), ('--json', FLAGS.json), *(('image', p) for p in paths)):
    if path:
      cloud.check_bucket(path, what)
  predictor = inference.load_predictor(FLAGS.checkpoint)
  predictions, errors = inference.predict_files(
      predictor, paths, top_k_classes=FLAGS.top_k, batch_size=FLAGS.batch_size,
      on_error=lambda line: print(f'Cannot read {line}', file=sys.stderr, flush=True))
  for prediction in predictions:
    print(inference.format_prediction(prediction))
  if FLAGS.json:
    inference.write_json(FLAGS.json, predictor, predictions, errors)
  if errors:
    raise data.BadImageError(f'{len(errors)} of {len(errors) + len(predictions)} image files could not be read '
                             '(listed above); the others were predicted.')
  if not predictions:
    raise FileNotFoundError(f'No image files ({", ".join(image_files.IMAGE_EXTENSIONS)}) in {paths}.')


def predict(argv: list[str]) -> None:
  if not FLAGS.checkpoint:
    raise app.UsageError('Give --checkpoint=DIR.')
  if len(argv) < 2:
    raise app.UsageError('Give one or more image files or folders.')
  if FLAGS.top_k < 1:
    raise app.UsageError('--top_k must be at least 1.')
  cli.start(argv, positional=True)
  cli.run_reporting_failures(lambda: predict_paths(argv[1:]))


def main(argv: Sequence[str] | None = None) -> None:
  cli.main(predict, argv)
