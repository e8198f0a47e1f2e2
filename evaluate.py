"""Evaluates saved weights: python evaluate.py --checkpoint=DIR [--split=test] [--ten_crop]

The command is densenet_jax/commands/evaluate.py (installed: `densenet-evaluate`); densenet_jax.launch prepares the
process before it loads.
"""

from densenet_jax import launch

if __name__ == '__main__':
  launch.evaluate()
