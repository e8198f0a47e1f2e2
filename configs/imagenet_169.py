"""DenseNet-169 on ImageNet (paper: 23.80% / 6.85% single-crop error).

    python train.py --config=configs/imagenet_169.py --workdir=DIR

Same recipe as imagenet_121.py.
"""

import ml_collections

from configs import imagenet_121


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_121.get_config()
  config.model = 'densenet169'
  return config
