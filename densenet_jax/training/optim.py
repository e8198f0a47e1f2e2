"""The paper's optimizer: SGD with Nesterov momentum, weight decay on every parameter, step schedule.

For large batches (Goyal et al. 2017, https://arxiv.org/abs/1706.02677) the schedule can start with a linear
warmup, and the learning rate can be given per reference batch and scaled linearly with the batch size. Both are
off by default, which is the paper's recipe.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import optax


def scaled_learning_rate(learning_rate: float, batch_size: int, reference_batch_size: int | None) -> float:
  """The peak learning rate of a batch of `batch_size` images.

  `reference_batch_size` None: `learning_rate` is the rate itself. Otherwise it is the rate for a batch of
  `reference_batch_size` images, scaled linearly (Goyal et al.: 0.1 per 256 images is 1.6 for a batch of 4096).
  """
  if reference_batch_size is None:
    return learning_rate
  return learning_rate * batch_size / reference_batch_size


def create_learning_rate_fn(
    base_learning_rate: float,
    boundaries_epochs: Sequence[float],
    decay_factor: float,
    steps_per_epoch: int,
    warmup_steps: int = 0,
) -> optax.Schedule:
  """Piecewise-constant schedule: `base_learning_rate`, multiplied by `decay_factor` at each boundary.

  A boundary at epoch e takes effect at step round(e * steps_per_epoch): the first step of epoch e. With
  `warmup_steps` = w > 0 the rate at step s < w is base_learning_rate * s / w (a linear ramp from 0); from step w
  on it is the step schedule, whose boundaries do not move.
  """
  boundaries = {int(round(e * steps_per_epoch)): decay_factor for e in boundaries_epochs}
  steps = optax.piecewise_constant_schedule(base_learning_rate, boundaries)
  if warmup_steps <= 0:
    return steps

  def schedule(step):
    warmup = base_learning_rate * jnp.asarray(step, jnp.float32) / warmup_steps
    return jnp.where(step < warmup_steps, warmup, steps(step))

  return schedule


def from_config(config, steps_per_epoch: int) -> tuple[optax.Schedule, optax.GradientTransformation]:
  """The learning-rate schedule and optimizer a training config describes (loop.py and compile_check build alike)."""
  learning_rate_fn = create_learning_rate_fn(
      scaled_learning_rate(config.learning_rate, config.batch_size, config.get('lr_reference_batch_size')),
      config.lr_boundaries_epochs,
      config.lr_decay_factor,
      steps_per_epoch,
      warmup_steps=int(round(config.get('warmup_epochs', 0) * steps_per_epoch)),
  )
  tx = create_optimizer(
      learning_rate_fn, momentum=config.momentum, nesterov=config.nesterov, weight_decay=config.weight_decay
  )
  return learning_rate_fn, tx


def create_optimizer(
    learning_rate_fn: optax.Schedule,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> optax.GradientTransformation:
  """SGD(momentum, nesterov) on gradient + weight_decay * parameter, for every parameter.

  As in the original Torch code, the decay applies to all parameters (BN scales and biases and the
  classifier bias included) and is added to the gradient before momentum, which is what
  torch.optim.SGD(weight_decay=...) and optim.sgd in Torch do.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate_fn, momentum=momentum, nesterov=nesterov),
  )
