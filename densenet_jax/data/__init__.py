"""Building blocks of `densenet_jax.input_pipeline` (sources and TensorFlow preprocessing)."""
