"""The base config: every field the training loop reads, with the paper's shared recipe.

Every file in configs/ starts from it and overrides a few fields; any field can also be overridden on the
command line, e.g. `--config.num_epochs=10`.
"""

import json

import ml_collections

# A run writes its resolved config here, inside the workdir (config_validation.check_workdir).
RESOLVED_CONFIG_FILE = 'config.json'


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Model: a name of densenet_jax.models.MODELS, or 'cifar_densenet' built from `architecture`.
  config.model = 'densenet_bc_l100_k12'
  config.architecture = ml_collections.ConfigDict()  # depth, growth_rate, bottleneck, compression
  config.dropout_rate = 0.0
  config.memory_efficient = False
  # n > 0: compute each dense block n layers at a time under jax.lax.scan (needs memory_efficient): the
  # same model, several times faster to compile (docs/performance.md). 0: every layer written out.
  config.layers_per_scan = 0
  config.dtype = 'float32'  # compute dtype; 'bfloat16' on GPU/TPU. Parameters stay float32.

  # Data (densenet_jax.input_pipeline).
  config.dataset = 'cifar10'
  config.data_dir = ml_collections.FieldReference(None, field_type=str)
  config.download = False  # let TFDS download and prepare a missing dataset (needs internet)
  config.augment = True
  config.image_size = ml_collections.FieldReference(None, field_type=int)  # None: dataset default
  config.eval_split = 'test'
  config.ten_crop_eval = False  # ImageNet: also report the 10-crop error

  # Optimization: SGD, Nesterov momentum 0.9, weight decay 1e-4 on every parameter (paper, Sec. 4.2).
  config.batch_size = 64  # global, over all devices of all hosts
  config.gradient_accumulation_steps = 1  # split each batch into this many sequential micro-batches
  config.num_epochs = 300
  config.learning_rate = 0.1
  config.lr_boundaries_epochs = (150, 225)  # the learning rate is divided by 10 at each
  config.lr_decay_factor = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4

  # Evaluation, logging, checkpoints.
  config.eval_every_epochs = 1
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1
  config.keep_checkpoints = 3
  config.keep_best_checkpoint = False  # SVHN: keep the checkpoint with the lowest eval error
  config.init_from = ml_collections.FieldReference(None, field_type=str)  # fine-tune from a checkpoint
  config.seed = 0
  config.progress_bar = True
  # Compiled steps are kept here and reused by any later run of the same model, batch and devices: a resume,
  # a rerun or an evaluation skips most of XLA's compile time. '' keeps nothing.
  config.compilation_cache_dir = '~/.cache/densenet_jax/compilation_cache'

  return config


def with_defaults(resolved: dict) -> dict:
  """A run's resolved config (its config.json) completed with the fields added since, at their defaults."""
  return {**json.loads(get_config().to_json_best_effort(sort_keys=True)), **resolved}
