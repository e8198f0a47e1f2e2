"""The machine is read in one place, above the model: densenet_jax.platform chooses, the model takes values."""

import ast
import functools
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from densenet_jax import model as model_lib
from densenet_jax import platform
from densenet_jax.platform import cpu_family

Form = platform.Form
MODEL_PACKAGE = pathlib.Path(model_lib.__file__).parent
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_form_fields_are_the_model_attributes_the_config_sets():
  assert platform.FORM_FIELDS == model_lib.FORM_FIELDS
  assert all(hasattr(model_lib.DenseNet(), field) for field in platform.FORM_FIELDS)


def test_gpus_and_tpus_get_xla_ops_and_layers_written_out_and_cpus_what_was_measured_per_family():
  plain = Form(kernels='xla', memory_efficient=False, layers_per_scan=0, dropout_masks='jax')
  assert platform.default_form('gpu') == platform.default_form('tpu') == plain
  amd = platform.default_form('cpu', cpu_family.AMD_AVX2)
  assert amd.kernels == 'cpu' and amd.memory_efficient and amd.layers_per_scan > 0
  assert platform.default_form('cpu', cpu_family.OTHER) == Form('xla', False, 0, 'elementwise')
  assert platform.choose({}, 'cpu') == platform.default_form('cpu', cpu_family.host())


@pytest.mark.parametrize('given, backend, expected', [
    (dict(memory_efficient=False), 'cpu', (False, 0)),
    (dict(memory_efficient=True), 'gpu', (True, 0)),
    (dict(layers_per_scan=4), 'gpu', (True, 4)),
    (dict(memory_efficient=True, layers_per_scan=0), 'cpu', (True, 0)),
    (dict(memory_efficient=False, layers_per_scan=0), 'cpu', (False, 0)),
])
def test_given_form_fields_win_and_the_others_follow_them(given, backend, expected):
  form = platform.choose(given, backend, family=cpu_family.AMD_AVX2)
  assert (form.memory_efficient, form.layers_per_scan) == expected
  # memory_efficient=True alone keeps a default scan where the default is memory-efficient.
  assert platform.choose(dict(memory_efficient=True), 'cpu', family=cpu_family.AMD_AVX2).layers_per_scan == 4
  assert platform.choose(dict(kernels='xla'), 'cpu', family=cpu_family.AMD_AVX2).kernels == 'xla'


def test_a_config_is_filled_in_once_and_a_recorded_form_is_kept():
  from densenet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from densenet_jax.io import loading  # pylint: disable=import-outside-toplevel
  config = config_lib.get_config()
  filled = loading.with_form(config, 'gpu')
  assert [filled[f] for f in platform.FORM_FIELDS] == ['xla', False, 0, 'jax']
  assert config.kernels is None  # The config given is not changed.
  recorded = dict(kernels='cpu', memory_efficient=True, layers_per_scan=2, dropout_masks='elementwise')
  resumed = loading.with_form(config, 'gpu', recorded)
  assert [resumed[f] for f in platform.FORM_FIELDS] == ['cpu', True, 2, 'elementwise']
  config.layers_per_scan = 0  # What the config sets wins over the record.
  assert loading.with_form(config, 'gpu', recorded).layers_per_scan == 0


def test_no_module_of_the_model_reads_the_machine():
  for path in sorted(MODEL_PACKAGE.glob('*.py')):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {f'{node.module}.{alias.name}' for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
    assert not any(name == 'os' or 'platform' in name or 'cpu_family' in name or 'xla_flags' in name
                   for name in imported), (path.name, imported)
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert not names & {'default_backend', 'get_backend', 'environ', 'getenv'}, (path.name, names)


@pytest.mark.parametrize('name', sorted(model_lib.MODELS))
def test_every_model_traces_without_asking_for_the_backend(name, monkeypatch):
  def no_backend(*args, **kwargs):
    raise AssertionError('the model asked which backend JAX computes on')

  monkeypatch.setattr(jax, 'default_backend', no_backend)
  monkeypatch.setattr(jax.extend.backend if hasattr(jax, 'extend') else jax, 'get_backend', no_backend,
                      raising=False)
  model = model_lib.create_model(name, num_classes=10, dropout_rate=0.2)
  size = model.min_input_size
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                      rngs={'dropout': jax.random.key(1)}), variables, images)
  assert logits.shape == (2, 10)


def test_the_model_refuses_an_open_form_with_a_clear_message():
  with pytest.raises(ValueError, match='explicit values for kernels.*platform.choose'):
    model_lib.cifar_densenet(10, 4, bottleneck=True, compression=0.5, kernels=None).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  config = ml_collections.ConfigDict({'model': 'densenet121', 'dropout_rate': 0.0, 'dtype': 'float32',
                                      **{field: None for field in platform.FORM_FIELDS}})
  with pytest.raises(ValueError, match='explicit values'):
    model_lib.from_config(config, num_classes=10, input_channels=3).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_the_environment_is_prepared_before_jax_is_imported():
  # Importing JAX sets TF_CPP_MIN_LOG_LEVEL itself, so the platform package must not import it before it has
  # set its own default.
  code = ('import os, sys; from densenet_jax import platform; before = "jax" in sys.modules; '
          'platform.prepare_environment(); print(before, os.environ["TF_CPP_MIN_LOG_LEVEL"])')
  environ = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120)
  assert result.stdout.split() == ['False', '2'], result.stdout + result.stderr


def test_installed_accelerator_compilers_are_not_started_on_a_machine_without_their_devices(tmp_path):
  from densenet_jax.platform import environment  # pylint: disable=import-outside-toplevel
  hide = functools.partial(environment.hide_absent_accelerators, dev=str(tmp_path))
  environ = {}
  assert hide(environ, libtpu_installed=True, plugins=()) and environ == {'JAX_PLATFORMS': 'cpu'}
  assert hide({}, libtpu_installed=False, plugins=('xla_cuda13',))  # the CUDA plugin, no GPU
  assert hide({}, libtpu_installed=True, plugins=('xla_cuda13',))  # both, neither device
  assert not hide({}, libtpu_installed=False, plugins=())  # nothing to hide
  assert not hide({}, libtpu_installed=True, plugins=('xla_rocm',))  # a plugin of another kind: JAX chooses
  assert not hide({'JAX_PLATFORMS': 'tpu'}, libtpu_installed=True, plugins=())  # the user's choice
  (tmp_path / 'vfio').mkdir()
  (tmp_path / 'vfio' / 'vfio').touch()
  (tmp_path / 'nvidiactl').touch()
  assert hide({}, libtpu_installed=True, plugins=('xla_cuda13',))  # /dev/vfio/vfio, /dev/nvidiactl: no device
  (tmp_path / 'nvidia0').touch()
  assert not hide({}, libtpu_installed=False, plugins=('xla_cuda13',))  # a GPU machine
  assert environment.gpu_present(str(tmp_path))
  (tmp_path / 'vfio' / '0').touch()
  assert not hide({}, libtpu_installed=True, plugins=())  # a v5p or later TPU VM
  assert environment.tpu_present(str(tmp_path))


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='libtpu is not installed')
def test_with_libtpu_installed_the_first_line_of_a_config_error_is_ours():
  environ = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  # The eval split is checked after JAX has started its backends: libtpu's own lines would come first.
  command = [sys.executable, 'train.py', '--config=configs/quickstart.py', '--workdir=/tmp/unused',
             '--config.eval_split=validation']
  result = subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.startswith('Config error'), result.stderr[-2000:]
