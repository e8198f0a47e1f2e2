"""C100+ of the paper (Table 2): CIFAR-100 with standard augmentation, 300 epochs, batch 64.

    python train.py --config=configs/cifar100_plus.py:densenet_bc_l100_k12 --workdir=DIR

The argument after ':' is the model, as in cifar10_plus.py. Paper: https://arxiv.org/abs/1608.06993.
"""

import ml_collections

from configs import cifar10_plus


def get_config(model: str = 'densenet_bc_l100_k12') -> ml_collections.ConfigDict:
  config = cifar10_plus.get_config(model)
  config.dataset = 'cifar100'
  config.augment = True
  return config
