"""python -m densenet_jax.compile_check: the densenet-compile-check command (densenet_jax/commands/compile_check.py).

This package's __init__ imports nothing, so JAX is still unloaded here and the launcher's
`compile_check.set_environment()` comes before it.
"""

from densenet_jax import launch

if __name__ == '__main__':
  launch.compile_check()
