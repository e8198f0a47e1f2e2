"""python -m densenet_jax.export: the densenet-export command (densenet_jax/commands/export.py)."""

from densenet_jax import launch

if __name__ == '__main__':
  launch.export()
