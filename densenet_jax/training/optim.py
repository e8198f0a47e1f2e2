"""The paper's optimizer: SGD with Nesterov momentum, weight decay on every parameter, step schedule."""

from __future__ import annotations

from collections.abc import Sequence

import optax


def create_learning_rate_fn(
    base_learning_rate: float,
    boundaries_epochs: Sequence[float],
    decay_factor: float,
    steps_per_epoch: int,
) -> optax.Schedule:
  """Piecewise-constant schedule: `base_learning_rate`, multiplied by `decay_factor` at each boundary.

  A boundary at epoch e takes effect at step round(e * steps_per_epoch): the first step of epoch e.
  """
  boundaries = {int(round(e * steps_per_epoch)): decay_factor for e in boundaries_epochs}
  return optax.piecewise_constant_schedule(base_learning_rate, boundaries)


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
