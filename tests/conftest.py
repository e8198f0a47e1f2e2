"""Test-wide settings, and the local Google Cloud Storage (gcs_emulator.py) for the gs:// tests."""

import os
import uuid

import gcs_emulator

# TensorFlow reads these when it is imported; they only concern its GCS file system, which only the gs:// tests use.
os.environ.update(gcs_emulator.TIMING_ENV)

from densenet_jax import platform  # noqa: E402

# Tests run in the environment the entry points set up (XLA flags before JAX starts its backend, TF's logs).
platform.prepare_environment()

import jax  # noqa: E402
import pytest  # noqa: E402

# JAX's default generator, threefry, compiles slowly on the CPU for every shape it draws (random inputs, the
# initializers); the 'rbg' generator compiles in a fraction of that. Only the stream of random bits differs. Tests
# of threefry's own bits (dropout masks, initial values) create threefry keys explicitly.
jax.config.update('jax_default_prng_impl', 'rbg')
# The tests check what a program computes, not how fast it runs: without LLVM's optimizations the small programs
# they compile (every model form, forward and backward) compile about 3x faster. XLA's own graph passes (fusion,
# buffer assignment, hence memory figures) still run. Subprocesses (train.py and the multi-device scripts) set
# JAX_DISABLE_MOST_OPTIMIZATIONS themselves where they want the same.
jax.config.update('jax_disable_most_optimizations', True)


@pytest.fixture(scope='session')
def gcs_server():
  """One emulator per test process (per xdist worker), started at the first gs:// test."""
  emulator = gcs_emulator.GcsEmulator().start()
  yield emulator
  emulator.stop()


@pytest.fixture
def gcs_emulator_env(gcs_server, monkeypatch):
  """The emulator, with the variables that point every client at it set in os.environ for this test."""
  for name, value in gcs_server.env.items():
    monkeypatch.setenv(name, value)
  return gcs_server


@pytest.fixture
def gcs_bucket(gcs_emulator_env):
  """A new, empty bucket on the emulator: (emulator, bucket name)."""
  name = f'test-{uuid.uuid4().hex[:12]}'
  gcs_emulator_env.create_bucket(name)
  return gcs_emulator_env, name
