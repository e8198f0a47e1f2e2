"""python -m densenet_jax.tpu_compile: the densenet-tpu-compile command (densenet_jax/commands/tpu_compile.py).

This package's __init__ imports nothing, so JAX is still unloaded here and the launcher's
`tpu_compile.set_environment()` comes before it.
"""

from densenet_jax import launch

if __name__ == '__main__':
  launch.tpu_compile()
