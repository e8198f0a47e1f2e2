"""Test-wide settings."""

from densenet_jax import xla_flags

# Tests run with the XLA flags the entry points use (before JAX starts its backend).
xla_flags.set_defaults()

import jax  # noqa: E402

# Threefry random bits take ~20 s to compile per dropout model on a 2-core CPU; the 'rbg' generator
# compiles in ~3 s. Dropout semantics are the same; only the stream of random bits differs.
jax.config.update('jax_default_prng_impl', 'rbg')
