"""Trains a DenseNet: python train.py --config=configs/imagenet_121.py --workdir=DIR

The command is densenet_jax/commands/train.py (installed: `densenet-train`); densenet_jax.launch prepares the
process before it loads.
"""

from densenet_jax import launch

if __name__ == '__main__':
  launch.train()
