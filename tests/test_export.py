"""Exports reloaded in a fresh process without this project's code give the JAX logits."""

import json
import os

import jax
import numpy as np
import pytest

from densenet_jax import export as export_lib
from densenet_jax import inference
from densenet_jax import model as model_lib
from densenet_jax.data import image_files, pipeline

TOLERANCE = 1e-5  # float32 logits, largest absolute difference


@pytest.fixture(scope='module')
def tiny():
  """A CIFAR-10 DenseNet-BC (L=10, k=4) with non-trivial running statistics, and its eval input."""
  model = model_lib.cifar_densenet(10, 4, bottleneck=True, compression=0.5, num_classes=10)
  spec = image_files.ImageSpec('cifar10', (32, 32, 3), *pipeline.image_file_normalization('cifar10'))
  images = export_lib.reference_inputs(spec, False, count=8, seed=1)
  variables = model_lib.init_variables(model, jax.random.key(0), images)
  _, updates = model.apply(variables, images * 1.5 + 0.3, train=True, mutable=['batch_stats'])
  return model, {**variables, **updates}, spec


def test_stablehlo_and_saved_model_reload_in_fresh_processes(tiny, tmp_path):
  model, variables, spec = tiny
  metadata = export_lib.export(model, variables, str(tmp_path), spec=spec, class_names=inference.CIFAR10_NAMES)
  inputs = export_lib.reference_inputs(spec, False, count=5)
  expected = np.asarray(jax.jit(model.apply)(variables, inputs))
  diffs = export_lib.verify_in_fresh_process(str(tmp_path), inputs, expected, export_lib.FORMATS)
  print('fresh-process max |logit diff|:', diffs)
  assert set(diffs) == {'stablehlo', 'saved_model'}
  for per_batch in diffs.values():
    assert set(per_batch) == {'5', '1'}  # batch-polymorphic: 5 images and 1 image
    assert max(per_batch.values()) <= TOLERANCE, diffs
  with open(tmp_path / export_lib.METADATA_FILE) as f:
    assert json.load(f) == metadata
  assert metadata['input_shape'] == ['batch', 32, 32, 3] and metadata['input_dtype'] == 'float32'
  assert metadata['class_names'][0] == 'airplane' and not metadata['preprocessing']['included']
  assert os.path.isfile(tmp_path / 'model.stablehlo') and os.path.isfile(tmp_path / 'saved_model/saved_model.pb')


def test_exported_preprocessing_takes_uint8_images(tiny, tmp_path):
  model, variables, spec = tiny
  metadata = export_lib.export(model, variables, str(tmp_path), spec=spec, class_names=inference.CIFAR10_NAMES,
                               formats=('stablehlo',), with_preprocessing=True)
  assert metadata['input_dtype'] == 'uint8' and metadata['preprocessing']['included']
  pixels = export_lib.reference_inputs(spec, True, count=4)
  expected = np.asarray(jax.jit(model.apply)(variables, export_lib.reference_inputs(spec, False, count=4)))
  diffs = export_lib.verify_in_fresh_process(str(tmp_path), pixels, expected, ('stablehlo',))
  assert max(diffs['stablehlo'].values()) <= TOLERANCE, diffs


def test_unknown_format_is_refused(tiny, tmp_path):
  model, variables, spec = tiny
  with pytest.raises(ValueError, match='Unknown export formats'):
    export_lib.export(model, variables, str(tmp_path), spec=spec, class_names=(), formats=('onnx',))
