"""DenseNet-161 on ImageNet (not in the paper's tables; torchvision's ported weights reach 77.14% top-1 accuracy).

    python train.py --config=configs/imagenet_161.py --workdir=DIR

Same recipe as imagenet_121.py.
"""

import ml_collections

from configs import imagenet_121


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_121.get_config()
  config.model = 'densenet161'
  return config
