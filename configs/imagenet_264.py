"""DenseNet-264 on ImageNet (paper: 22.15% / 6.12% single-crop error).

    python train.py --config=configs/imagenet_264.py --workdir=DIR

Same recipe as imagenet_121.py.
"""

import ml_collections

from configs import imagenet_121


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_121.get_config()
  config.model = 'densenet264'
  return config
