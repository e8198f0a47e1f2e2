"""The entry points' shared layer: the process environment before TF and JAX start, and clean failures."""

import os
import re
import subprocess
import sys

import pytest

from densenet_jax import cli, platform
from densenet_jax.platform import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What TensorFlow's and absl's C++ logging print (e.g. "I0000 00:00:... cpu_feature_guard.cc:...] ...").
CPP_LOG_LINE = re.compile(r'^[IWEF]\d{4} |absl::InitializeLog|oneDNN custom operations|cpu_feature_guard', re.M)


def test_prepare_environment_quiets_tensorflow_and_sets_the_xla_flags_unless_the_user_did():
  environ = {}
  platform.prepare_environment(environ)
  assert environ['TF_CPP_MIN_LOG_LEVEL'] == '2'
  assert environ['TF_ENABLE_ONEDNN_OPTS'] == '0'
  assert xla_flags.KEEP_REMAT_ON_CPU in environ['XLA_FLAGS']
  mine = {'TF_CPP_MIN_LOG_LEVEL': '0', 'TF_ENABLE_ONEDNN_OPTS': '1', 'XLA_FLAGS': '--xla_disable_hlo_passes=foo'}
  platform.prepare_environment(mine)
  assert mine['TF_CPP_MIN_LOG_LEVEL'] == '0'
  assert mine['TF_ENABLE_ONEDNN_OPTS'] == '1'
  assert mine['XLA_FLAGS'].startswith('--xla_disable_hlo_passes=foo')
  for accelerator in ('cuda', 'tpu'):  # XLA:GPU and XLA:TPU refuse memory_efficient's programs with these flags
    environ = {'JAX_PLATFORMS': accelerator}
    platform.prepare_environment(environ)
    assert 'XLA_FLAGS' not in environ


def test_a_config_error_is_one_paragraph_without_tensorflow_log_lines(tmp_path):
  # TensorFlow is imported (the input pipeline) before the config is checked against the data. On CPUs where
  # TensorFlow turns its oneDNN operations on by default, it announces them unless train.py turns them off.
  quieting = ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'XLA_FLAGS')
  env = {k: v for k, v in os.environ.items() if k not in quieting}
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/quickstart.py', '--config.eval_split=validation',
       f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Config error: config.eval_split' in result.stderr
  assert not CPP_LOG_LINE.search(result.stderr + result.stdout), result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


# Each command and how it names its own flags: (console script, launcher function, a flag of the command).
COMMANDS = [('densenet-train', 'train', '--workdir'), ('densenet-evaluate', 'evaluate', '--ten_crop'),
            ('densenet-predict', 'predict', '--top_k'), ('densenet-export', 'export', '--with_preprocessing'),
            ('densenet-compile-check', 'compile_check', '--topology'), ('densenet-convert', 'convert', 'inspect')]
# The files that start a program (besides densenet_jax/commands/).
ENTRY_FILES = ['train.py', 'evaluate.py', 'predict.py', 'densenet_jax/launch.py', 'densenet_jax/export/__main__.py',
               'densenet_jax/compile_check/__main__.py', 'densenet_jax/weights/__main__.py', 'densenet_jax/summary.py']


def _console_script(name: str, function: str) -> list[str]:
  """What pip's generated wrapper of a [project.scripts] entry runs, without installing the package."""
  program = (f'import sys; sys.argv[0] = {name!r}; from densenet_jax.launch import {function}; '
             f'sys.exit({function}())')
  return [sys.executable, '-c', program]


def test_the_console_scripts_are_the_launcher_functions():
  import tomllib

  from densenet_jax import launch

  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    scripts = tomllib.load(f)['project']['scripts']
  assert scripts == {name: f'densenet_jax.launch:{function}' for name, function, _ in COMMANDS}
  assert all(callable(getattr(launch, function)) for _, function, _ in COMMANDS)


def test_the_launcher_runs_each_set_up_step_before_it_imports_the_command(tmp_path, monkeypatch):
  (tmp_path / 'probe_setup.py').write_text('import os\n\ndef step():\n  os.environ["PROBE"] = "set up"\n')
  (tmp_path / 'probe_command.py').write_text(
      'import os\n\nSEEN_AT_IMPORT = os.environ.get("PROBE")\n\ndef main(value):\n  return SEEN_AT_IMPORT, value\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delenv('PROBE', raising=False)
  from densenet_jax import launch

  assert launch.run('probe_command:main', ('probe_setup:step',), 5) == ('set up', 5)


def test_every_command_starts_through_the_launcher_and_shows_its_own_flags():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}

  def start(name, function):
    help_flag = '--help' if name == 'densenet-convert' else '--helpshort'
    return subprocess.Popen([*_console_script(name, function), help_flag], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)

  # All at once: each spends its few seconds importing JAX (and TensorFlow), then prints its help.
  processes = [start(name, function) for name, function, _ in COMMANDS]
  for (name, _, flag), process in zip(COMMANDS, processes):
    stdout, stderr = process.communicate(timeout=300)
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert flag in stdout, (name, stdout, stderr[-3000:])
    if name == 'densenet-convert':  # argparse
      assert stdout.startswith('usage: densenet-convert'), stdout
    else:  # absl: the command's docstring, then its flags under the program's name
      assert name in stdout.split('\n\n')[0] and f'\n{name}:\n' in stdout, stdout


