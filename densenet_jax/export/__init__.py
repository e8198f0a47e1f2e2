"""Exporting a trained DenseNet's inference function for serving, without this project's code.

    metadata = export(model, variables, 'out/', spec=spec, class_names=names, formats=('stablehlo', 'saved_model'))

Writes to the output folder:
  model.stablehlo   jax.export's serialized module: (batch, H, W, C) images -> float32 logits (batch, classes),
                    the batch size symbolic, the weights embedded. Load with jax alone:
                    jax.export.deserialize(bytearray(open(path, 'rb').read())).call(images)
  saved_model/      a TensorFlow SavedModel (jax2tf, the weights as tf.Variables): signature 'serving_default',
                    input 'images' [None, H, W, C], output 'logits'. Load with TensorFlow alone.
  metadata.json     input shape and dtype, class names, the preprocessing (included or to do), the formats.

With `with_preprocessing` the function takes uint8 images (batch, H, W, C) already resized/cropped to the model's
input size, and normalizes them itself; otherwise it takes the normalized float32 images the model sees.
verify_in_fresh_process() reloads each format in a new Python process that cannot import this project.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax import model as model_lib
from densenet_jax.data.image_files import ImageSpec

FORMATS = ('stablehlo', 'saved_model')
STABLEHLO_FILE = 'model.stablehlo'
SAVED_MODEL_DIR = 'saved_model'
METADATA_FILE = 'metadata.json'


def inference_function(model: model_lib.DenseNet, variables: Any, spec: ImageSpec, with_preprocessing: bool):
  """images -> float32 logits, with the weights closed over; with_preprocessing: uint8 images, normalized here."""
  mean, inverse_std = np.asarray(spec.mean, np.float32), 1.0 / np.asarray(spec.std, np.float32)

  def logits(images):
    if with_preprocessing:
      images = (images.astype(jnp.float32) - mean) * inverse_std  # pipeline's normalize(): the same arithmetic
    return model.apply(variables, images)

  return logits


def _input_dtype(with_preprocessing: bool):
  return np.uint8 if with_preprocessing else np.float32


def export_stablehlo(fn, spec: ImageSpec, dtype, platforms: Sequence[str]) -> bytes:
  shape = jax.export.symbolic_shape('b, {}, {}, {}'.format(*spec.image_shape))
  exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(jax.ShapeDtypeStruct(shape, dtype))
  return exported.serialize()


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(part) for part in text.split('.'))


@contextlib.contextmanager
def stablehlo_version_for_tensorflow():
  """Serializes StableHLO in a version this TensorFlow's XlaCallModule reads.

  jax serializes for its 4-week compatibility target (StableHLO 1.18 in jax 0.12); TensorFlow 2.21 reads at most
  1.13.7, and a batch-polymorphic module holds a shape assertion that 1.18 writes in a form 1.13.7 rejects
  ("failed to deserialize portable artifact"). The target becomes min(jax's, TensorFlow's). This replaces a
  private jax function (jax._src.export._export._module_to_bytecode) while the context is open; the test of the
  SavedModel export fails if a jax upgrade moves it.
  """
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  from jax._src.export import _export  # pylint: disable=import-outside-toplevel
  from jax._src.lib import _jax  # pylint: disable=import-outside-toplevel
  from jax._src.lib.mlir.dialects import hlo  # pylint: disable=import-outside-toplevel
  from tensorflow.compiler.mlir.stablehlo import stablehlo as tf_stablehlo  # pylint: disable=import-outside-toplevel

  jax_target = hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.WEEK_4)
  target = min(jax_target, tf_stablehlo.get_current_version(), key=_version)
  original = _export._module_to_bytecode

  def module_to_bytecode(module):
    return _jax.mlir.serialize_portable_artifact(module, target, xla_bridge.get_backend().serialize_with_sdy)

  _export._module_to_bytecode = module_to_bytecode
  try:
    yield target
  finally:
    _export._module_to_bytecode = original


def export_saved_model(model, variables, spec: ImageSpec, with_preprocessing: bool, platforms: Sequence[str],
                       path: str) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel

  leaves, treedef = jax.tree.flatten(variables)

  def fn(weights, images):
    return inference_function(model, jax.tree.unflatten(treedef, weights), spec, with_preprocessing)(images)

  converted = jax2tf.convert(fn, polymorphic_shapes=[None, '(b, {}, {}, {})'.format(*spec.image_shape)],
                             with_gradient=False, native_serialization_platforms=tuple(platforms))
  dtype = tf.uint8 if with_preprocessing else tf.float32

  class Serving(tf.Module):

    def __init__(self):
      super().__init__(name='densenet')
      # A plain list: tf.Module would wrap a dict of variables in its own tracking type.
      self.weights = [tf.Variable(np.asarray(leaf), trainable=False, name=f'w{i:04d}') for i, leaf in enumerate(leaves)]

    @tf.function(input_signature=[tf.TensorSpec([None, *spec.image_shape], dtype, name='images')], autograph=False)
    def __call__(self, images):
      return {'logits': converted(self.weights, images)}

  with stablehlo_version_for_tensorflow():
    module = Serving()
    tf.saved_model.save(module, path, signatures={'serving_default': module.__call__})


def export(model: model_lib.DenseNet, variables: Any, output: str, *, spec: ImageSpec, class_names: Sequence[str],
           formats: Sequence[str] = FORMATS, with_preprocessing: bool = False,
           platforms: Sequence[str] = ('cpu',)) -> dict[str, Any]:
  """Writes the formats and metadata.json to `output`; returns the metadata."""
  unknown = set(formats) - set(FORMATS)
  if unknown or not formats:
    raise ValueError(f'Unknown export formats {sorted(unknown)}; choose among {", ".join(FORMATS)}.')
  # The portable form: XLA's own operations, every layer written out (the same function as any other form).
  model = model.clone(kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax',
                      dtype=jnp.float32)
  variables = jax.tree.map(jnp.asarray, {k: v for k, v in variables.items() if k in ('params', 'batch_stats')})
  os.makedirs(output, exist_ok=True)
  dtype = _input_dtype(with_preprocessing)
  files = {}
  if 'stablehlo' in formats:
    data = export_stablehlo(inference_function(model, variables, spec, with_preprocessing), spec, dtype, platforms)
    with open(os.path.join(output, STABLEHLO_FILE), 'wb') as f:
      f.write(data)
    files['stablehlo'] = STABLEHLO_FILE
  if 'saved_model' in formats:
    export_saved_model(model, variables, spec, with_preprocessing, platforms, os.path.join(output, SAVED_MODEL_DIR))
    files['saved_model'] = SAVED_MODEL_DIR
  metadata = {
      'input_shape': ['batch', *spec.image_shape],
      'input_dtype': np.dtype(dtype).name,
      'output': 'logits (batch, num_classes), float32; softmax gives the probabilities',
      'num_classes': model.num_classes,
      'class_names': list(class_names),
      'preprocessing': {
          'included': with_preprocessing,
          'dataset': spec.dataset,
          'resize': spec.resize,
          'normalize': 'x = (pixel - mean) / std per channel, pixels on the 0-255 scale',
          'mean': list(spec.mean),
          'std': list(spec.std),
      },
      'files': files,
      'platforms': list(platforms),
      'jax_version': jax.__version__,
  }
  with open(os.path.join(output, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=2)
  return metadata


# Run with `python -I -c`: no PYTHONPATH, no current directory on sys.path, so only the installed jax or
# tensorflow can load the artifact. Prints {batch size: max abs difference} as JSON.
_CHECK_PRELUDE = '''
import json, sys
import numpy as np
folder, inputs, expected, blocked = sys.argv[1:5]

class Blocker:  # even where this project is installed: only the artifact may be loaded
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in blocked.split(','):
      raise ImportError(name + ' is blocked in this check')

sys.meta_path.insert(0, Blocker())
x, want = np.load(inputs), np.load(expected)
'''
_CHECK_STABLEHLO = _CHECK_PRELUDE + '''
import jax
with open(folder + '/model.stablehlo', 'rb') as f:
  exported = jax.export.deserialize(bytearray(f.read()))
diffs = {n: float(np.abs(np.asarray(exported.call(x[:n])) - want[:n]).max()) for n in (len(x), 1)}
assert not {'tensorflow', 'flax', 'densenet_jax'} & set(sys.modules), sorted(sys.modules)
print(json.dumps(diffs))
'''
_CHECK_SAVED_MODEL = _CHECK_PRELUDE + '''
import tensorflow as tf
serve = tf.saved_model.load(folder + '/saved_model').signatures['serving_default']
diffs = {n: float(np.abs(serve(images=tf.constant(x[:n]))['logits'].numpy() - want[:n]).max()) for n in (len(x), 1)}
assert not {'jax', 'flax', 'densenet_jax'} & set(sys.modules), sorted(sys.modules)
print(json.dumps(diffs))
'''
_CHECKS = {'stablehlo': (_CHECK_STABLEHLO, 'densenet_jax,flax,tensorflow'),
           'saved_model': (_CHECK_SAVED_MODEL, 'densenet_jax,flax,jax')}


def reference_inputs(spec: ImageSpec, with_preprocessing: bool, count: int = 3, seed: int = 0) -> np.ndarray:
  """Random images of the exported input type: uint8 pixels, or their normalized float32 form."""
  pixels = np.random.default_rng(seed).integers(0, 256, (count, *spec.image_shape), dtype=np.uint8)
  if with_preprocessing:
    return pixels
  return ((pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)).astype(np.float32)


def verify_in_fresh_process(output: str, inputs: np.ndarray, expected: np.ndarray,
                            formats: Sequence[str]) -> dict[str, dict[str, float]]:
  """Reloads each format in a new `python -I` process where this project, flax and TensorFlow (StableHLO) or jax
  (SavedModel) cannot be imported; per format the largest
  absolute difference from `expected` for the whole batch and for one image."""
  results = {}
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  with tempfile.TemporaryDirectory() as scratch:
    np.save(os.path.join(scratch, 'inputs.npy'), inputs)
    np.save(os.path.join(scratch, 'expected.npy'), np.asarray(expected, np.float32))
    for fmt in formats:
      script, blocked = _CHECKS[fmt]
      run = subprocess.run(
          [sys.executable, '-I', '-c', script, os.path.abspath(output), os.path.join(scratch, 'inputs.npy'),
           os.path.join(scratch, 'expected.npy'), blocked], capture_output=True, text=True, env=env, cwd=scratch)
      if run.returncode:
        raise RuntimeError(f'Reloading the {fmt} export in a fresh process failed:\n{run.stderr[-3000:]}')
      results[fmt] = json.loads(run.stdout.strip().splitlines()[-1])
  return results
