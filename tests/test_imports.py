"""What each part of densenet_jax imports: loading weights does not start the training loop."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_inference_analysis_and_weights_import_neither_orbax_nor_the_training_loop():
  # Reading weights for a prediction or a plot needs neither: orbax loads when a checkpoint is opened.
  code = ('import sys; import densenet_jax.inference, densenet_jax.analysis, densenet_jax.weights; '
          'bad = sorted(m for m in sys.modules if m.split(".")[0] == "orbax" or m == "densenet_jax.training.loop"); '
          'print(bad); sys.exit(1 if bad else 0)')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stdout + result.stderr
