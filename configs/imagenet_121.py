"""DenseNet-121 on ImageNet (paper Table 3: 25.02% / 7.71% top-1 / top-5 single-crop error).

    python train.py --config=configs/imagenet_121.py --workdir=DIR

Batch 256, 90 epochs, learning rate 0.1 divided by 10 at epochs 30 and 60, fb.resnet.torch augmentation.
BatchNorm statistics per 64 images: the paper's models were trained with fb.resnet.torch at batch 256 on 4 GPUs, whose
data-parallel table normalizes each GPU's 64 images with their own statistics. The function of a step then does not
depend on how many devices run it (docs/models.md, "BatchNorm groups").
Paper: https://arxiv.org/abs/1608.06993. Other depths: imagenet_169.py, imagenet_201.py, imagenet_264.py,
imagenet_161.py.
"""

import ml_collections

from densenet_jax import config as base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model = 'densenet121'
  config.dataset = 'imagenet2012'
  config.augment = True
  config.ten_crop_eval = True
  config.eval_split = 'validation'
  config.batch_size = 256
  config.num_epochs = 90
  config.lr_boundaries_epochs = (30, 60)
  config.batch_norm_group_size = 64
  config.dtype = 'bfloat16'
  config.log_every_steps = 100
  return config
