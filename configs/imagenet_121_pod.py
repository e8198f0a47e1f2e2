"""DenseNet-121 on ImageNet with a large batch, for a TPU pod slice (Goyal et al. 2017 recipe on the paper's model).

    python train.py --config=configs/imagenet_121_pod.py --workdir=gs://BUCKET/densenet121_pod

Batch 4096 instead of the paper's 256: the learning rate is 0.1 per 256 images scaled linearly, 0.1 * 4096 / 256 =
1.6, reached by a linear warmup from 0 over the first 5 epochs (Goyal et al., https://arxiv.org/abs/1706.02677,
Sec. 2.1-2.2), then divided by 10 at epochs 30 and 60 of 90 as in the paper (https://arxiv.org/abs/1608.06993).
BatchNorm statistics per 32 images, as that recipe prescribes (Goyal et al., Sec. 5.1): each chip normalizes its own
images, so no BatchNorm statistic crosses the network.
bfloat16 compute, float32 parameters. Check that a step fits the chips before launching, e.g. on a v5p-128 slice
(64 chips, 64 images per chip):

    python -m densenet_jax.compile_check --config=configs/imagenet_121_pod.py --topology=v5p:4x4x4

This recipe has not been trained to completion here; its accuracy is not measured (docs/tpu.md).
"""

import ml_collections

from configs import imagenet_121


def get_config() -> ml_collections.ConfigDict:
  config = imagenet_121.get_config()
  config.batch_size = 4096
  config.learning_rate = 0.1  # per 256 images
  config.lr_reference_batch_size = 256
  config.warmup_epochs = 5.0
  config.batch_norm_group_size = 32
  config.dtype = 'bfloat16'
  config.log_every_steps = 50
  return config
