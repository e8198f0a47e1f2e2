"""SVHN of the paper (Table 2): train + extra, no augmentation, dropout 0.2, 40 epochs, batch 64.

    python train.py --config=configs/svhn.py:densenet_bc_l100_k12 --workdir=DIR

The argument after ':' is the model, as in cifar10_plus.py. Paper: https://arxiv.org/abs/1608.06993.
"""

import ml_collections

from configs import cifar10_plus


def get_config(model: str = 'densenet_bc_l100_k12') -> ml_collections.ConfigDict:
  config = cifar10_plus.get_config(model)
  config.dataset = 'svhn_cropped'
  config.augment = False
  config.dropout_rate = 0.2  # Without augmentation, dropout after every conv but the first.
  config.num_epochs = 40
  config.lr_boundaries_epochs = (20, 30)
  # Model selection on the 6,000 held-out training images; the test error of the checkpoint with
  # the lowest validation error is reported.
  config.eval_split = 'validation'
  config.keep_best_checkpoint = True
  return config
