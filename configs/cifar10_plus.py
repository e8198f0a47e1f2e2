"""C10+ of the paper (Table 2): CIFAR-10 with standard augmentation, 300 epochs, batch 64.

    python train.py --config=configs/cifar10_plus.py:densenet_bc_l100_k12 --workdir=DIR

The argument after ':' is the model: densenet_l40_k12, densenet_l100_k12, densenet_l100_k24,
densenet_bc_l100_k12 (default), densenet_bc_l250_k24 or densenet_bc_l190_k40.
Learning rate 0.1, divided by 10 at epochs 150 and 225. Paper: https://arxiv.org/abs/1608.06993.
"""

import ml_collections

from densenet_jax import config as base

CIFAR_MODELS = (
    'densenet_l40_k12',
    'densenet_l100_k12',
    'densenet_l100_k24',
    'densenet_bc_l100_k12',
    'densenet_bc_l250_k24',
    'densenet_bc_l190_k40',
)


def get_config(model: str = 'densenet_bc_l100_k12') -> ml_collections.ConfigDict:
  if model not in CIFAR_MODELS:
    raise ValueError(
        f'Unknown CIFAR model {model!r} after ":" in --config; choose one of {", ".join(CIFAR_MODELS)}.'
    )
  config = base.get_config()
  config.model = model
  config.dataset = 'cifar10'
  config.augment = True
  return config
