"""The entry points' shared layer: the process environment before TF and JAX start, and clean failures."""

import os
import re
import subprocess
import sys

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
