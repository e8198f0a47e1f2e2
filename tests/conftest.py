"""Test-wide settings."""

from densenet_jax import cli

# Tests run in the environment the entry points set up (XLA flags before JAX starts its backend, TF's logs).
cli.prepare_environment()

import jax  # noqa: E402

# Threefry random bits take ~20 s to compile per dropout model on a 2-core CPU; the 'rbg' generator
# compiles in ~3 s. Dropout semantics are the same; only the stream of random bits differs.
jax.config.update('jax_default_prng_impl', 'rbg')
