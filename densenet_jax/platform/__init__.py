"""The one place that looks at the machine: backend, CPU family, XLA flags, host memory.

Each entry point (train, evaluate, predict, export, the compile check) calls `prepare_environment()` before JAX
and TensorFlow start and `choose(config, backend)` once, above the model; the model takes the chosen values as
explicit arguments and never reads the machine itself. Nothing in densenet_jax/model/ imports this package.

    platform.prepare_environment()                         # XLA flags, host memory: before JAX's first computation
    form = platform.choose(config, jax.default_backend())  # concrete kernels, block form, dropout masks
    model = model_lib.from_config(config, **form.model_options(), ...)
"""

from densenet_jax.platform.choice import (FORM_FIELDS, Form, choose, default_form, remat_is_effective,
                                          run_once_options)
from densenet_jax.platform.environment import prepare_environment

__all__ = ['FORM_FIELDS', 'Form', 'choose', 'default_form', 'prepare_environment', 'remat_is_effective',
           'run_once_options']
