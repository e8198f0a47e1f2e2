"""DenseNet-201 on ImageNet (paper: 22.58% / 6.34% single-crop error).

    python train.py --config=configs/imagenet_201.py --workdir=DIR

Same recipe as imagenet_121.py.
"""

import ml_collections

from configs import imagenet_121


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_121.get_config()
  config.model = 'densenet201'
  return config