def test_the_thin_scripts_load_nothing_before_the_launcher_runs():
  # Importing train.py (not running it) or the launcher must not load JAX, TensorFlow or absl: their settings
  # (XLA_FLAGS, TF's log variables, JAX_PLATFORMS for the compile check) come first, in densenet_jax.launch.run.
  program = ('import sys, train, evaluate, predict, densenet_jax.launch; '
             'print(sorted({m.split(".")[0] for m in sys.modules} & {"jax", "tensorflow", "absl", "numpy"}))')
  done = subprocess.run([sys.executable, '-c', program], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == '[]', done.stdout


def test_no_entry_point_needs_imports_after_code():
  for path in ENTRY_FILES + sorted(f'densenet_jax/commands/{name}' for name in
                                   os.listdir(os.path.join(ROOT, 'densenet_jax', 'commands'))
                                   if name.endswith('.py')):
    with open(os.path.join(ROOT, path)) as f:
      assert 'noqa: E402' not in f.read(), path


def test_a_config_file_imports_its_neighbours_whatever_started_the_command(tmp_path, monkeypatch):
  # configs/cifar10.py imports configs/cifar10_plus.py as `configs.cifar10_plus`. python train.py finds it through
  # the script's folder; an installed console script, started anywhere, through the config's own folder.
  folder = tmp_path / 'my_configs'
  folder.mkdir()
  (folder / '__init__.py').write_text('')
  (folder / 'base.py').write_text('from configs import quickstart\nget_config = quickstart.get_config\n')
  (folder / 'child.py').write_text('from my_configs import base\n\ndef get_config():\n  return base.get_config()\n')
  monkeypatch.setattr(sys, 'path', list(sys.path))
  cli.config_folder_on_path(['prog', '--workdir=/tmp/w', '--config', f'{folder / "child.py"}:argument'])
  assert sys.path[0] == str(tmp_path)
  cli.config_folder_on_path(['prog', f'--config={ROOT}/train.py'])  # not in a package: nothing added
  assert sys.path[0] == str(tmp_path) and sys.path.count(str(tmp_path)) == 1

  done = subprocess.run([*_console_script('densenet-train', 'train'), f'--config={folder / "child.py"}',
                         '--config.num_epochs=3', '--helpshort'], cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)
  assert 'densenet-train:' in done.stdout, done.stderr[-3000:]  # the help, after the config loaded


def test_convert_inspect_names_the_densenet_a_file_holds(tmp_path, capsys):
  safetensors_numpy = pytest.importorskip('safetensors.numpy')
  from densenet_jax import model as model_lib
  from densenet_jax import weights
  from densenet_jax.commands import convert
  from tests.test_weights import random_variables

  model = model_lib.cifar_densenet(16, 4, bottleneck=True, compression=0.5, num_classes=7)
  source = tmp_path / 'model.safetensors'
  safetensors_numpy.save_file(weights.to_torch_state_dict(random_variables(model)), str(source))
  convert.main(['inspect', f'--source={source}'])
  printed = capsys.readouterr().out.splitlines()
  assert printed == [f'{source}: torch weights, 77 arrays', f'  not a registry model: {model_lib.describe(model)}']


def test_a_field_can_be_set_to_none_on_the_command_line(tmp_path):
  # ml_collections parses an override with the field's type, which 'None' is not.
  assert cli.without_none_overrides(['x', '--config.image_size=None', '--config.dtype=float32']) == (
      ['x', '--config.dtype=float32'], ['image_size'])
  command = [sys.executable, 'train.py', '--config=configs/imagenet_121.py', f'--workdir={tmp_path}',
             '--config.batch_size=96', f'--config.data_dir={tmp_path}']  # 96 is no multiple of its groups of 64
  refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert refused.returncode == 2 and 'batch_norm_group_size=64' in refused.stderr, refused.stderr[-3000:]
  unset = subprocess.run(command + ['--config.batch_norm_group_size=None'], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
  # Whole-batch statistics pass that check; the run then stops at the next problem: no ImageNet in data_dir.
  assert unset.returncode == 2 and 'batch_norm_group_size' not in unset.stderr, unset.stderr[-3000:]
