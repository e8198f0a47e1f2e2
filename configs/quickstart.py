"""Quick start: a small DenseNet-BC on scikit-learn's handwritten digits, offline, minutes on a CPU.

    python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart

1,797 real 8x8 digit images ship inside scikit-learn, so this runs with no download.
"""

import ml_collections

from densenet_jax import config as base


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config()
  config.model = 'cifar_densenet'
  config.architecture = ml_collections.ConfigDict(
      dict(depth=16, growth_rate=12, bottleneck=True, compression=0.5)
  )
  config.dataset = 'digits'
  config.augment = True
  config.eval_split = 'test'
  config.batch_size = 64
  config.num_epochs = 30
  config.lr_boundaries_epochs = (15, 23)
  config.log_every_steps = 10
  config.eval_every_epochs = 5
  config.checkpoint_every_epochs = 10
  # Two layers per block: nothing to gain from recomputation or scanned blocks, whose loops only add compile time
  # (on the 2-core AMD CPU: 56 s cold with the AMD default form, 44 s with this one; docs/performance.md).
  config.memory_efficient = False
  config.layers_per_scan = 0
  return config
