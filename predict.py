"""Predicts the classes of image files: python predict.py --checkpoint=DIR IMAGE_OR_FOLDER... [--top_k=5]

The command is densenet_jax/commands/predict.py (installed: `densenet-predict`); densenet_jax.launch prepares the
process before it loads.
"""

from densenet_jax import launch

if __name__ == '__main__':
  launch.predict()
